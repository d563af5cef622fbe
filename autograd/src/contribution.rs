//! What a backward rule passes to one of its inputs: a whole gradient, or a part of one that is
//! added into the input's running gradient in place (a `narrow`'s slice, an embedding's rows),
//! so that a tensor split into pieces, or a table read at a few rows, does not get one full-size
//! gradient per use.

use tensor::Tensor;

/// A gradient for one input of a node, to be added into that input's running sum.
pub(crate) enum Contribution {
    /// The whole gradient, shaped like the input.
    Whole(Tensor),
    /// `grad` on elements `start..start + grad.dim(axis)` of `axis`, zero elsewhere.
    Slice { axis: usize, start: usize, grad: Tensor },
    /// `grad` scatter-added at `ids` along `axis`, zero elsewhere.
    Scatter { axis: usize, ids: Tensor, grad: Tensor },
}

impl Contribution {
    /// `sum + self`, or `self` alone when it is the first (`like` is the input's value): added
    /// into the running sum's memory when nothing else holds it.
    pub(crate) fn add_to(self, sum: Option<Tensor>, like: &Tensor) -> tensor::Result<Tensor> {
        match (self, sum) {
            (Contribution::Whole(grad), None) => Ok(grad),
            (Contribution::Whole(grad), Some(sum)) => sum.add_into(&grad),
            (Contribution::Slice { axis, start, grad }, None) => grad.zero_padded(like.shape(), axis, start),
            (Contribution::Slice { axis, start, grad }, Some(sum)) => sum.add_into_slice(axis, start, &grad),
            (Contribution::Scatter { axis, ids, grad }, sum) => {
                let zeros = || Tensor::zeros_on(like.shape(), like.dtype(), like.device());
                sum.map_or_else(zeros, Ok)?.index_add_into(axis, &ids, &grad)
            }
        }
    }
}
