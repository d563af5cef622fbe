//! Batched matrix multiplication on the `gemm` crate.

use crate::{Result, Tensor};

impl Tensor {
    /// `[..., M, K] x [..., K, N] -> [..., M, N]`; batch axes broadcast (numpy rules); both
    /// operands have rank >= 2 and the same float dtype. Transposed views multiply without a copy.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        todo!("matmul {:?} {:?}", self, rhs)
    }
}
