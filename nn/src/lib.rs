//! `nn`: layers built from differentiable tensor ops, a parameter store keyed by Hugging Face
//! names, and loading of `save_pretrained` checkpoints.
//!
//! Layers take their parameters from a [`ParamStore`] when they are built, checking each name
//! and shape, and hold them as [`autograd::Var`]s: a trainable store makes every forward pass
//! differentiable, a frozen one records no graph.

mod adamw;
mod attention;
mod cache;
mod conv1d;
mod dinov2;
mod embedding;
mod error;
pub mod init;
pub mod interpolate;
mod linear;
pub mod mamba1;
pub mod mamba2;
mod mamba_lm;
mod mlp;
mod norm;
pub mod paths;
pub mod pretrained;
mod siglip;
mod store;
pub mod vit;

pub use adamw::{AdamW, AdamWConfig};
pub use attention::{Attention, AttentionNames};
pub use cache::{Cache, LayerCache};
pub use conv1d::CausalConv1d;
pub use dinov2::Dinov2;
pub use embedding::Embedding;
pub use error::{NnError, Result};
pub use linear::Linear;
pub use mamba_lm::{MambaBlock, MambaLm, Mixer};
pub use mlp::{Gelu, Mlp};
pub use norm::{GatedRmsNorm, LayerNorm, RmsNorm};
pub use pretrained::{load_pretrained, HfConfig, Pretrained};
pub use siglip::{SiglipHead, SiglipVision};
pub use store::ParamStore;
