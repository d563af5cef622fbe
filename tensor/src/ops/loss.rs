//! Fused cross-entropy over logits with an ignore index.

use crate::{Result, Tensor};

impl Tensor {
    /// Mean over rows whose target is not `ignore_index` of `-log_softmax(logits)[row, target]`;
    /// `self` = logits `[N, C]`, `targets` u32 `[N]`. Returns a rank-0 tensor (0 when no row counts).
    pub fn cross_entropy(&self, targets: &Tensor, ignore_index: u32) -> Result<Tensor> {
        todo!("{targets:?} {ignore_index}")
    }

    /// d loss / d logits scaled by the upstream scalar `grad`: `(softmax - onehot) / count` on
    /// counted rows, 0 on ignored rows.
    pub fn cross_entropy_backward(
        &self,
        targets: &Tensor,
        ignore_index: u32,
        grad: &Tensor,
    ) -> Result<Tensor> {
        todo!("{targets:?} {ignore_index} {grad:?}")
    }
}
