//! Sum, mean, max, min and argmax over the middle axis of a contiguous `[outer, len, inner]`.

use super::{need, product, Dims3};
use crate::compile::REDUCE;
use crate::device::{DeviceBuffer, FloatElem, GpuDevice};
use crate::error::{CudaError, Result};
use crate::launch::{entry, launch, Arg, Grid};

/// How the axis is reduced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Σ (f32 accumulation).
    Sum,
    /// The sum divided by `count` before the single rounding: `count` is the number of
    /// elements the whole mean covers (the axis length for a mean over one run of axes).
    Mean {
        /// The divisor.
        count: usize,
    },
    /// Maximum, NaN-propagating.
    Max,
    /// Minimum, NaN-propagating.
    Min,
}

impl ReduceOp {
    /// The op code of reduce.cu, the divisor and whether there is one.
    fn args(self) -> (Arg, Arg, Arg) {
        let (code, divisor) = match self {
            ReduceOp::Sum => (0, None),
            ReduceOp::Mean { count } => (0, Some(count as f32)),
            ReduceOp::Max => (1, None),
            ReduceOp::Min => (2, None),
        };
        (
            Arg::I32(code),
            Arg::F32(divisor.unwrap_or(1.0)),
            Arg::flag(divisor.is_some()),
        )
    }
}

impl GpuDevice {
    /// Reduces `x` viewed as `dims` = `[outer, len, inner]` over `len` into `out`
    /// (`[outer, inner]`, same dtype). Max and min need `len > 0`.
    pub fn reduce<T: FloatElem>(
        &self,
        op: ReduceOp,
        x: &DeviceBuffer<T>,
        dims: Dims3,
        out: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        self.reduce_into(op, x, dims, out, T::DTYPE.suffix().to_string())
    }

    /// As [`GpuDevice::reduce`] with an f32 result, unrounded: for a reduction over several
    /// separate runs of axes, all but the last pass keep f32 so that the result rounds once.
    pub fn reduce_to_f32<T: FloatElem>(
        &self,
        op: ReduceOp,
        x: &DeviceBuffer<T>,
        dims: Dims3,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        let suffix = match T::DTYPE.suffix() {
            "f32" => "f32".to_string(),
            s => format!("{s}_to_f32"),
        };
        self.reduce_into(op, x, dims, out, suffix)
    }

    fn reduce_into<T: FloatElem, O: FloatElem>(
        &self,
        op: ReduceOp,
        x: &DeviceBuffer<T>,
        dims: Dims3,
        out: &mut DeviceBuffer<O>,
        suffix: String,
    ) -> Result<()> {
        let Dims3 { outer, len, inner } = dims;
        need(
            self,
            "reduce",
            "input",
            x,
            product("reduce", "shape", &[outer, len, inner])?,
        )?;
        need(self, "reduce", "output", out, outer * inner)?;
        if matches!(op, ReduceOp::Max | ReduceOp::Min) && len == 0 {
            return Err(CudaError::shape("reduce", "max/min over an empty axis"));
        }
        if out.is_empty() {
            return Ok(());
        }
        let (code, divisor, has_divisor) = op.args();
        if inner == 1 {
            let args = [
                code,
                Arg::buf(x),
                Arg::buf(out),
                Arg::size(outer),
                Arg::size(len),
                divisor,
                has_divisor,
            ];
            launch(
                self,
                &REDUCE,
                &format!("reduce_rows_{suffix}"),
                Grid::rows(outer, len),
                &args,
            )
        } else {
            let args = [
                code,
                Arg::buf(x),
                Arg::buf(out),
                Arg::size(outer),
                Arg::size(len),
                Arg::size(inner),
                divisor,
                has_divisor,
            ];
            launch(
                self,
                &REDUCE,
                &format!("reduce_cols_{suffix}"),
                Grid::column_tiles(outer, inner),
                &args,
            )
        }
    }

    /// First index of the maximum over `len` of `x` viewed as `dims` (a NaN counts as the
    /// maximum), into `out` (`[outer, inner]`); `len > 0`.
    pub fn argmax<T: FloatElem>(
        &self,
        x: &DeviceBuffer<T>,
        dims: Dims3,
        out: &mut DeviceBuffer<u32>,
    ) -> Result<()> {
        let Dims3 { outer, len, inner } = dims;
        need(
            self,
            "argmax",
            "input",
            x,
            product("argmax", "shape", &[outer, len, inner])?,
        )?;
        need(self, "argmax", "output", out, outer * inner)?;
        if len == 0 {
            return Err(CudaError::shape("argmax", "argmax over an empty axis"));
        }
        if out.is_empty() {
            return Ok(());
        }
        if inner == 1 {
            let args = [Arg::buf(x), Arg::buf(out), Arg::size(outer), Arg::size(len)];
            launch(
                self,
                &REDUCE,
                &entry::<T>("argmax_rows"),
                Grid::rows(outer, len),
                &args,
            )
        } else {
            let args = [
                Arg::buf(x),
                Arg::buf(out),
                Arg::size(outer),
                Arg::size(len),
                Arg::size(inner),
            ];
            launch(
                self,
                &REDUCE,
                &entry::<T>("argmax_cols"),
                Grid::column_tiles(outer, inner),
                &args,
            )
        }
    }
}
