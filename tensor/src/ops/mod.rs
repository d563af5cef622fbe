//! Tensor operations: each file defines one family's shapes, checks and CPU kernel.

pub mod accumulate;
pub mod adamw;
pub mod attention;
pub mod binary;
pub mod conv;
pub(crate) mod elementwise;
pub mod gated_norm;
pub mod index;
pub mod loss;
pub mod matmul;
pub mod norm;
pub(crate) mod par_write;
pub mod random;
pub mod reduce;
pub mod selective_scan;
pub mod softmax;
pub mod ssd;
pub(crate) mod tile_gemm;
pub mod unary;
