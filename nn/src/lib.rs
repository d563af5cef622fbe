//! `nn`: layers built from differentiable tensor ops, a parameter store keyed by Hugging Face
//! names, and loading of `save_pretrained` checkpoints.
//!
//! Layers take their parameters from a [`ParamStore`] when they are built, checking each name
//! and shape, and hold them as [`autograd::Var`]s: a trainable store makes every forward pass
//! differentiable, a frozen one records no graph.

mod attention;
mod conv1d;
mod embedding;
mod error;
mod linear;
mod mlp;
mod norm;
pub mod pretrained;
mod store;

pub use attention::{causal_mask, Attention, AttentionNames};
pub use conv1d::CausalConv1d;
pub use embedding::Embedding;
pub use error::{NnError, Result};
pub use linear::Linear;
pub use mlp::{Gelu, Mlp};
pub use norm::{GatedRmsNorm, LayerNorm, RmsNorm};
pub use pretrained::{load_pretrained, HfConfig, Pretrained};
pub use store::ParamStore;
