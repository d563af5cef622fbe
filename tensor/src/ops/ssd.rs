//! The Mamba-2 SSD scan (state space duality) with the semantics of mamba_ssm's
//! `mamba_chunk_scan_combined`: the chunked forward algorithm and its backward as matrix
//! products (`chunks`), the plain recurrence as their reference, and the single-step state
//! update used for decoding.
//!
//! Heads (b, h) run in parallel and keep their `[P, N]` state in the dtype's `Acc` type. The
//! gradients that sum over heads or sequences (dA, dB, dC, dD, d(dt_bias)) are summed in an order
//! fixed by the shape, so they do not depend on the number of threads.

use crate::dispatch::float_dispatch;
use crate::error::{range_err, shape_err};
use crate::gpu::{cpu_only, cuda_float_dispatch, Gpu, GpuElement};
use crate::layout::numel;
use crate::ops::elementwise::with_simd;
use crate::ops::selective_scan::{check_operands, narrow, operand_list, widen};
use crate::{FloatElement, Real, Result, Tensor, UnaryOp};
use cuda::kernels::{SsdGradBuffers, SsdInputs, SsdSpec};
use rayon::prelude::*;

mod chunks;

/// The gradients of `ssd_scan`, each shaped and typed like its input; an optional one is present
/// exactly when its input was given.
#[derive(Clone, Debug)]
pub struct SsdGrads {
    /// dL/dx `[B, L, H, P]`.
    pub dx: Tensor,
    /// dL/d(dt) `[B, L, H]`.
    pub ddt: Tensor,
    /// dL/dA `[H]`.
    pub da: Tensor,
    /// dL/dB `[B, L, G, N]`.
    pub db: Tensor,
    /// dL/dC `[B, L, G, N]`.
    pub dc: Tensor,
    /// dL/dD `[H]`.
    pub dd: Option<Tensor>,
    /// dL/d(dt_bias) `[H]`.
    pub ddt_bias: Option<Tensor>,
    /// dL/d(initial_state) `[B, H, P, N]`.
    pub dinitial_state: Option<Tensor>,
}

/// Batch, length, heads, head dimension, groups and state size of a scan.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    len: usize,
    heads: usize,
    head_dim: usize,
    groups: usize,
    state: usize,
}

impl Dims {
    /// The shape of x and y: `[B, L, H, P]`.
    fn xs(&self) -> [usize; 4] {
        [self.batch, self.len, self.heads, self.head_dim]
    }

    /// The shape of dt: `[B, L, H]`.
    fn steps(&self) -> [usize; 3] {
        [self.batch, self.len, self.heads]
    }

    /// The shape of B and C: `[B, L, G, N]`.
    fn bc(&self) -> [usize; 4] {
        [self.batch, self.len, self.groups, self.state]
    }

    /// The shape of a state: `[B, H, P, N]`.
    fn states(&self) -> [usize; 4] {
        [self.batch, self.heads, self.head_dim, self.state]
    }
}

/// The operands of one scan: x `[B, L, H, P]`, dt `[B, L, H]`, A `[H]`, B and C `[B, L, G, N]`,
/// D and dt_bias `[H]`, and the state before the first step `[B, H, P, N]`.
struct SsdArgs<'a> {
    x: &'a Tensor,
    dt: &'a Tensor,
    a: &'a Tensor,
    b: &'a Tensor,
    c: &'a Tensor,
    d_skip: Option<&'a Tensor>,
    dt_bias: Option<&'a Tensor>,
    initial: Option<&'a Tensor>,
}

impl SsdArgs<'_> {
    /// Checks every shape against x and B, the head-to-group split, and every dtype against x.
    fn check(&self, op: &'static str) -> Result<Dims> {
        let (xs, bs) = (self.x.shape(), self.b.shape());
        if xs.len() != 4 || bs.len() != 4 {
            return shape_err(
                op,
                format!("needs x [B, L, H, P] and B [B, L, G, N], got {xs:?} and {bs:?}"),
            );
        }
        let dims = Dims {
            batch: xs[0],
            len: xs[1],
            heads: xs[2],
            head_dim: xs[3],
            groups: bs[2],
            state: bs[3],
        };
        if dims.heads.checked_rem(dims.groups) != Some(0) {
            return shape_err(
                op,
                format!(
                    "{} heads (x {xs:?}) do not split evenly into {} groups (B {bs:?})",
                    dims.heads, dims.groups
                ),
            );
        }
        let (bc, head, states) = (dims.bc(), [dims.heads], dims.states());
        check_operands(
            op,
            self.x,
            &[
                ("dt", Some(self.dt), &dims.steps()),
                ("A", Some(self.a), &head),
                ("B", Some(self.b), &bc),
                ("C", Some(self.c), &bc),
                ("D", self.d_skip, &head),
                ("dt_bias", self.dt_bias, &head),
                ("initial_state", self.initial, &states),
            ],
        )?;
        Ok(dims)
    }
}

/// Checks that a chunk size is positive.
fn check_chunk(op: &'static str, chunk_size: usize) -> Result<()> {
    if chunk_size == 0 {
        return range_err(op, "chunk_size must be positive, got 0");
    }
    Ok(())
}

/// A scan's operands widened to the compute type (layouts unchanged).
struct Ssd<A> {
    dims: Dims,
    x: Vec<A>,
    dt: Vec<A>,
    a: Vec<A>,
    b: Vec<A>,
    c: Vec<A>,
    d_skip: Option<Vec<A>>,
    dt_bias: Option<Vec<A>>,
    initial: Option<Vec<A>>,
    softplus: bool,
}

/// `state[p, n] += w · x[p] · v[n]` for a row-major `[P, N]` state.
fn add_outer<A: Real>(state: &mut [A], w: A, x: &[A], v: &[A]) {
    let n = v.len();
    for (p, &xp) in x.iter().enumerate() {
        let wx = w * xp;
        for (s, &vn) in state[p * n..][..n].iter_mut().zip(v) {
            *s += wx * vn;
        }
    }
}

/// Σ_n a[n] · b[n].
fn dot<A: Real>(a: &[A], b: &[A]) -> A {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

impl<A: Real> Ssd<A> {
    /// Widens checked operands of dtype `T`.
    fn new<T: FloatElement<Acc = A>>(args: &SsdArgs, dims: Dims, softplus: bool) -> Self {
        Ssd {
            dims,
            x: widen::<T>(args.x),
            dt: widen::<T>(args.dt),
            a: widen::<T>(args.a),
            b: widen::<T>(args.b),
            c: widen::<T>(args.c),
            d_skip: args.d_skip.map(widen::<T>),
            dt_bias: args.dt_bias.map(widen::<T>),
            initial: args.initial.map(widen::<T>),
            softplus,
        }
    }

    /// The group whose B and C head `h` reads.
    #[inline(always)]
    fn group(&self, h: usize) -> usize {
        h / (self.dims.heads / self.dims.groups)
    }

    /// Head `h` of sequence `bi` at time `t`: dt + dt_bias, and the step (its softplus when asked
    /// for).
    #[inline(always)]
    fn step(&self, bi: usize, t: usize, h: usize) -> (A, A) {
        let bias = self.dt_bias.as_ref().map_or(A::zero(), |bias| bias[h]);
        let raw = self.dt[(bi * self.dims.len + t) * self.dims.heads + h] + bias;
        let dt = if self.softplus {
            UnaryOp::Softplus.apply(raw)
        } else {
            raw
        };
        (raw, dt)
    }

    /// x of head `h` at (bi, t): P values.
    fn x_at(&self, bi: usize, t: usize, h: usize) -> &[A] {
        let Dims {
            len, heads, head_dim, ..
        } = self.dims;
        &self.x[((bi * len + t) * heads + h) * head_dim..][..head_dim]
    }

    /// B or C (`v`) of group `g` at (bi, t): N values.
    fn group_at<'v>(&self, v: &'v [A], bi: usize, t: usize, g: usize) -> &'v [A] {
        let Dims {
            len, groups, state, ..
        } = self.dims;
        &v[((bi * len + t) * groups + g) * state..][..state]
    }

    /// D of head `h` (zero without D).
    #[inline(always)]
    fn skip(&self, h: usize) -> A {
        self.d_skip.as_ref().map_or(A::zero(), |d| d[h])
    }

    /// The state of head `h` of sequence `bi` before the first step, `[P, N]`.
    fn initial_state(&self, bi: usize, h: usize) -> Vec<A> {
        let pn = self.dims.head_dim * self.dims.state;
        self.initial.as_ref().map_or_else(
            || vec![A::zero(); pn],
            |s| s[(bi * self.dims.heads + h) * pn..][..pn].to_vec(),
        )
    }

    /// One step of the recurrence: `state ← exp(dt A_h) state + dt x_t ⊗ B_t`.
    fn advance(&self, bi: usize, t: usize, h: usize, state: &mut [A]) {
        let dt = self.step(bi, t, h).1;
        let decay = (dt * self.a[h]).exp();
        state.iter_mut().for_each(|s| *s = decay * *s);
        let bt = self.group_at(&self.b, bi, t, self.group(h));
        add_outer(state, dt, self.x_at(bi, t, h), bt);
    }

    /// `y = scale · (state · C_t) + D_h x_t` (contracting N) for head `h` at (bi, t).
    fn output(&self, bi: usize, t: usize, h: usize, state: &[A], scale: A, y: &mut [A]) {
        let n = self.dims.state;
        let ct = self.group_at(&self.c, bi, t, self.group(h));
        let skip = self.skip(h);
        for (p, (yp, &xp)) in y.iter_mut().zip(self.x_at(bi, t, h)).enumerate() {
            *yp = scale * dot(&state[p * n..][..n], ct) + skip * xp;
        }
    }

    /// The plain recurrence for head `h` of sequence `bi`: writes y (`[L, P]`) and returns the
    /// final state.
    fn sequential_head(&self, bi: usize, h: usize, y: &mut [A]) -> Vec<A> {
        let p = self.dims.head_dim;
        let mut state = self.initial_state(bi, h);
        for t in 0..self.dims.len {
            self.advance(bi, t, h, &mut state);
            self.output(bi, t, h, &state, A::one(), &mut y[t * p..][..p]);
        }
        state
    }
}

/// The gradients of one head of one sequence.
struct HeadGrads<A> {
    /// dx `[L, P]`.
    dx: Vec<A>,
    /// d(dt) `[L]` (also d(dt_bias) per step).
    ddt: Vec<A>,
    /// The head's share of dA.
    da: A,
    /// The head's share of dD.
    dd: A,
    /// The head's share of dB of its group, `[L, N]`.
    db: Vec<A>,
    /// The head's share of dC of its group, `[L, N]`.
    dc: Vec<A>,
    /// d(initial state) `[P, N]`.
    dinitial: Vec<A>,
    /// dL/d(C_i·B_j) per chunk, `[q, q]` (zero above the diagonal).
    dcb: Vec<Vec<A>>,
}

/// Per-head rows `[L, width]` (`field` of each of `heads`, in (b, h) order) interleaved into
/// `[B, L, H, width]`.
fn interleave_heads<A: Real, R>(dims: Dims, width: usize, heads: &[R], field: impl Fn(&R) -> &[A]) -> Vec<A> {
    let Dims {
        batch,
        len,
        heads: h_count,
        ..
    } = dims;
    let mut out = vec![A::zero(); batch * len * h_count * width];
    for (bh, head) in heads.iter().enumerate() {
        let (bi, h, src) = (bh / h_count, bh % h_count, field(head));
        for t in 0..len {
            out[((bi * len + t) * h_count + h) * width..][..width]
                .copy_from_slice(&src[t * width..][..width]);
        }
    }
    out
}

/// Runs `head(bi, h, y)` on every head in parallel, each writing its y rows `[L, P]` and returning
/// its final state; returns y `[B, L, H, P]` and the final states `[B, H, P, N]`.
fn forward<T: FloatElement>(
    s: &Ssd<T::Acc>,
    head: impl Fn(usize, usize, &mut [T::Acc]) -> Vec<T::Acc> + Sync,
) -> (Tensor, Tensor) {
    let Dims {
        batch,
        len,
        heads,
        head_dim,
        ..
    } = s.dims;
    let (ys, last): (Vec<_>, Vec<_>) = (0..batch * heads)
        .into_par_iter()
        .map(|bh| {
            let mut y = vec![<T::Acc as num_traits::Zero>::zero(); len * head_dim];
            let last = head(bh / heads, bh % heads, &mut y);
            (y, last)
        })
        .unzip();
    let y = interleave_heads(s.dims, head_dim, &ys, |y| y);
    (
        narrow::<T>(y, &s.dims.xs()),
        narrow::<T>(last.concat(), &s.dims.states()),
    )
}

/// All gradients of the scan given dL/dy `grad` (widened, `[B, L, H, P]`).
fn backward<T: FloatElement>(s: &Ssd<T::Acc>, chunk: usize, grad: &[T::Acc]) -> SsdGrads {
    let dims = s.dims;
    let Dims {
        batch,
        len,
        heads,
        head_dim,
        groups,
        state,
    } = dims;
    let zero = <T::Acc as num_traits::Zero>::zero();
    let cb = s.chunk_products(chunk);
    let parts: Vec<HeadGrads<T::Acc>> = (0..batch * heads)
        .into_par_iter()
        .map(|bh| {
            with_simd(
                #[inline(always)]
                || s.backward_head(bh / heads, bh % heads, chunk, &cb, grad),
            )
        })
        .collect();
    let dx = interleave_heads(dims, head_dim, &parts, |p| &p.dx);
    let ddt = interleave_heads(dims, 1, &parts, |p| &p.ddt);
    // Sums over sequences and heads, in (b, h) order.
    let (mut da, mut dd, mut dbias) = (vec![zero; heads], vec![zero; heads], vec![zero; heads]);
    let (mut db, mut dc) = s.products_backward(chunk, &parts);
    for (bh, part) in parts.iter().enumerate() {
        let (bi, h) = (bh / heads, bh % heads);
        da[h] += part.da;
        dd[h] += part.dd;
        dbias[h] += part.ddt.iter().copied().sum();
        let g = s.group(h);
        for t in 0..len {
            let at = ((bi * len + t) * groups + g) * state..((bi * len + t) * groups + g + 1) * state;
            let row = t * state..(t + 1) * state;
            for (acc, &v) in db[at.clone()].iter_mut().zip(&part.db[row.clone()]) {
                *acc += v;
            }
            for (acc, &v) in dc[at].iter_mut().zip(&part.dc[row]) {
                *acc += v;
            }
        }
    }
    let dinitial: Vec<T::Acc> = parts.into_iter().flat_map(|p| p.dinitial).collect();
    let bc = dims.bc();
    SsdGrads {
        dx: narrow::<T>(dx, &dims.xs()),
        ddt: narrow::<T>(ddt, &dims.steps()),
        da: narrow::<T>(da, &[heads]),
        db: narrow::<T>(db, &bc),
        dc: narrow::<T>(dc, &bc),
        dd: s.d_skip.is_some().then(|| narrow::<T>(dd, &[heads])),
        ddt_bias: s.dt_bias.is_some().then(|| narrow::<T>(dbias, &[heads])),
        dinitial_state: s.initial.is_some().then(|| narrow::<T>(dinitial, &dims.states())),
    }
}

/// Packed copies (or the tensors themselves) of an SSD scan's operands on the device.
struct Packed {
    x: Tensor,
    dt: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d_skip: Option<Tensor>,
    dt_bias: Option<Tensor>,
    initial: Option<Tensor>,
}

impl Packed {
    fn new(gpu: &Gpu, s: &SsdArgs) -> Result<Self> {
        let opt = |t: Option<&Tensor>| t.map(|t| gpu.packed(t)).transpose();
        Ok(Packed {
            x: gpu.packed(s.x)?,
            dt: gpu.packed(s.dt)?,
            a: gpu.packed(s.a)?,
            b: gpu.packed(s.b)?,
            c: gpu.packed(s.c)?,
            d_skip: opt(s.d_skip)?,
            dt_bias: opt(s.dt_bias)?,
            initial: opt(s.initial)?,
        })
    }

    /// The launcher's view of the operands.
    fn inputs<T: GpuElement + cuda::FloatElem>(&self) -> SsdInputs<'_, T> {
        SsdInputs {
            x: self.x.cuda_buffer::<T>(),
            dt: self.dt.cuda_buffer::<T>(),
            a: self.a.cuda_buffer::<T>(),
            b: self.b.cuda_buffer::<T>(),
            c: self.c.cuda_buffer::<T>(),
            d_skip: self.d_skip.as_ref().map(|t| t.cuda_buffer::<T>()),
            dt_bias: self.dt_bias.as_ref().map(|t| t.cuda_buffer::<T>()),
            initial: self.initial.as_ref().map(|t| t.cuda_buffer::<T>()),
        }
    }
}

/// The launcher's shape of a scan.
fn ssd_spec(dims: Dims, chunk: usize, softplus: bool) -> SsdSpec {
    SsdSpec {
        batch: dims.batch,
        len: dims.len,
        heads: dims.heads,
        head_dim: dims.head_dim,
        groups: dims.groups,
        state: dims.state,
        chunk,
        softplus,
    }
}

/// `ssd_scan` on a CUDA device: y `[B, L, H, P]` and the final state `[B, H, P, N]`.
fn forward_cuda(
    gpu: &Gpu,
    s: &SsdArgs,
    dims: Dims,
    chunk: usize,
    softplus: bool,
) -> Result<(Tensor, Tensor)> {
    let p = Packed::new(gpu, s)?;
    let (xs, states) = (dims.xs(), dims.states());
    cuda_float_dispatch!(gpu.op, gpu.device, s.x.dtype(), T => {
        let mut y = gpu.alloc::<T>(numel(&xs))?;
        let mut last = gpu.alloc::<T>(numel(&states))?;
        let spec = ssd_spec(dims, chunk, softplus);
        gpu.check(gpu.dev.ssd_scan(&p.inputs::<T>(), &mut y, &mut last, spec))?;
        Ok((gpu.tensor(y, &xs), gpu.tensor(last, &states)))
    })
}

/// `ssd_scan_backward` on a CUDA device.
fn backward_cuda(
    gpu: &Gpu,
    s: &SsdArgs,
    dims: Dims,
    chunk: usize,
    softplus: bool,
    grad: &Tensor,
) -> Result<SsdGrads> {
    let p = Packed::new(gpu, s)?;
    let g = gpu.packed(grad)?;
    let (xs, steps, bc, states, head) = (dims.xs(), dims.steps(), dims.bc(), dims.states(), [dims.heads]);
    cuda_float_dispatch!(gpu.op, gpu.device, s.x.dtype(), T => {
        let mut dx = gpu.alloc::<T>(numel(&xs))?;
        let mut ddt = gpu.alloc::<T>(numel(&steps))?;
        let mut da = gpu.alloc::<T>(dims.heads)?;
        let (mut db, mut dc) = (gpu.alloc::<T>(numel(&bc))?, gpu.alloc::<T>(numel(&bc))?);
        let opt = |given: bool, shape: &[usize]| given.then(|| gpu.alloc::<T>(numel(shape))).transpose();
        let mut dd = opt(s.d_skip.is_some(), &head)?;
        let mut dbias = opt(s.dt_bias.is_some(), &head)?;
        let mut dinit = opt(s.initial.is_some(), &states)?;
        let grads = SsdGradBuffers {
            dx: &mut dx,
            ddt: &mut ddt,
            da: &mut da,
            db: &mut db,
            dc: &mut dc,
            dd: dd.as_mut(),
            ddt_bias: dbias.as_mut(),
            dinitial: dinit.as_mut(),
        };
        let spec = ssd_spec(dims, chunk, softplus);
        gpu.check(gpu.dev.ssd_scan_backward(&p.inputs::<T>(), g.cuda_buffer::<T>(), grads, spec))?;
        Ok(SsdGrads {
            dx: gpu.tensor(dx, &xs),
            ddt: gpu.tensor(ddt, &steps),
            da: gpu.tensor(da, &head),
            db: gpu.tensor(db, &bc),
            dc: gpu.tensor(dc, &bc),
            dd: dd.map(|b| gpu.tensor(b, &head)),
            ddt_bias: dbias.map(|b| gpu.tensor(b, &head)),
            dinitial_state: dinit.map(|b| gpu.tensor(b, &states)),
        })
    })
}

/// `ssd_state_update` on a CUDA device: `step` holds the operands of a scan of length one (x
/// `[B, 1, H, P]`, dt `[B, 1, H]`, B and C `[B, 1, G, N]`, A, D, dt_bias) and the state
/// `[B, H, P, N]` as its initial state. Returns y `[B, H, P]` and the new state.
fn state_update_cuda(gpu: &Gpu, step: &SsdArgs, dims: Dims, softplus: bool) -> Result<(Tensor, Tensor)> {
    let p = Packed::new(gpu, step)?;
    let (row, states) = ([dims.batch, dims.heads, dims.head_dim], dims.states());
    cuda_float_dispatch!(gpu.op, gpu.device, step.x.dtype(), T => {
        let mut y = gpu.alloc::<T>(numel(&row))?;
        let mut next = gpu.alloc::<T>(numel(&states))?;
        let spec = ssd_spec(dims, 1, softplus);
        gpu.check(gpu.dev.ssd_state_update(&p.inputs::<T>(), &mut y, &mut next, spec))?;
        Ok((gpu.tensor(y, &row), gpu.tensor(next, &states)))
    })
}

impl Tensor {
    /// The Mamba-2 SSD scan of `self` = x `[B, L, H, P]` by the chunked algorithm of mamba_ssm's
    /// `mamba_chunk_scan_combined`; the result equals `ssd_scan_sequential`'s recurrence
    /// `h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t ⊗ B_t` (a `[P, N]` state per head, from
    /// `initial_state` or zero), `y_t = h_t · C_t + D_h x_t`, where
    /// dt = softplus(dt + dt_bias) when `dt_softplus`, else dt + dt_bias. dt is `[B, L, H]`,
    /// A, D and dt_bias `[H]`, B and C `[B, L, G, N]` with head h reading group
    /// h / (H / G), `initial_state` `[B, H, P, N]`, all of one float dtype. Per chunk of
    /// `chunk_size` steps (the last may be shorter): cumulative sums of dt·A, the chunk's own
    /// state, the states passed between chunks, then the outputs as the intra-chunk sum
    /// `Σ_{j<=i} (C_i·B_j) exp(Σ_{j<k<=i} dt_k A) dt_j x_j` plus C_i · (the incoming state decayed
    /// to step i). Returns y `[B, L, H, P]` and the final state `[B, H, P, N]`.
    #[allow(clippy::too_many_arguments)]
    pub fn ssd_scan(
        &self,
        dt: &Tensor,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        d_skip: Option<&Tensor>,
        dt_bias: Option<&Tensor>,
        dt_softplus: bool,
        chunk_size: usize,
        initial_state: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let op = "ssd_scan";
        let args = SsdArgs {
            x: self,
            dt,
            a,
            b,
            c,
            d_skip,
            dt_bias,
            initial: initial_state,
        };
        let dims = args.check(op)?;
        check_chunk(op, chunk_size)?;
        let operands = operand_list(&[self, dt, a, b, c], &[d_skip, dt_bias, initial_state]);
        if let Some(gpu) = Gpu::of(op, &operands)? {
            return forward_cuda(&gpu, &args, dims, chunk_size, dt_softplus);
        }
        float_dispatch!(op, self.dtype(), T => {
            let s = Ssd::new::<T>(&args, dims, dt_softplus);
            let cb = s.chunk_products(chunk_size);
            Ok(forward::<T>(&s, |bi, h, y| {
                with_simd(
                    #[inline(always)]
                    || s.chunked_head(bi, h, chunk_size, &cb, y),
                )
            }))
        })
    }

    /// The reference for `ssd_scan` (same operands, no chunking): the plain recurrence run step
    /// by step for every head. Returns y `[B, L, H, P]` and the final state `[B, H, P, N]`.
    #[allow(clippy::too_many_arguments)]
    pub fn ssd_scan_sequential(
        &self,
        dt: &Tensor,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        d_skip: Option<&Tensor>,
        dt_bias: Option<&Tensor>,
        dt_softplus: bool,
        initial_state: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let op = "ssd_scan_sequential";
        cpu_only(op, &[self, dt, a, b, c], &[d_skip, dt_bias, initial_state])?;
        let args = SsdArgs {
            x: self,
            dt,
            a,
            b,
            c,
            d_skip,
            dt_bias,
            initial: initial_state,
        };
        let dims = args.check(op)?;
        float_dispatch!(op, self.dtype(), T => {
            let s = Ssd::new::<T>(&args, dims, dt_softplus);
            Ok(forward::<T>(&s, |bi, h, y| s.sequential_head(bi, h, y)))
        })
    }

    /// Backward of `ssd_scan` (same operands) given `grad` = dL/dy `[B, L, H, P]`: the chunked
    /// algorithm's matrix products differentiated chunk by chunk in reverse, after recomputing
    /// the state entering each chunk. dA, dB, dC, dD and d(dt_bias), which sum over heads or
    /// sequences, are summed in an order fixed by the shape.
    #[allow(clippy::too_many_arguments)]
    pub fn ssd_scan_backward(
        &self,
        dt: &Tensor,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        d_skip: Option<&Tensor>,
        dt_bias: Option<&Tensor>,
        dt_softplus: bool,
        chunk_size: usize,
        initial_state: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<SsdGrads> {
        let op = "ssd_scan_backward";
        let args = SsdArgs {
            x: self,
            dt,
            a,
            b,
            c,
            d_skip,
            dt_bias,
            initial: initial_state,
        };
        let dims = args.check(op)?;
        check_chunk(op, chunk_size)?;
        check_operands(op, self, &[("grad", Some(grad), self.shape())])?;
        let operands = operand_list(&[self, dt, a, b, c, grad], &[d_skip, dt_bias, initial_state]);
        if let Some(gpu) = Gpu::of(op, &operands)? {
            return backward_cuda(&gpu, &args, dims, chunk_size, dt_softplus, grad);
        }
        float_dispatch!(op, self.dtype(), T => {
            Ok(backward::<T>(&Ssd::new::<T>(&args, dims, dt_softplus), chunk_size, &widen::<T>(grad)))
        })
    }

    /// One decoding step of the SSD scan from `self` = state `[B, H, P, N]`: x is `[B, H, P]`,
    /// dt `[B, H]`, A, D and dt_bias `[H]`, B and C `[B, G, N]`. Returns y `[B, H, P]` and the
    /// new state `[B, H, P, N]`; stepping through a sequence gives the outputs and final state of
    /// `ssd_scan`.
    #[allow(clippy::too_many_arguments)]
    pub fn ssd_state_update(
        &self,
        x: &Tensor,
        dt: &Tensor,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        d_skip: Option<&Tensor>,
        dt_bias: Option<&Tensor>,
        dt_softplus: bool,
    ) -> Result<(Tensor, Tensor)> {
        let op = "ssd_state_update";
        let (ss, bs) = (self.shape(), b.shape());
        if ss.len() != 4 || bs.len() != 3 {
            return shape_err(
                op,
                format!("needs state [B, H, P, N] and B [B, G, N], got {ss:?} and {bs:?}"),
            );
        }
        let (batch, heads, head_dim) = (ss[0], ss[1], ss[2]);
        check_operands(
            op,
            self,
            &[
                ("x", Some(x), &[batch, heads, head_dim]),
                ("dt", Some(dt), &[batch, heads]),
                ("C", Some(c), bs),
            ],
        )?;
        // A scan of length one from the given state.
        let (x1, dt1, b1, c1) = (
            x.unsqueeze(1)?,
            dt.unsqueeze(1)?,
            b.unsqueeze(1)?,
            c.unsqueeze(1)?,
        );
        let args = SsdArgs {
            x: &x1,
            dt: &dt1,
            a,
            b: &b1,
            c: &c1,
            d_skip,
            dt_bias,
            initial: Some(self),
        };
        let dims = args.check(op)?;
        let operands = operand_list(&[self, x, dt, a, b, c], &[d_skip, dt_bias]);
        if let Some(gpu) = Gpu::of(op, &operands)? {
            return state_update_cuda(&gpu, &args, dims, dt_softplus);
        }
        float_dispatch!(op, self.dtype(), T => {
            let s = Ssd::new::<T>(&args, dims, dt_softplus);
            let (y, state) = forward::<T>(&s, |bi, h, y| s.sequential_head(bi, h, y));
            Ok((y.reshape(x.shape())?, state))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::{seeded_rng, DType, Tensor};

    /// Uniform samples in `[lo, hi)`.
    fn uniform(shape: &[usize], lo: f64, hi: f64, seed: u64, dtype: DType) -> Tensor {
        Tensor::rand_uniform(shape, dtype, lo, hi, &mut seeded_rng(seed)).unwrap()
    }

    /// The operands of a random scan: x, dt, A, B, C, D, dt_bias, initial state.
    fn operands(b: usize, l: usize, h: usize, p: usize, g: usize, n: usize, dtype: DType) -> [Tensor; 8] {
        [
            uniform(&[b, l, h, p], -1.0, 1.0, 11, dtype),
            uniform(&[b, l, h], -1.5, 1.0, 12, dtype),
            uniform(&[h], -1.5, -0.2, 13, dtype),
            uniform(&[b, l, g, n], -1.0, 1.0, 14, dtype),
            uniform(&[b, l, g, n], -1.0, 1.0, 15, dtype),
            uniform(&[h], -1.0, 1.0, 16, dtype),
            uniform(&[h], -0.5, 0.5, 17, dtype),
            uniform(&[b, h, p, n], -1.0, 1.0, 18, dtype),
        ]
    }

    /// ‖a - b‖ / ‖b‖.
    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.shape(), b.shape());
        let (a, b) = (a.to_vec_f64(), b.to_vec_f64());
        let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        let norm: f64 = b.iter().map(|y| y * y).sum();
        diff.sqrt() / norm.sqrt().max(1e-300)
    }

    #[test]
    fn one_head_by_hand() {
        let t = |v: &[f64], s: &[usize]| Tensor::from_slice(v, s).unwrap();
        // B = 1, L = 2, H = 1, P = 1, G = 1, N = 1, no softplus, chunk 1.
        let (x, dt, a) = (
            t(&[1., 2.], &[1, 2, 1, 1]),
            t(&[0.5, 1.], &[1, 2, 1]),
            t(&[-1.], &[1]),
        );
        let (b, c, d) = (
            t(&[1., 2.], &[1, 2, 1, 1]),
            t(&[3., 1.], &[1, 2, 1, 1]),
            t(&[0.5], &[1]),
        );
        let init = t(&[2.], &[1, 1, 1, 1]);
        let (y, h) = x
            .ssd_scan(&dt, &a, &b, &c, Some(&d), None, false, 1, Some(&init))
            .unwrap();
        let h0 = (-0.5f64).exp() * 2.0 + 0.5;
        let h1 = (-1f64).exp() * h0 + 4.0;
        let expected = [3.0 * h0 + 0.5, h1 + 1.0];
        assert!(y
            .to_vec_f64()
            .iter()
            .zip(expected)
            .all(|(a, b)| (a - b).abs() < 1e-12));
        assert!((h.to_vec_f64()[0] - h1).abs() < 1e-12);
    }

    #[test]
    fn chunked_matches_sequential() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            for len in [1, 7, 8, 9, 16, 17, 33] {
                for groups in [1, 2] {
                    for options in [false, true] {
                        let [x, dt, a, b, c, d, bias, init] = operands(2, len, 4, 3, groups, 5, dtype);
                        let (d, bias, init) = if options {
                            (Some(&d), Some(&bias), Some(&init))
                        } else {
                            (None, None, None)
                        };
                        let (y, h) = x.ssd_scan(&dt, &a, &b, &c, d, bias, options, 8, init).unwrap();
                        let (ys, hs) = x
                            .ssd_scan_sequential(&dt, &a, &b, &c, d, bias, options, init)
                            .unwrap();
                        let errs = (rel_err(&y, &ys), rel_err(&h, &hs));
                        let case = format!("{dtype} L={len} G={groups} options={options}: {errs:?}");
                        assert!(errs.0 < tol && errs.1 < tol, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn state_updates_step_through_the_scan() {
        let (bs, len, heads, p, groups, n) = (2, 6, 4, 3, 2, 5);
        let [x, dt, a, b, c, d, bias, init] = operands(bs, len, heads, p, groups, n, DType::F64);
        let (y, last) = x
            .ssd_scan(&dt, &a, &b, &c, Some(&d), Some(&bias), true, 4, Some(&init))
            .unwrap();
        let mut state = init;
        for t in 0..len {
            let at = |v: &Tensor| v.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
            let (yt, next) = state
                .ssd_state_update(
                    &at(&x),
                    &at(&dt),
                    &a,
                    &at(&b),
                    &at(&c),
                    Some(&d),
                    Some(&bias),
                    true,
                )
                .unwrap();
            assert!(rel_err(&yt, &at(&y)) < 1e-12, "step {t}");
            state = next;
        }
        assert!(rel_err(&state, &last) < 1e-12);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (bs, len, heads, p, groups, n) = (1, 5, 2, 2, 2, 2);
        let ops = operands(bs, len, heads, p, groups, n, DType::F64);
        let w = uniform(&[bs, len, heads, p], -1.0, 1.0, 19, DType::F64);
        let loss = |o: &[Tensor]| -> f64 {
            let (y, _) = o[0]
                .ssd_scan(
                    &o[1],
                    &o[2],
                    &o[3],
                    &o[4],
                    Some(&o[5]),
                    Some(&o[6]),
                    true,
                    2,
                    Some(&o[7]),
                )
                .unwrap();
            y.mul(&w).unwrap().sum_all().unwrap().to_scalar_f64().unwrap()
        };
        let o = &ops;
        let g = o[0]
            .ssd_scan_backward(
                &o[1],
                &o[2],
                &o[3],
                &o[4],
                Some(&o[5]),
                Some(&o[6]),
                true,
                2,
                Some(&o[7]),
                &w,
            )
            .unwrap();
        let analytic = [
            g.dx,
            g.ddt,
            g.da,
            g.db,
            g.dc,
            g.dd.unwrap(),
            g.ddt_bias.unwrap(),
            g.dinitial_state.unwrap(),
        ];
        crate::testing::assert_finite_differences(&ops, &analytic, loss);
    }

    #[test]
    fn backward_does_not_depend_on_the_chunk_size() {
        let [x, dt, a, b, c, d, bias, init] = operands(2, 9, 4, 2, 2, 3, DType::F64);
        let grad = uniform(&[2, 9, 4, 2], -1.0, 1.0, 20, DType::F64);
        let run = |chunk| {
            let g = x
                .ssd_scan_backward(
                    &dt,
                    &a,
                    &b,
                    &c,
                    Some(&d),
                    Some(&bias),
                    true,
                    chunk,
                    Some(&init),
                    &grad,
                )
                .unwrap();
            [g.dx, g.ddt, g.da, g.db, g.dc, g.dinitial_state.unwrap()].map(|t| t.to_vec_f64())
        };
        // The chunked products sum in an order that depends on the chunk size: equal to f64
        // rounding.
        let close = |a: [Vec<f64>; 6], b: [Vec<f64>; 6]| {
            for (x, y) in a.iter().zip(&b) {
                let diff: f64 = x.iter().zip(y).map(|(p, q)| (p - q).powi(2)).sum::<f64>().sqrt();
                let norm: f64 = y.iter().map(|q| q * q).sum::<f64>().sqrt();
                assert!(diff <= 1e-13 * norm, "{diff:e} against a norm of {norm:e}");
            }
        };
        close(run(1), run(4));
        close(run(4), run(100));
    }

    #[test]
    fn checks_shapes_dtypes_and_chunk_size() {
        let [x, dt, a, b, c, _, _, init] = operands(1, 3, 4, 2, 2, 3, DType::F32);
        let scan = |x: &Tensor, b: &Tensor, chunk: usize, init: Option<&Tensor>| {
            x.ssd_scan(&dt, &a, b, &c, None, None, true, chunk, init)
        };
        assert!(scan(&x, &b, 2, Some(&init)).is_ok());
        assert!(scan(&x, &b, 0, None).is_err());
        assert!(scan(&x.reshape(&[3, 4, 2]).unwrap(), &b, 2, None).is_err());
        assert!(scan(&x, &b.narrow(1, 0, 2).unwrap(), 2, None).is_err());
        assert!(scan(&x, &init, 2, None).is_err());
        assert!(scan(&x, &b, 2, Some(&init.to_dtype(DType::F64).unwrap())).is_err());
        // Four heads do not split into three groups.
        let b3 = Tensor::zeros(&[1, 3, 3, 3], DType::F32);
        assert!(x.ssd_scan(&dt, &a, &b3, &b3, None, None, true, 2, None).is_err());
        assert!(x
            .ssd_scan_backward(&dt, &a, &b, &c, None, None, true, 2, None, &dt)
            .is_err());
        let (row, bg) = (
            Tensor::zeros(&[1, 4], DType::F32),
            Tensor::zeros(&[1, 2, 3], DType::F32),
        );
        let x1 = Tensor::zeros(&[1, 4, 2], DType::F32);
        assert!(init
            .ssd_state_update(&x1, &row, &a, &bg, &bg, None, None, true)
            .is_ok());
        assert!(init
            .ssd_state_update(&row, &row, &a, &bg, &bg, None, None, true)
            .is_err());
    }

    #[test]
    fn empty_sequences_keep_the_initial_state() {
        let [x, dt, a, b, c, d, bias, init] = operands(2, 0, 2, 3, 1, 4, DType::F32);
        let (y, h) = x
            .ssd_scan(&dt, &a, &b, &c, Some(&d), Some(&bias), true, 8, Some(&init))
            .unwrap();
        assert_eq!(
            (y.shape(), h.to_vec_f64()),
            (&[2, 0, 2, 3][..], init.to_vec_f64())
        );
        let g = x
            .ssd_scan_backward(&dt, &a, &b, &c, Some(&d), Some(&bias), true, 8, Some(&init), &y)
            .unwrap();
        assert_eq!(g.dinitial_state.unwrap().to_vec_f64(), vec![0.0; 48]);
    }
}
