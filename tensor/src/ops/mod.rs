//! Tensor operations: each file defines one family's shapes, checks and CPU kernel.

pub mod binary;
pub(crate) mod elementwise;
pub mod unary;
