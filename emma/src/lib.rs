//! `emma`: the EMMA multimodal Mamba model and the `emma` command-line program.
//!
//! The model itself (vision backbone, projector, hierarchical alignment, pixel decoder) builds
//! on the layers of `nn`; this crate so far holds the device selection and the commands that
//! run Hugging Face checkpoints (`emma logits`, `emma grads`, `emma vision`).

pub mod alignment;
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod device;
pub mod error;
pub mod fsutil;
pub mod image;
pub mod info;
pub mod model;
pub mod prompt;
pub mod sampling;
pub mod tokenizer;
