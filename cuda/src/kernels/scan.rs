//! The Mamba-1 fused selective scan (selective_scan.cu): forward, backward and the one-token
//! decoding step.

use super::{need, need_optional_grads, product, sum_parts};
use crate::compile::SELECTIVE_SCAN;
use crate::device::{DeviceBuffer, FloatElem, GpuDevice};
use crate::error::{CudaError, Result};
use crate::launch::{entry, launch, Arg, Grid};

/// Steps per chunk of the selective scan (`SCAN_CHUNK` in selective_scan.cu): the forward pass
/// saves the state entering every chunk, the backward pass recomputes within a chunk.
pub const SCAN_CHUNK: usize = 2048;
/// The largest state size (N) the selective-scan kernels take (`SCAN_MAX_STATE`).
pub const SCAN_MAX_STATE: usize = 256;
/// Threads per block of the forward kernel (one block per row (b, d)) and of the backward
/// kernel (one block per group of rows of one batch entry).
const FWD_THREADS: u32 = 128;
const BWD_THREADS: u32 = 256;
/// About how many blocks the backward kernel runs: the channels of each batch entry are cut into
/// `BWD_BLOCKS / batch` groups (at least one, at most one channel each), each summing its rows'
/// shares of dB and dC in order.
const BWD_BLOCKS: usize = 512;
/// Threads per block of the decoding step (one warp per row).
const STEP_THREADS: u32 = 128;

/// The groups of channels per batch entry in the backward kernel: it keeps f32 partial sums of
/// dB and dC `[groups, batch, state, len]`.
pub fn scan_backward_groups(batch: usize, dim: usize) -> usize {
    BWD_BLOCKS.div_ceil(batch.max(1)).clamp(1, dim.max(1))
}

/// The shape of a selective scan: u `[batch, dim, len]`, A `[dim, state]`, B and C
/// `[batch, state, len]`, and whether dt goes through softplus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanSpec {
    /// Batch size B.
    pub batch: usize,
    /// Channels D (d_inner).
    pub dim: usize,
    /// Sequence length L (ignored by the decoding step).
    pub len: usize,
    /// State size N (at most [`SCAN_MAX_STATE`]).
    pub state: usize,
    /// dt = softplus(delta + delta_bias) when set, else delta + delta_bias.
    pub softplus: bool,
}

impl ScanSpec {
    /// Chunks of [`SCAN_CHUNK`] steps the sequence is cut into.
    pub fn chunks(&self) -> usize {
        self.len.div_ceil(SCAN_CHUNK)
    }

    /// Elements of the saved chunk states `[B, D, n_chunks, N]` (f32).
    pub fn chunk_state_len(&self) -> usize {
        self.batch * self.dim * self.chunks() * self.state
    }

    /// Checks the state size; returns (B·D·L, B·D, B·N·L).
    fn check(&self, op: &'static str) -> Result<(usize, usize, usize)> {
        if self.state > SCAN_MAX_STATE {
            return Err(CudaError::shape(
                op,
                format!("state size {} exceeds {SCAN_MAX_STATE}", self.state),
            ));
        }
        product(
            op,
            "[B, D, L, N]",
            &[self.batch, self.dim, self.len, self.state.max(1)],
        )?;
        Ok((
            self.batch * self.dim * self.len,
            self.batch * self.dim,
            self.batch * self.state * self.len,
        ))
    }

    /// The trailing shape arguments B, D, L, N, softplus.
    fn args(&self) -> [Arg; 5] {
        [
            Arg::size(self.batch),
            Arg::size(self.dim),
            Arg::size(self.len),
            Arg::size(self.state),
            Arg::flag(self.softplus),
        ]
    }
}

/// The operands of a selective scan, contiguous: u, delta, z `[B, D, L]`, A `[D, N]`, B and C
/// `[B, N, L]`, D and delta_bias `[D]`. At L = 1 they are the operands of one decoding step
/// (u = x_t and delta = dt_t `[B, D]`, B_t and C_t `[B, N]`).
#[derive(Clone, Copy)]
pub struct ScanInputs<'a, T: FloatElem> {
    /// The input u.
    pub u: &'a DeviceBuffer<T>,
    /// The step before bias and softplus.
    pub delta: &'a DeviceBuffer<T>,
    /// The (negative) state matrix A.
    pub a: &'a DeviceBuffer<T>,
    /// The input projection B.
    pub b: &'a DeviceBuffer<T>,
    /// The output projection C.
    pub c: &'a DeviceBuffer<T>,
    /// The skip D, if any.
    pub d_skip: Option<&'a DeviceBuffer<T>>,
    /// The gate z, if any (y is multiplied by silu(z)).
    pub z: Option<&'a DeviceBuffer<T>>,
    /// The bias added to delta, if any.
    pub delta_bias: Option<&'a DeviceBuffer<T>>,
}

impl<T: FloatElem> ScanInputs<'_, T> {
    /// Checks every operand's device and length against `spec`.
    fn check(&self, dev: &GpuDevice, op: &'static str, spec: &ScanSpec) -> Result<()> {
        let (seq, _, bc) = spec.check(op)?;
        need(dev, op, "u", self.u, seq)?;
        need(dev, op, "delta", self.delta, seq)?;
        need(dev, op, "A", self.a, spec.dim * spec.state)?;
        need(dev, op, "B", self.b, bc)?;
        need(dev, op, "C", self.c, bc)?;
        if let Some(d) = self.d_skip {
            need(dev, op, "D", d, spec.dim)?;
        }
        if let Some(z) = self.z {
            need(dev, op, "z", z, seq)?;
        }
        if let Some(bias) = self.delta_bias {
            need(dev, op, "delta_bias", bias, spec.dim)?;
        }
        Ok(())
    }

    /// The eight operand pointers in kernel order (u, delta, A, B, C, D, z, delta_bias).
    fn args(&self) -> [Arg; 8] {
        [
            Arg::buf(self.u),
            Arg::buf(self.delta),
            Arg::buf(self.a),
            Arg::buf(self.b),
            Arg::buf(self.c),
            Arg::opt(self.d_skip),
            Arg::opt(self.z),
            Arg::opt(self.delta_bias),
        ]
    }
}

/// Outputs of the selective-scan backward, shaped like their inputs; an optional gradient is
/// computed when its buffer is given (its input must then have been given too).
pub struct ScanGrads<'a, T: FloatElem> {
    /// dL/du `[B, D, L]`.
    pub du: &'a mut DeviceBuffer<T>,
    /// dL/d(delta) `[B, D, L]`.
    pub ddelta: &'a mut DeviceBuffer<T>,
    /// dL/dA `[D, N]`.
    pub da: &'a mut DeviceBuffer<T>,
    /// dL/dB `[B, N, L]`.
    pub db: &'a mut DeviceBuffer<T>,
    /// dL/dC `[B, N, L]`.
    pub dc: &'a mut DeviceBuffer<T>,
    /// dL/dD `[D]`.
    pub dd: Option<&'a mut DeviceBuffer<T>>,
    /// dL/dz `[B, D, L]` (needs z).
    pub dz: Option<&'a mut DeviceBuffer<T>>,
    /// dL/d(delta_bias) `[D]`.
    pub ddelta_bias: Option<&'a mut DeviceBuffer<T>>,
}

impl GpuDevice {
    /// The selective scan (see `Tensor::selective_scan`): writes y `[B, D, L]` and the last state
    /// `[B, D, N]` (rounded to T), and, when given, the f32 state entering every chunk of
    /// [`SCAN_CHUNK`] steps `[B, D, n_chunks, N]` (see [`ScanSpec::chunk_state_len`]).
    pub fn selective_scan<T: FloatElem>(
        &self,
        inputs: &ScanInputs<'_, T>,
        y: &mut DeviceBuffer<T>,
        last_state: &mut DeviceBuffer<T>,
        chunk_states: Option<&mut DeviceBuffer<f32>>,
        spec: ScanSpec,
    ) -> Result<()> {
        let op = "selective_scan";
        inputs.check(self, op, &spec)?;
        let (seq, rows, _) = spec.check(op)?;
        need(self, op, "y", y, seq)?;
        need(self, op, "last state", last_state, rows * spec.state)?;
        if let Some(s) = chunk_states.as_deref() {
            need(self, op, "chunk states", s, spec.chunk_state_len())?;
        }
        self.scan_forward_kernel(
            inputs,
            Arg::buf(y),
            Arg::buf(last_state),
            Arg::Ptr(chunk_states.map_or(0, |s| s.device_ptr())),
            &spec,
        )
    }

    /// Queues the forward kernel (outputs already checked; null pointers are skipped).
    fn scan_forward_kernel<T: FloatElem>(
        &self,
        inputs: &ScanInputs<'_, T>,
        y: Arg,
        last: Arg,
        chunk_states: Arg,
        spec: &ScanSpec,
    ) -> Result<()> {
        let rows = spec.batch * spec.dim;
        if rows == 0 {
            return Ok(());
        }
        let mut args = inputs.args().to_vec();
        args.extend([y, last, chunk_states]);
        args.extend(spec.args());
        let grid = Grid::blocks(rows, FWD_THREADS);
        launch(
            self,
            &SELECTIVE_SCAN,
            &entry::<T>("selective_scan_fwd"),
            grid,
            &args,
        )
    }

    /// Backward of [`GpuDevice::selective_scan`] given dL/dy `grad` `[B, D, L]`. Reruns the
    /// forward kernel to save the chunk states, then one reverse pass per row. Every sum over
    /// channels is taken in a fixed order (dB and dC through f32 partials per group of channels,
    /// `[groups, B, N, L]`), so the result is bitwise reproducible for given shapes.
    pub fn selective_scan_backward<T: FloatElem>(
        &self,
        inputs: &ScanInputs<'_, T>,
        grad: &DeviceBuffer<T>,
        grads: ScanGrads<'_, T>,
        spec: ScanSpec,
    ) -> Result<()> {
        let op = "selective_scan_backward";
        inputs.check(self, op, &spec)?;
        let (seq, rows, bc) = spec.check(op)?;
        need(self, op, "gradient", grad, seq)?;
        need(self, op, "du", grads.du, seq)?;
        need(self, op, "ddelta", grads.ddelta, seq)?;
        need(self, op, "dA", grads.da, spec.dim * spec.state)?;
        need(self, op, "dB", grads.db, bc)?;
        need(self, op, "dC", grads.dc, bc)?;
        need_optional_grads(
            self,
            op,
            &[
                ("dD", grads.dd.as_deref(), spec.dim, inputs.d_skip.is_some()),
                ("dz", grads.dz.as_deref(), seq, inputs.z.is_some()),
                (
                    "ddelta_bias",
                    grads.ddelta_bias.as_deref(),
                    spec.dim,
                    inputs.delta_bias.is_some(),
                ),
            ],
        )?;
        let chunk_states = self.alloc::<f32>(spec.chunk_state_len())?;
        self.scan_forward_kernel(inputs, Arg::Ptr(0), Arg::Ptr(0), Arg::buf(&chunk_states), &spec)?;
        let groups = scan_backward_groups(spec.batch, spec.dim);
        let (dbf, dcf) = (self.zeros::<f32>(groups * bc)?, self.zeros::<f32>(groups * bc)?);
        let da_part = self.alloc::<f32>(rows * spec.state)?;
        let (dd_part, dbias_part) = (self.alloc::<f32>(rows)?, self.alloc::<f32>(rows)?);
        let mut args = inputs.args().to_vec();
        args.extend([
            Arg::buf(grad),
            Arg::buf(&chunk_states),
            Arg::buf(grads.du),
            Arg::buf(grads.ddelta),
            Arg::opt(grads.dz.as_deref()),
            Arg::buf(&da_part),
            Arg::buf(&dd_part),
            Arg::buf(&dbias_part),
            Arg::buf(&dbf),
            Arg::buf(&dcf),
        ]);
        args.extend(spec.args());
        args.push(Arg::size(groups));
        if rows > 0 {
            let grid = Grid::blocks(spec.batch * groups, BWD_THREADS);
            launch(
                self,
                &SELECTIVE_SCAN,
                &entry::<T>("selective_scan_bwd"),
                grid,
                &args,
            )?;
        }
        // With no rows the partial sums are empty and every reduced gradient is zero.
        sum_parts(self, &SELECTIVE_SCAN, &da_part, grads.da, spec.batch)?;
        sum_parts(self, &SELECTIVE_SCAN, &dbf, grads.db, groups)?;
        sum_parts(self, &SELECTIVE_SCAN, &dcf, grads.dc, groups)?;
        if let Some(dd) = grads.dd {
            sum_parts(self, &SELECTIVE_SCAN, &dd_part, dd, spec.batch)?;
        }
        if let Some(dbias) = grads.ddelta_bias {
            sum_parts(self, &SELECTIVE_SCAN, &dbias_part, dbias, spec.batch)?;
        }
        Ok(())
    }

    /// One decoding step of the selective scan from `state` `[B, D, N]`, with `inputs` at
    /// L = 1 (see [`ScanInputs`]): writes y `[B, D]` and the new state `[B, D, N]` (rounded to
    /// T). `spec.len` is ignored.
    pub fn selective_state_update<T: FloatElem>(
        &self,
        state: &DeviceBuffer<T>,
        inputs: &ScanInputs<'_, T>,
        y: &mut DeviceBuffer<T>,
        new_state: &mut DeviceBuffer<T>,
        spec: ScanSpec,
    ) -> Result<()> {
        let op = "selective_state_update";
        let spec = ScanSpec { len: 1, ..spec };
        inputs.check(self, op, &spec)?;
        let rows = spec.batch * spec.dim;
        need(self, op, "state", state, rows * spec.state)?;
        need(self, op, "new state", new_state, rows * spec.state)?;
        need(self, op, "y", y, rows)?;
        if rows == 0 {
            return Ok(());
        }
        let mut args = vec![Arg::buf(state)];
        args.extend(inputs.args());
        args.extend([
            Arg::buf(y),
            Arg::buf(new_state),
            Arg::size(spec.batch),
            Arg::size(spec.dim),
            Arg::size(spec.state),
            Arg::flag(spec.softplus),
        ]);
        let grid = Grid::blocks(rows.div_ceil((STEP_THREADS / 32) as usize), STEP_THREADS);
        launch(
            self,
            &SELECTIVE_SCAN,
            &entry::<T>("selective_state_update"),
            grid,
            &args,
        )
    }
}
