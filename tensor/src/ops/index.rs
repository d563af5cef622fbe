//! Gathers and scatters by index, concatenation and stacking.

use crate::{Result, Tensor};

impl Tensor {
    /// Rows of `self` (`[V, D]`) picked by u32 `ids` of any shape: `ids.shape + [D]`.
    /// An id >= V is an error naming it.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        todo!("{ids:?}")
    }

    /// Entries `ids` (u32, 1-D) along `axis`.
    pub fn index_select(&self, axis: usize, ids: &Tensor) -> Result<Tensor> {
        todo!("{axis} {ids:?}")
    }

    /// A copy of `self` with `src` added at `ids` along `axis` (scatter-add; repeated ids sum):
    /// `out[.., ids[i], ..] += src[.., i, ..]`. The backward of `index_select` and `embedding`.
    pub fn index_add(&self, axis: usize, ids: &Tensor, src: &Tensor) -> Result<Tensor> {
        todo!("{axis} {ids:?} {src:?}")
    }

    /// Joins tensors along an existing axis; all other axes must agree.
    pub fn concat(tensors: &[&Tensor], axis: usize) -> Result<Tensor> {
        todo!("{tensors:?} {axis}")
    }

    /// Joins equally shaped tensors along a new axis.
    pub fn stack(tensors: &[&Tensor], axis: usize) -> Result<Tensor> {
        todo!("{tensors:?} {axis}")
    }
}
