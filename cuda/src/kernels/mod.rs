//! Typed launchers for the kernels in `cuda/kernels/`, as methods of [`GpuDevice`]. Each checks
//! that every buffer belongs to the device and has the length the shapes imply, picks the grid,
//! and queues the kernel on the device's stream. Kernels compute in f32 and round once, like the
//! CPU reference in the `tensor` crate.
//!
//! [`GpuDevice`]: crate::GpuDevice

mod adamw;
mod attention;
mod conv;
mod elementwise;
mod index;
mod norm;
mod reduce;
mod scan;
mod softmax;
mod ssd;

pub use adamw::{AdamCoefficients, AdamWStep};
pub use attention::{AttentionBackward, AttentionDims, AttentionMaskKind, ATTENTION_MAX_HEAD_DIM};
pub use conv::{ConvGrads, ConvSpec};
pub use elementwise::{BinaryOp, CmpOp, UnaryOp};
pub use norm::{GatedNormGrads, LayerNormGrads, NormSpec, Residual, RmsNormGrads};
pub use reduce::ReduceOp;
pub use scan::{scan_backward_groups, ScanGrads, ScanInputs, ScanSpec, SCAN_CHUNK, SCAN_MAX_STATE};
pub use ssd::{SsdGradBuffers, SsdInputs, SsdSpec};

use crate::compile::KernelFile;
use crate::device::{DeviceBuffer, DeviceElem, FloatElem, GpuDevice};
use crate::error::{CudaError, Result};
use crate::launch::{entry, launch, Arg, Grid};

/// A contiguous tensor seen as `[outer, len, inner]` around one axis (or a run of adjacent
/// axes): the kernels reduce, gather or scatter along `len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims3 {
    /// Product of the axes before.
    pub outer: usize,
    /// The axis' length.
    pub len: usize,
    /// Product of the axes after.
    pub inner: usize,
}

impl Dims3 {
    /// `shape` split around `axis` (which must be in range).
    pub fn around(shape: &[usize], axis: usize) -> Dims3 {
        Dims3 {
            outer: shape[..axis].iter().product(),
            len: shape[axis],
            inner: shape[axis + 1..].iter().product(),
        }
    }

    /// `rows` rows of `len` elements, reduced along the rows' length.
    pub fn rows(rows: usize, len: usize) -> Dims3 {
        Dims3 {
            outer: rows,
            len,
            inner: 1,
        }
    }
}

/// Errors unless `buf` belongs to `dev` and holds exactly `expected` elements.
fn need<T: DeviceElem>(
    dev: &GpuDevice,
    op: &'static str,
    what: &str,
    buf: &DeviceBuffer<T>,
    expected: usize,
) -> Result<()> {
    dev.check_owner(op, buf)?;
    if buf.len() != expected {
        return Err(CudaError::shape(
            op,
            format!("{what} has {} elements, expected {expected}", buf.len()),
        ));
    }
    Ok(())
}

/// Checks the optional gradients a backward pass was asked for, each given as (name, buffer,
/// expected length, whether its input was given): a requested gradient needs its input and the
/// expected length.
fn need_optional_grads<T: DeviceElem>(
    dev: &GpuDevice,
    op: &'static str,
    grads: &[(&str, Option<&DeviceBuffer<T>>, usize, bool)],
) -> Result<()> {
    for &(what, buf, len, has_input) in grads {
        if let Some(buf) = buf {
            if !has_input {
                return Err(CudaError::shape(
                    op,
                    format!("{what} asked for without its input"),
                ));
            }
            need(dev, op, what, buf, len)?;
        }
    }
    Ok(())
}

/// Queues the `sum_parts` kernel of `file` (common.cuh's fixed-order sum of per-part partial
/// results): `out[m] = Σ_p part[p·M + m]` (p in order) rounded to T, for M = `out.len()`.
fn sum_parts<T: FloatElem>(
    dev: &GpuDevice,
    file: &KernelFile,
    part: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<T>,
    parts: usize,
) -> Result<()> {
    let m = out.len();
    if m == 0 {
        return Ok(());
    }
    let args = [Arg::buf(part), Arg::buf(out), Arg::size(parts), Arg::size(m)];
    launch(
        dev,
        file,
        &entry::<T>("sum_parts"),
        Grid::elementwise(dev, m),
        &args,
    )
}

/// `a · b`, or a shape error naming `what` when it overflows.
fn product(op: &'static str, what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| CudaError::shape(op, format!("{what} {dims:?} overflows")))
}

/// Reads back the bad-index word a kernel recorded (all ones when none) and turns it into an
/// error naming the position and value.
fn check_bad_index(
    dev: &GpuDevice,
    bad: &DeviceBuffer<u32>,
    op: &'static str,
    what: &'static str,
    bound: usize,
) -> Result<()> {
    let words = dev.download(bad)?;
    let packed = u64::from(words[0]) | (u64::from(words[1]) << 32);
    if packed == u64::MAX {
        return Ok(());
    }
    Err(CudaError::Index {
        op,
        what,
        value: packed & 0xffff_ffff,
        position: packed >> 32,
        bound: bound as u64,
    })
}

/// A fresh bad-index word (two u32 halves of a u64, all ones).
fn bad_index_word(dev: &GpuDevice) -> Result<DeviceBuffer<u32>> {
    dev.full(2, u32::MAX)
}
