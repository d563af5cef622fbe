//! safetensors files: memory-mapped loading (zero-copy where alignment allows) and atomic saving.
