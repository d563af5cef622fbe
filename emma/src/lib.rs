//! `emma`: the EMMA multimodal Mamba model and the `emma` command-line program.
//!
//! The model (vision backbone, projector, Mamba LM, hierarchical alignment, pixel decoder) builds
//! on the layers of `nn`; around it are the tokenizer, chat prompts, image preprocessing,
//! checkpoints, generation and the commands of the `emma` program (`info`, `generate`, and
//! `logits`/`grads`/`vision` over Hugging Face checkpoints).

pub mod alignment;
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod device;
pub mod error;
pub mod exit;
pub mod fsutil;
pub mod generate;
pub mod image;
pub mod info;
pub mod model;
pub mod picture;
pub mod prompt;
pub mod sampling;
pub mod tokenizer;
pub mod visualize;
