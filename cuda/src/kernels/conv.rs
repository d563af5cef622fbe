//! Causal depthwise conv1d (+ SiLU): forward, backward and the single decoding step.

use super::{need, product};
use crate::compile::CONV1D;
use crate::device::{DeviceBuffer, FloatElem, GpuDevice};
use crate::error::{CudaError, Result};
use crate::launch::{entry, launch, Arg, Grid};

/// Widest kernel the parameter backward handles (`MAX_CONV_K` in conv1d.cu).
pub const MAX_CONV_KERNEL: usize = 16;
/// Threads per block of the parameter backward (one block per channel).
const PARAM_THREADS: u32 = 256;

/// The shape of a causal depthwise convolution over x `[batch, channels, len]` with a weight
/// `[channels, kernel]`, and whether SiLU follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    /// Batch size B.
    pub batch: usize,
    /// Channels C.
    pub channels: usize,
    /// Sequence length L (1 for the decoding step).
    pub len: usize,
    /// Kernel width K (> 0).
    pub kernel: usize,
    /// Whether SiLU is applied to the output.
    pub silu: bool,
}

impl ConvSpec {
    /// Checks the kernel width; returns B·C·L.
    fn check(&self, op: &'static str) -> Result<usize> {
        if self.kernel == 0 || self.kernel > MAX_CONV_KERNEL {
            return Err(CudaError::shape(
                op,
                format!("kernel width {} not in 1..={MAX_CONV_KERNEL}", self.kernel),
            ));
        }
        product(op, "[B, C, L]", &[self.batch, self.channels, self.len])
    }

    /// The leading shape arguments B, C, L, K.
    fn args(&self) -> [Arg; 4] {
        [
            Arg::size(self.batch),
            Arg::size(self.channels),
            Arg::size(self.len),
            Arg::size(self.kernel),
        ]
    }
}

/// Outputs of the conv1d backward.
pub struct ConvGrads<'a, T: FloatElem> {
    /// dL/dx `[B, C, L]`.
    pub dx: &'a mut DeviceBuffer<T>,
    /// dL/dweight `[C, K]`.
    pub dweight: &'a mut DeviceBuffer<T>,
    /// dL/dbias `[C]` (Σ of the pre-activation gradient; meaningful with a bias).
    pub dbias: &'a mut DeviceBuffer<T>,
}

impl GpuDevice {
    /// Checks weight and optional bias against the spec.
    fn check_conv_params<T: FloatElem>(
        &self,
        op: &'static str,
        weight: &DeviceBuffer<T>,
        bias: Option<&DeviceBuffer<T>>,
        spec: &ConvSpec,
    ) -> Result<()> {
        need(self, op, "weight", weight, spec.channels * spec.kernel)?;
        if let Some(b) = bias {
            need(self, op, "bias", b, spec.channels)?;
        }
        Ok(())
    }

    /// `y[b,c,t] = bias[c] + Σ_k weight[c,k] · x[b,c,t-(K-1)+k]` (x zero before the start),
    /// then SiLU if `spec.silu`.
    pub fn conv1d<T: FloatElem>(
        &self,
        x: &DeviceBuffer<T>,
        weight: &DeviceBuffer<T>,
        bias: Option<&DeviceBuffer<T>>,
        y: &mut DeviceBuffer<T>,
        spec: ConvSpec,
    ) -> Result<()> {
        let n = spec.check("conv1d")?;
        need(self, "conv1d", "input", x, n)?;
        need(self, "conv1d", "output", y, n)?;
        self.check_conv_params("conv1d", weight, bias, &spec)?;
        if n == 0 {
            return Ok(());
        }
        let [b, c, l, k] = spec.args();
        let args = [
            Arg::buf(x),
            Arg::buf(weight),
            Arg::opt(bias),
            Arg::buf(y),
            b,
            c,
            l,
            k,
            Arg::flag(spec.silu),
        ];
        launch(
            self,
            &CONV1D,
            &entry::<T>("conv1d"),
            Grid::elementwise(self, n),
            &args,
        )
    }

    /// Backward of [`GpuDevice::conv1d`] from x and dL/dy; with SiLU the pre-activation is
    /// recomputed (which needs the forward's `bias`).
    pub fn conv1d_backward<T: FloatElem>(
        &self,
        (x, weight, bias): (&DeviceBuffer<T>, &DeviceBuffer<T>, Option<&DeviceBuffer<T>>),
        g: &DeviceBuffer<T>,
        grads: ConvGrads<'_, T>,
        spec: ConvSpec,
    ) -> Result<()> {
        let op = "conv1d_backward";
        let n = spec.check(op)?;
        need(self, op, "input", x, n)?;
        need(self, op, "gradient", g, n)?;
        need(self, op, "dx", grads.dx, n)?;
        need(self, op, "dweight", grads.dweight, spec.channels * spec.kernel)?;
        need(self, op, "dbias", grads.dbias, spec.channels)?;
        self.check_conv_params(op, weight, bias, &spec)?;
        if spec.channels == 0 {
            return Ok(());
        }
        let shape = spec.args();
        // With SiLU: the gradient of the pre-activation first.
        let pre_grad;
        let g = if spec.silu && n > 0 {
            pre_grad = self.alloc::<T>(n)?;
            let mut args = vec![
                Arg::buf(x),
                Arg::buf(weight),
                Arg::opt(bias),
                Arg::buf(g),
                Arg::buf(&pre_grad),
            ];
            args.extend(shape);
            launch(
                self,
                &CONV1D,
                &entry::<T>("conv1d_silu_grad"),
                Grid::elementwise(self, n),
                &args,
            )?;
            &pre_grad
        } else {
            g
        };
        if n > 0 {
            let mut args = vec![Arg::buf(weight), Arg::buf(g), Arg::buf(grads.dx)];
            args.extend(shape);
            launch(
                self,
                &CONV1D,
                &entry::<T>("conv1d_backward_dx"),
                Grid::elementwise(self, n),
                &args,
            )?;
        }
        let mut args = vec![
            Arg::buf(x),
            Arg::buf(g),
            Arg::buf(grads.dweight),
            Arg::buf(grads.dbias),
        ];
        args.extend(shape);
        let grid = Grid::blocks(spec.channels, PARAM_THREADS);
        launch(self, &CONV1D, &entry::<T>("conv1d_backward_params"), grid, &args)
    }

    /// One decoding step: `state` `[B, C, K-1]` holds the previous K-1 inputs; with `x` `[B, C]`
    /// the output `y` `[B, C]` is `bias + Σ weight · [state, x]` (then SiLU if `spec.silu`),
    /// computed in f32 and rounded once, and `state` shifts to end with `x`. `spec.len` is
    /// ignored.
    pub fn conv1d_update<T: FloatElem>(
        &self,
        state: &mut DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        weight: &DeviceBuffer<T>,
        bias: Option<&DeviceBuffer<T>>,
        y: &mut DeviceBuffer<T>,
        spec: ConvSpec,
    ) -> Result<()> {
        let op = "conv1d_update";
        let rows = ConvSpec { len: 1, ..spec }.check(op)?;
        need(self, op, "state", state, rows * (spec.kernel - 1))?;
        need(self, op, "input", x, rows)?;
        need(self, op, "output", y, rows)?;
        self.check_conv_params(op, weight, bias, &spec)?;
        if rows == 0 {
            return Ok(());
        }
        let args = [
            Arg::buf(state),
            Arg::buf(x),
            Arg::buf(weight),
            Arg::opt(bias),
            Arg::buf(y),
            Arg::size(spec.batch),
            Arg::size(spec.channels),
            Arg::size(spec.kernel),
            Arg::flag(spec.silu),
        ];
        launch(
            self,
            &CONV1D,
            &entry::<T>("conv1d_update"),
            Grid::elementwise(self, rows),
            &args,
        )
    }
}
