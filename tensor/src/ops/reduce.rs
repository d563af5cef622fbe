//! Reductions over axes.

use crate::{Result, Tensor};

impl Tensor {
    /// Sum over `axes` (empty = no reduction); reduced axes are kept with size 1 when `keepdim`.
    pub fn sum(&self, axes: &[usize], keepdim: bool) -> Result<Tensor> {
        todo!("{axes:?} {keepdim}")
    }

    /// Mean over `axes`.
    pub fn mean(&self, axes: &[usize], keepdim: bool) -> Result<Tensor> {
        todo!("{axes:?} {keepdim}")
    }

    /// Sum of every element as a rank-0 tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        todo!()
    }

    /// Maximum over one axis.
    pub fn max(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        todo!("{axis} {keepdim}")
    }

    /// Minimum over one axis.
    pub fn min(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        todo!("{axis} {keepdim}")
    }

    /// Index (u32) of the first maximum along one axis.
    pub fn argmax(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        todo!("{axis} {keepdim}")
    }

    /// Sums a broadcast tensor back down to `shape` (the inverse of `broadcast_to`, for gradients).
    pub fn sum_to_shape(&self, shape: &[usize]) -> Result<Tensor> {
        todo!("{shape:?}")
    }
}
