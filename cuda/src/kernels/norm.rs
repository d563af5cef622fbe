//! RMSNorm, LayerNorm (with a fused residual add) and Mamba-2's gated RMSNorm.

use super::{need, product};
use crate::compile::{GATED_NORM, NORM};
use crate::device::{DeviceBuffer, FloatElem, GpuDevice};
use crate::error::{CudaError, Result};
use crate::launch::{entry, launch, row_threads, Arg, Grid};

/// The shape of a normalisation: `rows` rows of `dim` features, normalised in groups of `group`
/// features (`group == dim` for plain norms), with `eps` added to the variance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormSpec {
    /// Number of rows.
    pub rows: usize,
    /// Features per row.
    pub dim: usize,
    /// Features per normalised group (a divisor of `dim`).
    pub group: usize,
    /// Added to the mean square (RMSNorm) or variance (LayerNorm).
    pub eps: f64,
}

impl NormSpec {
    /// A norm over whole rows.
    pub fn new(rows: usize, dim: usize, eps: f64) -> Self {
        NormSpec {
            rows,
            dim,
            group: dim,
            eps,
        }
    }

    /// A norm over groups of `group` features (gated RMSNorm).
    pub fn grouped(rows: usize, dim: usize, group: usize, eps: f64) -> Self {
        NormSpec {
            rows,
            dim,
            group,
            eps,
        }
    }

    /// Elements of x: rows · dim.
    fn numel(&self, op: &'static str) -> Result<usize> {
        product(op, "rows x dim", &[self.rows, self.dim])
    }
}

/// A residual stream fused into a forward norm: `h = x + input` (rounded to T) is written to
/// `sum_out` and normalised.
pub struct Residual<'a, T: FloatElem> {
    /// The residual added to x.
    pub input: &'a DeviceBuffer<T>,
    /// Receives x + input.
    pub sum_out: &'a mut DeviceBuffer<T>,
}

/// Outputs of the RMSNorm backward.
pub struct RmsNormGrads<'a, T: FloatElem> {
    /// dL/dx, the shape of x.
    pub dx: &'a mut DeviceBuffer<T>,
    /// dL/dweight `[dim]`, summed over rows.
    pub dweight: &'a mut DeviceBuffer<T>,
}

/// Outputs of the LayerNorm backward.
pub struct LayerNormGrads<'a, T: FloatElem> {
    /// dL/dx, the shape of x.
    pub dx: &'a mut DeviceBuffer<T>,
    /// dL/dweight `[dim]`, summed over rows.
    pub dweight: &'a mut DeviceBuffer<T>,
    /// dL/dbias `[dim]` (Σ over rows of the gradient).
    pub dbias: &'a mut DeviceBuffer<T>,
}

/// Outputs of the gated RMSNorm backward.
pub struct GatedNormGrads<'a, T: FloatElem> {
    /// dL/dx.
    pub dx: &'a mut DeviceBuffer<T>,
    /// dL/dz (the gate).
    pub dz: &'a mut DeviceBuffer<T>,
    /// dL/dweight `[dim]`, summed over rows.
    pub dweight: &'a mut DeviceBuffer<T>,
}

/// Blocks of a backward kernel per multiprocessor (each keeps an f32 partial row per
/// parameter gradient).
const PARTIALS_PER_SM: usize = 2;

impl GpuDevice {
    /// Checks the residual's buffers and returns its two kernel arguments (null when absent).
    fn residual_args<T: FloatElem>(
        &self,
        op: &'static str,
        residual: &Option<Residual<'_, T>>,
        n: usize,
    ) -> Result<[Arg; 2]> {
        Ok(match residual {
            Some(r) => {
                need(self, op, "residual", r.input, n)?;
                need(self, op, "residual output", r.sum_out, n)?;
                [Arg::buf(r.input), Arg::buf(r.sum_out)]
            }
            None => [Arg::Ptr(0), Arg::Ptr(0)],
        })
    }

    /// `y = x / sqrt(mean(x²) + eps) · weight` over rows of `spec.dim`, after the optional
    /// residual add.
    pub fn rms_norm<T: FloatElem>(
        &self,
        x: &DeviceBuffer<T>,
        residual: Option<Residual<'_, T>>,
        weight: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
        spec: NormSpec,
    ) -> Result<()> {
        let n = spec.numel("rms_norm")?;
        need(self, "rms_norm", "input", x, n)?;
        need(self, "rms_norm", "weight", weight, spec.dim)?;
        need(self, "rms_norm", "output", y, n)?;
        let [res, res_out] = self.residual_args("rms_norm", &residual, n)?;
        if n == 0 {
            return Ok(());
        }
        let args = [
            Arg::buf(x),
            res,
            res_out,
            Arg::buf(weight),
            Arg::buf(y),
            Arg::size(spec.rows),
            Arg::size(spec.dim),
            Arg::F32(spec.eps as f32),
        ];
        launch(
            self,
            &NORM,
            &entry::<T>("rms_norm"),
            Grid::rows(spec.rows, spec.dim),
            &args,
        )
    }

    /// `y = (x - mean) / sqrt(var + eps) · weight + bias` over rows of `spec.dim` (biased
    /// variance), after the optional residual add.
    pub fn layer_norm<T: FloatElem>(
        &self,
        x: &DeviceBuffer<T>,
        residual: Option<Residual<'_, T>>,
        weight: &DeviceBuffer<T>,
        bias: Option<&DeviceBuffer<T>>,
        y: &mut DeviceBuffer<T>,
        spec: NormSpec,
    ) -> Result<()> {
        let n = spec.numel("layer_norm")?;
        need(self, "layer_norm", "input", x, n)?;
        need(self, "layer_norm", "weight", weight, spec.dim)?;
        if let Some(b) = bias {
            need(self, "layer_norm", "bias", b, spec.dim)?;
        }
        need(self, "layer_norm", "output", y, n)?;
        let [res, res_out] = self.residual_args("layer_norm", &residual, n)?;
        if n == 0 {
            return Ok(());
        }
        let args = [
            Arg::buf(x),
            res,
            res_out,
            Arg::buf(weight),
            Arg::opt(bias),
            Arg::buf(y),
            Arg::size(spec.rows),
            Arg::size(spec.dim),
            Arg::F32(spec.eps as f32),
        ];
        launch(
            self,
            &NORM,
            &entry::<T>("layer_norm"),
            Grid::rows(spec.rows, spec.dim),
            &args,
        )
    }

    /// The number of partial rows a backward over `items` work items uses.
    fn partial_blocks(&self, items: usize) -> usize {
        items.clamp(1, self.info().multiprocessors * PARTIALS_PER_SM)
    }

    /// Sums `parts` partial rows of `dim` f32 into `out`, rounding once.
    fn column_sum<T: FloatElem>(
        &self,
        part: &DeviceBuffer<f32>,
        parts: usize,
        out: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let dim = out.len();
        let args = [Arg::buf(part), Arg::buf(out), Arg::size(parts), Arg::size(dim)];
        launch(
            self,
            &NORM,
            &entry::<T>("column_sum"),
            Grid::elementwise(self, dim),
            &args,
        )
    }

    /// Backward of [`GpuDevice::rms_norm`] (without residual) from x and dL/dy.
    pub fn rms_norm_backward<T: FloatElem>(
        &self,
        x: &DeviceBuffer<T>,
        weight: &DeviceBuffer<T>,
        g: &DeviceBuffer<T>,
        grads: RmsNormGrads<'_, T>,
        spec: NormSpec,
    ) -> Result<()> {
        let op = "rms_norm_backward";
        let n = spec.numel(op)?;
        need(self, op, "input", x, n)?;
        need(self, op, "weight", weight, spec.dim)?;
        need(self, op, "gradient", g, n)?;
        need(self, op, "dx", grads.dx, n)?;
        need(self, op, "dweight", grads.dweight, spec.dim)?;
        if spec.dim == 0 {
            return Ok(());
        }
        let parts = self.partial_blocks(spec.rows);
        let dw_part = self.alloc::<f32>(parts * spec.dim)?;
        let args = [
            Arg::buf(x),
            Arg::buf(weight),
            Arg::buf(g),
            Arg::buf(grads.dx),
            Arg::buf(&dw_part),
            Arg::size(spec.rows),
            Arg::size(spec.dim),
            Arg::F32(spec.eps as f32),
        ];
        let grid = Grid::blocks(parts, row_threads(spec.dim));
        launch(self, &NORM, &entry::<T>("rms_norm_backward"), grid, &args)?;
        self.column_sum(&dw_part, parts, grads.dweight)
    }

    /// Backward of [`GpuDevice::layer_norm`] (without residual) from x and dL/dy.
    pub fn layer_norm_backward<T: FloatElem>(
        &self,
        x: &DeviceBuffer<T>,
        weight: &DeviceBuffer<T>,
        g: &DeviceBuffer<T>,
        grads: LayerNormGrads<'_, T>,
        spec: NormSpec,
    ) -> Result<()> {
        let op = "layer_norm_backward";
        let n = spec.numel(op)?;
        need(self, op, "input", x, n)?;
        need(self, op, "weight", weight, spec.dim)?;
        need(self, op, "gradient", g, n)?;
        need(self, op, "dx", grads.dx, n)?;
        need(self, op, "dweight", grads.dweight, spec.dim)?;
        need(self, op, "dbias", grads.dbias, spec.dim)?;
        if spec.dim == 0 {
            return Ok(());
        }
        let parts = self.partial_blocks(spec.rows);
        let dw_part = self.alloc::<f32>(parts * spec.dim)?;
        let db_part = self.alloc::<f32>(parts * spec.dim)?;
        let args = [
            Arg::buf(x),
            Arg::buf(weight),
            Arg::buf(g),
            Arg::buf(grads.dx),
            Arg::buf(&dw_part),
            Arg::buf(&db_part),
            Arg::size(spec.rows),
            Arg::size(spec.dim),
            Arg::F32(spec.eps as f32),
        ];
        let grid = Grid::blocks(parts, row_threads(spec.dim));
        launch(self, &NORM, &entry::<T>("layer_norm_backward"), grid, &args)?;
        self.column_sum(&dw_part, parts, grads.dweight)?;
        self.column_sum(&db_part, parts, grads.dbias)
    }

    /// Errors unless the groups tile the rows.
    fn check_groups(op: &'static str, spec: &NormSpec) -> Result<()> {
        if spec.group == 0 || !spec.dim.is_multiple_of(spec.group) {
            return Err(CudaError::shape(
                op,
                format!(
                    "width {} is not a multiple of group size {}",
                    spec.dim, spec.group
                ),
            ));
        }
        Ok(())
    }

    /// Mamba-2's gated RMSNorm: `rms_norm_per_group(x · silu(z)) · weight`, groups of
    /// `spec.group` features.
    pub fn gated_rms_norm<T: FloatElem>(
        &self,
        x: &DeviceBuffer<T>,
        z: &DeviceBuffer<T>,
        weight: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
        spec: NormSpec,
    ) -> Result<()> {
        let op = "gated_rms_norm";
        Self::check_groups(op, &spec)?;
        let n = spec.numel(op)?;
        need(self, op, "input", x, n)?;
        need(self, op, "gate", z, n)?;
        need(self, op, "weight", weight, spec.dim)?;
        need(self, op, "output", y, n)?;
        if n == 0 {
            return Ok(());
        }
        let items = spec.rows * (spec.dim / spec.group);
        let args = [
            Arg::buf(x),
            Arg::buf(z),
            Arg::buf(weight),
            Arg::buf(y),
            Arg::size(spec.rows),
            Arg::size(spec.dim),
            Arg::size(spec.group),
            Arg::F32(spec.eps as f32),
        ];
        launch(
            self,
            &GATED_NORM,
            &entry::<T>("gated_rms_norm"),
            Grid::rows(items, spec.group),
            &args,
        )
    }

    /// Backward of [`GpuDevice::gated_rms_norm`] from x, z and dL/dy.
    pub fn gated_rms_norm_backward<T: FloatElem>(
        &self,
        (x, z): (&DeviceBuffer<T>, &DeviceBuffer<T>),
        weight: &DeviceBuffer<T>,
        g: &DeviceBuffer<T>,
        grads: GatedNormGrads<'_, T>,
        spec: NormSpec,
    ) -> Result<()> {
        let op = "gated_rms_norm_backward";
        Self::check_groups(op, &spec)?;
        let n = spec.numel(op)?;
        need(self, op, "input", x, n)?;
        need(self, op, "gate", z, n)?;
        need(self, op, "weight", weight, spec.dim)?;
        need(self, op, "gradient", g, n)?;
        need(self, op, "dx", grads.dx, n)?;
        need(self, op, "dz", grads.dz, n)?;
        need(self, op, "dweight", grads.dweight, spec.dim)?;
        if spec.dim == 0 {
            return Ok(());
        }
        let items = spec.rows * (spec.dim / spec.group);
        let parts = self.partial_blocks(items);
        let dw_part = self.alloc::<f32>(parts * spec.dim)?;
        let args = [
            Arg::buf(x),
            Arg::buf(z),
            Arg::buf(weight),
            Arg::buf(g),
            Arg::buf(grads.dx),
            Arg::buf(grads.dz),
            Arg::buf(&dw_part),
            Arg::size(spec.rows),
            Arg::size(spec.dim),
            Arg::size(spec.group),
            Arg::F32(spec.eps as f32),
        ];
        let grid = Grid::blocks(parts, row_threads(spec.group));
        launch(
            self,
            &GATED_NORM,
            &entry::<T>("gated_rms_norm_backward"),
            grid,
            &args,
        )?;
        self.column_sum(&dw_part, parts, grads.dweight)
    }
}
