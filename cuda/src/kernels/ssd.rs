//! The Mamba-2 SSD chunk scan (ssd.cu): forward, backward and the one-token decoding step.
//!
//! The chunked algorithm runs as a sequence of kernels over f32 scratch buffers (see the header
//! of ssd.cu): chunk cumulative sums of dt·A, the chunk products C·Bᵀ, each chunk's own state,
//! the state passing between chunks, then the outputs. The matrix products run with
//! shared-memory tiles (bf16's forward products on the tensor cores). No kernel uses atomics, so
//! the backward is bitwise reproducible.

use super::{need, need_optional_grads, product, sum_parts};
use crate::compile::SSD;
use crate::device::{DeviceBuffer, FloatElem, GpuDevice};
use crate::error::{CudaError, Result};
use crate::launch::{entry, launch, Arg, Grid};

/// Rows and columns of the kernels' output tiles (`SSD_TILE`).
const TILE: usize = 64;
/// Threads per block of the tiled kernels (`SSD_THREADS`).
const TILE_THREADS: u32 = 256;
/// Threads per block of the per-thread kernels.
const THREADS: u32 = 256;
/// The most blocks a tiled launch may need (its kernels do not loop over blocks).
const MAX_TILE_BLOCKS: usize = (1 << 31) - 1;

/// The shape of an SSD scan: x `[batch, len, heads, head_dim]`, dt `[batch, len, heads]`, B and
/// C `[batch, len, groups, state]`, states `[batch, heads, head_dim, state]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SsdSpec {
    /// Batch size B.
    pub batch: usize,
    /// Sequence length L (ignored by the decoding step).
    pub len: usize,
    /// Heads H.
    pub heads: usize,
    /// Head dimension P.
    pub head_dim: usize,
    /// Groups G of B and C (divides H; head h reads group h / (H / G)).
    pub groups: usize,
    /// State size N.
    pub state: usize,
    /// Steps per chunk (> 0; ignored by the decoding step).
    pub chunk: usize,
    /// dt = softplus(dt + dt_bias) when set, else dt + dt_bias.
    pub softplus: bool,
}

impl SsdSpec {
    /// Checks the head/group split and the chunk size and that the sizes do not overflow.
    fn check(&self, op: &'static str) -> Result<()> {
        if self.groups == 0 || !self.heads.is_multiple_of(self.groups) {
            return Err(CudaError::shape(
                op,
                format!("{} heads do not split into {} groups", self.heads, self.groups),
            ));
        }
        if self.chunk == 0 {
            return Err(CudaError::shape(op, "chunk size 0"));
        }
        let (b, l, h, p, g, n) = (
            self.batch,
            self.len,
            self.heads,
            self.head_dim,
            self.groups,
            self.state,
        );
        product(op, "[B, L, H, P]", &[b, l.max(1), h, p, n.max(1)])?;
        product(op, "[B, L, G, N]", &[b, l, g, n])?;
        product(op, "[B, L, Q, H]", &[b, l, self.chunk.min(l), h.max(g)])?;
        Ok(())
    }

    /// The chunk actually used (at most L) and the number of chunks.
    fn chunking(&self) -> (usize, usize) {
        let q = self.chunk.min(self.len).max(1);
        (q, self.len.div_ceil(q))
    }

    /// The shape arguments of the kernels (`SSD_DIMS_PARAMS`).
    fn dims(&self) -> [Arg; 8] {
        let (q, chunks) = self.chunking();
        [
            Arg::size(self.batch),
            Arg::size(self.len),
            Arg::size(self.heads),
            Arg::size(self.head_dim),
            Arg::size(self.groups),
            Arg::size(self.state),
            Arg::size(q),
            Arg::size(chunks),
        ]
    }

    /// Element counts: x, dt, B/C, states.
    fn sizes(&self) -> (usize, usize, usize, usize) {
        let (b, l, h, p, g, n) = (
            self.batch,
            self.len,
            self.heads,
            self.head_dim,
            self.groups,
            self.state,
        );
        (b * l * h * p, b * l * h, b * l * g * n, b * h * p * n)
    }
}

/// The operands of an SSD scan, contiguous: x `[B, L, H, P]`, dt `[B, L, H]`, A, D, dt_bias
/// `[H]`, B and C `[B, L, G, N]`, the initial state `[B, H, P, N]`. At L = 1 they are the operands
/// of one decoding step (x_t `[B, H, P]`, dt_t `[B, H]`, B_t and C_t `[B, G, N]`, the initial state
/// the state before the step).
#[derive(Clone, Copy)]
pub struct SsdInputs<'a, T: FloatElem> {
    /// The input x.
    pub x: &'a DeviceBuffer<T>,
    /// The step before bias and softplus.
    pub dt: &'a DeviceBuffer<T>,
    /// A per head.
    pub a: &'a DeviceBuffer<T>,
    /// B.
    pub b: &'a DeviceBuffer<T>,
    /// C.
    pub c: &'a DeviceBuffer<T>,
    /// The skip D, if any.
    pub d_skip: Option<&'a DeviceBuffer<T>>,
    /// The bias added to dt, if any.
    pub dt_bias: Option<&'a DeviceBuffer<T>>,
    /// The state before the first step, if any (else zero).
    pub initial: Option<&'a DeviceBuffer<T>>,
}

impl<T: FloatElem> SsdInputs<'_, T> {
    /// Checks every operand's device and length against `spec`.
    fn check(&self, dev: &GpuDevice, op: &'static str, spec: &SsdSpec) -> Result<()> {
        spec.check(op)?;
        let (xs, dts, bcs, states) = spec.sizes();
        need(dev, op, "x", self.x, xs)?;
        need(dev, op, "dt", self.dt, dts)?;
        need(dev, op, "A", self.a, spec.heads)?;
        need(dev, op, "B", self.b, bcs)?;
        need(dev, op, "C", self.c, bcs)?;
        for (what, buf, len) in [
            ("D", self.d_skip, spec.heads),
            ("dt_bias", self.dt_bias, spec.heads),
            ("initial state", self.initial, states),
        ] {
            if let Some(buf) = buf {
                need(dev, op, what, buf, len)?;
            }
        }
        Ok(())
    }
}

/// Outputs of the SSD backward, shaped like their inputs; an optional gradient is computed when
/// its buffer is given (its input must then have been given too).
pub struct SsdGradBuffers<'a, T: FloatElem> {
    /// dL/dx `[B, L, H, P]`.
    pub dx: &'a mut DeviceBuffer<T>,
    /// dL/d(dt) `[B, L, H]`.
    pub ddt: &'a mut DeviceBuffer<T>,
    /// dL/dA `[H]`.
    pub da: &'a mut DeviceBuffer<T>,
    /// dL/dB `[B, L, G, N]`.
    pub db: &'a mut DeviceBuffer<T>,
    /// dL/dC `[B, L, G, N]`.
    pub dc: &'a mut DeviceBuffer<T>,
    /// dL/dD `[H]`.
    pub dd: Option<&'a mut DeviceBuffer<T>>,
    /// dL/d(dt_bias) `[H]`.
    pub ddt_bias: Option<&'a mut DeviceBuffer<T>>,
    /// dL/d(initial state) `[B, H, P, N]`.
    pub dinitial: Option<&'a mut DeviceBuffer<T>>,
}

/// The forward pass's f32 scratch that the backward pass reuses.
struct Forward {
    /// dt after bias and softplus `[B, H, L]`.
    dts: DeviceBuffer<f32>,
    /// Within-chunk cumulative sums of dt·A `[B, H, L]`.
    cum: DeviceBuffer<f32>,
    /// C_i·B_j per (b, chunk, group) `[B, nc, G, Q, Q]`.
    cb: DeviceBuffer<f32>,
    /// The state entering each chunk `[B, nc, H, P, N]`.
    states: DeviceBuffer<f32>,
}

/// What `ssd_chunk_state` sums over each chunk (its `mode`).
#[derive(Clone, Copy, Debug)]
enum ChunkSum {
    /// The chunk's own state Σ_j exp(s_end − s_j) dt_j x_j ⊗ B_j (from x and B).
    States = 0,
    /// The output gradients' pull on the state entering the chunk, Σ_j exp(s_j) dy_j ⊗ C_j
    /// (from dy and C).
    OutputGrads = 1,
}

/// Tiles of `TILE` covering `n` (at least one).
fn tiles(n: usize) -> usize {
    n.div_ceil(TILE).max(1)
}

impl GpuDevice {
    /// A tiled launch of `blocks` blocks (an error past the grid limit).
    fn ssd_tiled(&self, op: &'static str, name: &str, blocks: usize, args: &[Arg]) -> Result<()> {
        if blocks > MAX_TILE_BLOCKS {
            return Err(CudaError::shape(
                op,
                format!("{blocks} blocks exceed the grid limit"),
            ));
        }
        launch(self, &SSD, name, Grid::blocks(blocks, TILE_THREADS), args)
    }

    /// `ssd_bmm`: `out[b, c, k, i, j] = U_i · V_j` (over the last axis, of length `len`) for
    /// j <= i within each chunk, with U and V `[B, L, count, len]`: C·B per group in the forward,
    /// dy·x per head in the backward. `out` is `[B, nc, count, Q, Q]`.
    #[allow(clippy::too_many_arguments)]
    fn ssd_chunk_products<T: FloatElem>(
        &self,
        op: &'static str,
        u: &DeviceBuffer<T>,
        v: &DeviceBuffer<T>,
        out: &mut DeviceBuffer<f32>,
        count: usize,
        len: usize,
        spec: &SsdSpec,
    ) -> Result<()> {
        let (q, nc) = spec.chunking();
        let mut args = vec![
            Arg::buf(u),
            Arg::buf(v),
            Arg::buf(out),
            Arg::size(count),
            Arg::size(len),
        ];
        args.extend(spec.dims());
        let blocks = spec.batch * nc * count * tiles(q) * tiles(q);
        self.ssd_tiled(op, &entry::<T>("ssd_bmm"), blocks, &args)
    }

    /// `ssd_chunk_state`: per (b, chunk, head), `out[p, n] = Σ_j w_j X_j[p] Y_j[n]` over the
    /// chunk's steps, with X `[B, L, H, P]`, Y `[B, L, G, N]`, the weights of `sums` and
    /// `scratch` = (dt, cumulative sums of dt·A) `[B, H, L]`. `out` is `[B, nc, H, P, N]`.
    #[allow(clippy::too_many_arguments)]
    fn ssd_chunk_sums<T: FloatElem>(
        &self,
        op: &'static str,
        sums: ChunkSum,
        x: &DeviceBuffer<T>,
        y: &DeviceBuffer<T>,
        scratch: (&DeviceBuffer<f32>, &DeviceBuffer<f32>),
        out: &mut DeviceBuffer<f32>,
        spec: &SsdSpec,
    ) -> Result<()> {
        let (_, nc) = spec.chunking();
        let (p, n) = (spec.head_dim, spec.state);
        if p * n == 0 {
            return Ok(());
        }
        let (dts, cum) = scratch;
        let mut args = vec![
            Arg::buf(x),
            Arg::buf(y),
            Arg::buf(dts),
            Arg::buf(cum),
            Arg::buf(out),
        ];
        args.extend(spec.dims());
        args.push(Arg::I32(sums as i32));
        let blocks = spec.batch * nc * spec.heads * tiles(p) * tiles(n);
        self.ssd_tiled(op, &entry::<T>("ssd_chunk_state"), blocks, &args)
    }

    /// The forward kernels up to the state passing (L > 0, checked inputs); writes the final state.
    fn ssd_forward_states<T: FloatElem>(
        &self,
        op: &'static str,
        inputs: &SsdInputs<'_, T>,
        final_state: &mut DeviceBuffer<T>,
        spec: &SsdSpec,
    ) -> Result<Forward> {
        let (b, h, p, g, n) = (spec.batch, spec.heads, spec.head_dim, spec.groups, spec.state);
        let (q, nc) = spec.chunking();
        let dims = spec.dims();
        let (dts, cum) = (
            self.alloc::<f32>(b * h * spec.len)?,
            self.alloc::<f32>(b * h * spec.len)?,
        );
        let mut args = vec![Arg::buf(inputs.dt), Arg::buf(inputs.a), Arg::opt(inputs.dt_bias)];
        args.extend([Arg::buf(&dts), Arg::buf(&cum)]);
        args.extend(dims);
        args.push(Arg::flag(spec.softplus));
        let grid = Grid::blocks((b * nc * h).div_ceil(THREADS as usize), THREADS);
        launch(self, &SSD, &entry::<T>("ssd_cumsum"), grid, &args)?;

        let mut cb = self.alloc::<f32>(b * nc * g * q * q)?;
        self.ssd_chunk_products(op, inputs.c, inputs.b, &mut cb, g, n, spec)?;

        let mut states = self.alloc::<f32>(b * nc * h * p * n)?;
        let sums = ChunkSum::States;
        self.ssd_chunk_sums(op, sums, inputs.x, inputs.b, (&dts, &cum), &mut states, spec)?;

        let mut args = vec![
            Arg::buf(&states),
            Arg::buf(&cum),
            Arg::opt(inputs.initial),
            Arg::buf(final_state),
        ];
        args.extend(dims);
        let pn = b * h * p * n;
        if pn > 0 {
            launch(
                self,
                &SSD,
                &entry::<T>("ssd_state_pass"),
                Grid::elementwise(self, pn),
                &args,
            )?;
        }
        Ok(Forward { dts, cum, cb, states })
    }

    /// The output kernel: `mode` 0 writes y, 1 adds dy·(y − D x) to `ydot` `[B, L, H]`.
    #[allow(clippy::too_many_arguments)]
    fn ssd_output<T: FloatElem>(
        &self,
        op: &'static str,
        inputs: &SsdInputs<'_, T>,
        fwd: &Forward,
        y: Arg,
        dy: Arg,
        ydot: Arg,
        spec: &SsdSpec,
    ) -> Result<()> {
        let (q, nc) = spec.chunking();
        let (b, h, p) = (spec.batch, spec.heads, spec.head_dim);
        let mode = if matches!(ydot, Arg::Ptr(0)) { 0 } else { 1 };
        let mut args = vec![
            Arg::buf(inputs.x),
            Arg::buf(inputs.c),
            Arg::opt(inputs.d_skip),
            Arg::buf(&fwd.dts),
            Arg::buf(&fwd.cum),
            Arg::buf(&fwd.states),
            Arg::buf(&fwd.cb),
            y,
            dy,
            ydot,
        ];
        args.extend(spec.dims());
        args.push(Arg::I32(mode));
        self.ssd_tiled(
            op,
            &entry::<T>("ssd_chunk_out"),
            b * nc * h * tiles(q) * tiles(p),
            &args,
        )
    }

    /// The SSD chunk scan (see `Tensor::ssd_scan`): writes y `[B, L, H, P]` and the final state
    /// `[B, H, P, N]`, both rounded to T.
    pub fn ssd_scan<T: FloatElem>(
        &self,
        inputs: &SsdInputs<'_, T>,
        y: &mut DeviceBuffer<T>,
        final_state: &mut DeviceBuffer<T>,
        spec: SsdSpec,
    ) -> Result<()> {
        let op = "ssd_scan";
        inputs.check(self, op, &spec)?;
        let (xs, _, _, states) = spec.sizes();
        need(self, op, "y", y, xs)?;
        need(self, op, "final state", final_state, states)?;
        if spec.len == 0 || spec.batch * spec.heads == 0 {
            return match inputs.initial {
                Some(init) => self.copy(init, final_state),
                None => self.fill(final_state, T::default()),
            };
        }
        let fwd = self.ssd_forward_states(op, inputs, final_state, &spec)?;
        if xs == 0 {
            return Ok(());
        }
        self.ssd_output(op, inputs, &fwd, Arg::buf(y), Arg::Ptr(0), Arg::Ptr(0), &spec)
    }

    /// Backward of [`GpuDevice::ssd_scan`] given dL/dy `grad` `[B, L, H, P]` (the final state
    /// gets no gradient). Recomputes the forward scratch, then runs the chunked backward (see
    /// ssd.cu). Every sum across blocks is taken in a fixed order (no atomics), so the result is
    /// bitwise reproducible for given shapes.
    pub fn ssd_scan_backward<T: FloatElem>(
        &self,
        inputs: &SsdInputs<'_, T>,
        grad: &DeviceBuffer<T>,
        grads: SsdGradBuffers<'_, T>,
        spec: SsdSpec,
    ) -> Result<()> {
        let op = "ssd_scan_backward";
        inputs.check(self, op, &spec)?;
        let (xs, dts_len, bcs, states) = spec.sizes();
        need(self, op, "gradient", grad, xs)?;
        need(self, op, "dx", grads.dx, xs)?;
        need(self, op, "ddt", grads.ddt, dts_len)?;
        need(self, op, "dA", grads.da, spec.heads)?;
        need(self, op, "dB", grads.db, bcs)?;
        need(self, op, "dC", grads.dc, bcs)?;
        need_optional_grads(
            self,
            op,
            &[
                ("dD", grads.dd.as_deref(), spec.heads, inputs.d_skip.is_some()),
                (
                    "ddt_bias",
                    grads.ddt_bias.as_deref(),
                    spec.heads,
                    inputs.dt_bias.is_some(),
                ),
                (
                    "dinitial_state",
                    grads.dinitial.as_deref(),
                    states,
                    inputs.initial.is_some(),
                ),
            ],
        )?;
        let (b, l, h, p, n) = (spec.batch, spec.len, spec.heads, spec.head_dim, spec.state);
        if l == 0 || b * h == 0 {
            // Nothing flows: every gradient is zero.
            self.fill(grads.da, T::default())?;
            self.fill(grads.db, T::default())?;
            self.fill(grads.dc, T::default())?;
            for buf in [grads.dd, grads.ddt_bias, grads.dinitial].into_iter().flatten() {
                self.fill(buf, T::default())?;
            }
            return Ok(());
        }
        let (q, nc) = spec.chunking();
        let dims = spec.dims();
        let mut final_state = self.alloc::<T>(states)?;
        let fwd = self.ssd_forward_states(op, inputs, &mut final_state, &spec)?;

        // dy · (y − D x) per step, one share per p tile.
        let ptiles = tiles(p);
        let ydot = self.alloc::<f32>(ptiles * b * l * h)?;
        if xs > 0 {
            self.ssd_output(
                op,
                inputs,
                &fwd,
                Arg::Ptr(0),
                Arg::buf(grad),
                Arg::buf(&ydot),
                &spec,
            )?;
        }

        // Σ_i exp(s_i) dy_i ⊗ C_i per chunk, then the reverse state passing: dE_{c+1} per chunk.
        let mut dnext = self.alloc::<f32>(b * nc * h * p * n)?;
        let slices = (p * n).div_ceil(THREADS as usize);
        let ee = self.alloc::<f32>(b * nc * h * slices)?;
        if p * n > 0 {
            let scratch = (&fwd.dts, &fwd.cum);
            let sums = ChunkSum::OutputGrads;
            self.ssd_chunk_sums(op, sums, grad, inputs.c, scratch, &mut dnext, &spec)?;
            let mut args = vec![
                Arg::buf(&dnext),
                Arg::buf(&fwd.states),
                Arg::buf(&fwd.cum),
                Arg::buf(&ee),
                Arg::opt(grads.dinitial.as_deref()),
            ];
            args.extend(dims);
            launch(
                self,
                &SSD,
                &entry::<T>("ssd_state_pass_bwd"),
                Grid::blocks(b * h * slices, THREADS),
                &args,
            )?;
        } else if let Some(d) = grads.dinitial {
            self.fill(d, T::default())?;
        }

        // dy_i · x_j per (b, chunk, head).
        let mut dxm = self.alloc::<f32>(b * nc * h * q * q)?;
        self.ssd_chunk_products(op, grad, inputs.x, &mut dxm, h, p, &spec)?;

        // dx, and the per-step sums x·(G B) and x·dy, one share per p tile.
        let (w, xdy) = (
            self.alloc::<f32>(ptiles * b * l * h)?,
            self.alloc::<f32>(ptiles * b * l * h)?,
        );
        if xs > 0 {
            let mut args = vec![
                Arg::buf(inputs.x),
                Arg::buf(inputs.b),
                Arg::opt(inputs.d_skip),
                Arg::buf(grad),
                Arg::buf(&fwd.dts),
                Arg::buf(&fwd.cum),
                Arg::buf(&dnext),
                Arg::buf(&fwd.cb),
                Arg::buf(grads.dx),
                Arg::buf(&w),
                Arg::buf(&xdy),
            ];
            args.extend(dims);
            self.ssd_tiled(op, &entry::<T>("ssd_dx"), b * nc * h * tiles(q) * tiles(p), &args)?;
        }

        // dB and dC, summed over the heads of each group within a block.
        let (dbf, dcf) = (self.alloc::<f32>(bcs)?, self.alloc::<f32>(bcs)?);
        if bcs > 0 {
            let mut args = vec![
                Arg::buf(inputs.x),
                Arg::buf(inputs.c),
                Arg::buf(&fwd.dts),
                Arg::buf(&fwd.cum),
                Arg::buf(&dnext),
                Arg::buf(&dxm),
                Arg::buf(&dbf),
            ];
            args.extend(dims);
            let blocks = b * nc * spec.groups * tiles(q) * tiles(n);
            self.ssd_tiled(op, &entry::<T>("ssd_db"), blocks, &args)?;
            let mut args = vec![
                Arg::buf(inputs.b),
                Arg::buf(grad),
                Arg::buf(&fwd.dts),
                Arg::buf(&fwd.cum),
                Arg::buf(&fwd.states),
                Arg::buf(&dxm),
                Arg::buf(&dcf),
            ];
            args.extend(dims);
            self.ssd_tiled(op, &entry::<T>("ssd_dc"), blocks, &args)?;
        }
        sum_parts(self, &SSD, &dbf, grads.db, 1)?;
        sum_parts(self, &SSD, &dcf, grads.dc, 1)?;

        // ddt, and the partial sums of dA, d(dt_bias), dD per (b, chunk, head).
        let parts = b * nc * h;
        let (da_part, dbias_part, dd_part) = (
            self.alloc::<f32>(parts)?,
            self.alloc::<f32>(parts)?,
            self.alloc::<f32>(parts)?,
        );
        let mut args = vec![
            Arg::buf(inputs.dt),
            Arg::buf(inputs.a),
            Arg::opt(inputs.dt_bias),
            Arg::buf(&fwd.dts),
            Arg::buf(&ydot),
            Arg::buf(&w),
            Arg::buf(&xdy),
            Arg::buf(&ee),
            Arg::buf(grads.ddt),
            Arg::buf(&da_part),
            Arg::buf(&dbias_part),
            Arg::buf(&dd_part),
        ];
        args.extend(dims);
        args.extend([Arg::flag(spec.softplus), Arg::size(ptiles), Arg::size(slices)]);
        let grid = Grid::blocks(parts.div_ceil(THREADS as usize), THREADS);
        launch(self, &SSD, &entry::<T>("ssd_ddt"), grid, &args)?;
        sum_parts(self, &SSD, &da_part, grads.da, b * nc)?;
        if let Some(dd) = grads.dd {
            sum_parts(self, &SSD, &dd_part, dd, b * nc)?;
        }
        if let Some(dbias) = grads.ddt_bias {
            sum_parts(self, &SSD, &dbias_part, dbias, b * nc)?;
        }
        Ok(())
    }

    /// One decoding step of the SSD scan: the scan of `inputs` at L = 1 (see [`SsdInputs`]) from
    /// their initial state `[B, H, P, N]`, which must be given. Writes y `[B, H, P]` and the new
    /// state `[B, H, P, N]` (rounded to T). `spec.len` and `spec.chunk` are ignored.
    pub fn ssd_state_update<T: FloatElem>(
        &self,
        inputs: &SsdInputs<'_, T>,
        y: &mut DeviceBuffer<T>,
        new_state: &mut DeviceBuffer<T>,
        spec: SsdSpec,
    ) -> Result<()> {
        let op = "ssd_state_update";
        let spec = SsdSpec {
            len: 1,
            chunk: 1,
            ..spec
        };
        inputs.check(self, op, &spec)?;
        let Some(state) = inputs.initial else {
            return Err(CudaError::shape(op, "the state before the step is missing"));
        };
        let (xs, _, _, states) = spec.sizes();
        need(self, op, "new state", new_state, states)?;
        need(self, op, "y", y, xs)?;
        if xs == 0 {
            return Ok(());
        }
        let args = [
            Arg::buf(state),
            Arg::buf(inputs.x),
            Arg::buf(inputs.dt),
            Arg::buf(inputs.a),
            Arg::buf(inputs.b),
            Arg::buf(inputs.c),
            Arg::opt(inputs.d_skip),
            Arg::opt(inputs.dt_bias),
            Arg::buf(y),
            Arg::buf(new_state),
            Arg::size(spec.batch),
            Arg::size(spec.heads),
            Arg::size(spec.head_dim),
            Arg::size(spec.groups),
            Arg::size(spec.state),
            Arg::flag(spec.softplus),
        ];
        let grid = Grid::blocks(xs.div_ceil((THREADS / 32) as usize), THREADS);
        launch(self, &SSD, &entry::<T>("ssd_state_update"), grid, &args)
    }
}
