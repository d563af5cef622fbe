//! The Mamba-1 selective scan as mamba_ssm's `selective_scan_ref` defines it, its backward (a
//! reverse scan over recomputed states) and the single-step state update used for decoding.
//!
//! Rows (b, d) run in parallel and keep their state in the dtype's `Acc` type. The gradients that
//! sum over rows (dA, dB, dC, dD, d(delta_bias)) are summed from per-block partials in a fixed
//! order, so they do not depend on the number of threads.

use crate::dispatch::float_dispatch;
use crate::error::shape_err;
use crate::gpu::{cuda_float_dispatch, Gpu};
use crate::layout::numel;
use crate::storage::CpuStorage;
use crate::{FloatElement, Real, Result, Tensor, UnaryOp};
use cuda::kernels::{ScanGrads, ScanInputs, ScanSpec};
use rayon::prelude::*;
use std::ops::Range;

/// Most rayon tasks per sequence in the backward kernel; each keeps `[L, N]` partial sums of dB
/// and dC over its channels.
const TASKS_PER_SEQUENCE: usize = 64;

/// The gradients of `selective_scan`, each shaped and typed like its input; an optional one is
/// present exactly when its input was given.
#[derive(Clone, Debug)]
pub struct SelectiveScanGrads {
    /// dL/du `[B, D, L]`.
    pub du: Tensor,
    /// dL/d(delta) `[B, D, L]`.
    pub ddelta: Tensor,
    /// dL/dA `[D, N]`.
    pub da: Tensor,
    /// dL/dB `[B, N, L]`.
    pub db: Tensor,
    /// dL/dC `[B, N, L]`.
    pub dc: Tensor,
    /// dL/dD `[D]`.
    pub dd: Option<Tensor>,
    /// dL/dz `[B, D, L]`.
    pub dz: Option<Tensor>,
    /// dL/d(delta_bias) `[D]`.
    pub ddelta_bias: Option<Tensor>,
}

/// The elements of `t` (of dtype `T`) widened to the compute type, in row-major order.
pub(crate) fn widen<T: FloatElement>(t: &Tensor) -> Vec<T::Acc> {
    t.contiguous()
        .contiguous_slice::<T>()
        .iter()
        .map(|v| v.to_acc())
        .collect()
}

/// A contiguous `T` tensor of `shape` holding `values` rounded once.
pub(crate) fn narrow<T: FloatElement>(values: Vec<T::Acc>, shape: &[usize]) -> Tensor {
    let data: Vec<T> = values.into_iter().map(T::from_acc).collect();
    Tensor::from_cpu(CpuStorage::from_vec(data), shape)
}

/// Checks that every given operand has its expected shape and the dtype of `first`.
pub(crate) fn check_operands(
    op: &'static str,
    first: &Tensor,
    operands: &[(&str, Option<&Tensor>, &[usize])],
) -> Result<()> {
    for &(name, t, shape) in operands {
        let Some(t) = t else { continue };
        if t.shape() != shape {
            return shape_err(
                op,
                format!(
                    "{name} has shape {:?}, but the other operands need {shape:?}",
                    t.shape()
                ),
            );
        }
        first.check_same_dtype(op, t)?;
    }
    Ok(())
}

/// Batch, channels, length and state size of a scan.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    dim: usize,
    len: usize,
    state: usize,
}

impl Dims {
    /// The shape of u, delta, z and y: `[B, D, L]`.
    fn seq(&self) -> [usize; 3] {
        [self.batch, self.dim, self.len]
    }

    /// The shape of B and C: `[B, N, L]`.
    fn bc(&self) -> [usize; 3] {
        [self.batch, self.state, self.len]
    }

    /// The shape of a state: `[B, D, N]`.
    fn states(&self) -> [usize; 3] {
        [self.batch, self.dim, self.state]
    }
}

/// The operands of one scan: u `[B, D, L]`, delta `[B, D, L]`, A `[D, N]`, B and C `[B, N, L]`,
/// D `[D]`, z `[B, D, L]`, delta_bias `[D]` and the state before the first step `[B, D, N]`.
struct ScanArgs<'a> {
    u: &'a Tensor,
    delta: &'a Tensor,
    a: &'a Tensor,
    b: &'a Tensor,
    c: &'a Tensor,
    d_skip: Option<&'a Tensor>,
    z: Option<&'a Tensor>,
    delta_bias: Option<&'a Tensor>,
    initial: Option<&'a Tensor>,
}

impl ScanArgs<'_> {
    /// Checks every shape against u and A and every dtype against u.
    fn check(&self, op: &'static str) -> Result<Dims> {
        let (us, as_) = (self.u.shape(), self.a.shape());
        if us.len() != 3 || as_.len() != 2 {
            return shape_err(
                op,
                format!("needs u [B, D, L] and A [D, N], got {us:?} and {as_:?}"),
            );
        }
        let dims = Dims {
            batch: us[0],
            dim: us[1],
            len: us[2],
            state: as_[1],
        };
        let (seq, bc, states, channel) = (dims.seq(), dims.bc(), dims.states(), [dims.dim]);
        check_operands(
            op,
            self.u,
            &[
                ("delta", Some(self.delta), &seq),
                ("A", Some(self.a), &[dims.dim, dims.state]),
                ("B", Some(self.b), &bc),
                ("C", Some(self.c), &bc),
                ("D", self.d_skip, &channel),
                ("z", self.z, &seq),
                ("delta_bias", self.delta_bias, &channel),
                ("state", self.initial, &states),
            ],
        )?;
        Ok(dims)
    }
}

/// A scan's operands widened to the compute type, with B and C transposed to `[B, L, N]`.
struct Scan<A> {
    dims: Dims,
    u: Vec<A>,
    delta: Vec<A>,
    a: Vec<A>,
    b: Vec<A>,
    c: Vec<A>,
    d_skip: Option<Vec<A>>,
    z: Option<Vec<A>>,
    delta_bias: Option<Vec<A>>,
    initial: Option<Vec<A>>,
    softplus: bool,
}

impl<A: Real> Scan<A> {
    /// Widens checked operands of dtype `T`.
    fn new<T: FloatElement<Acc = A>>(args: &ScanArgs, dims: Dims, softplus: bool) -> Result<Self> {
        Ok(Scan {
            dims,
            u: widen::<T>(args.u),
            delta: widen::<T>(args.delta),
            a: widen::<T>(args.a),
            b: widen::<T>(&args.b.transpose(1, 2)?),
            c: widen::<T>(&args.c.transpose(1, 2)?),
            d_skip: args.d_skip.map(widen::<T>),
            z: args.z.map(widen::<T>),
            delta_bias: args.delta_bias.map(widen::<T>),
            initial: args.initial.map(widen::<T>),
            softplus,
        })
    }

    /// Row `row` (= b·D + d) at every time step: delta + delta_bias (L values).
    fn raw_steps(&self, row: usize) -> Vec<A> {
        let len = self.dims.len;
        let bias = self
            .delta_bias
            .as_ref()
            .map_or(A::zero(), |bias| bias[row % self.dims.dim]);
        self.delta[row * len..][..len].iter().map(|&d| d + bias).collect()
    }

    /// The step dt of a raw step: its softplus when asked for.
    fn dt(&self, raw: A) -> A {
        if self.softplus {
            UnaryOp::Softplus.apply(raw)
        } else {
            raw
        }
    }

    /// The state of row `row` before the first step.
    fn initial_state(&self, row: usize) -> Vec<A> {
        let n = self.dims.state;
        self.initial
            .as_ref()
            .map_or_else(|| vec![A::zero(); n], |s| s[row * n..][..n].to_vec())
    }

    /// Runs the recurrence of row `row` with steps `dts` (L), writing the ungated output
    /// `Σ_n C h_t + D u_t` into `y` (L) and, when given, every state h_t and every decay
    /// exp(dt A) into `record` (`[L, N]` each); returns the last state.
    fn scan_row(
        &self,
        row: usize,
        dts: &[A],
        y: &mut [A],
        mut record: Option<(&mut [A], &mut [A])>,
    ) -> Vec<A> {
        let Dims {
            dim, len, state: n, ..
        } = self.dims;
        let (bi, ch) = (row / dim, row % dim);
        let a = &self.a[ch * n..][..n];
        let skip = self.d_skip.as_ref().map_or(A::zero(), |d| d[ch]);
        let mut h = self.initial_state(row);
        let mut decay = vec![A::zero(); n];
        for (t, (yt, &dt)) in y.iter_mut().zip(dts).enumerate() {
            let ut = self.u[row * len + t];
            let at = (bi * len + t) * n;
            let (bt, ct) = (&self.b[at..][..n], &self.c[at..][..n]);
            // Three separate loops: the first two vectorise, the sum keeps its order.
            for (dk, &ak) in decay.iter_mut().zip(a) {
                *dk = (dt * ak).exp_fast();
            }
            for ((hk, &dk), &bk) in h.iter_mut().zip(&decay).zip(bt) {
                *hk = dk * *hk + dt * bk * ut;
            }
            let acc = h.iter().zip(ct).fold(A::zero(), |acc, (&hk, &ck)| acc + ck * hk);
            *yt = acc + skip * ut;
            if let Some((states, decays)) = record.as_mut() {
                states[t * n..][..n].copy_from_slice(&h);
                decays[t * n..][..n].copy_from_slice(&decay);
            }
        }
        h
    }

    /// The gated output and last state of row `row`.
    fn forward_row(&self, row: usize) -> (Vec<A>, Vec<A>) {
        let len = self.dims.len;
        let mut y = vec![A::zero(); len];
        let dts: Vec<A> = self.raw_steps(row).into_iter().map(|r| self.dt(r)).collect();
        let h = self.scan_row(row, &dts, &mut y, None);
        if let Some(z) = &self.z {
            for (yt, &zt) in y.iter_mut().zip(&z[row * len..]) {
                *yt = *yt * UnaryOp::Silu.apply(zt);
            }
        }
        (y, h)
    }

    /// The backward pass of channels `channels` of sequence `bi`, given dL/dy `grad` (all rows).
    fn backward_block(&self, bi: usize, channels: Range<usize>, grad: &[A]) -> BlockGrads<A> {
        let Dims {
            dim, len, state: n, ..
        } = self.dims;
        let mut out = BlockGrads {
            du: Vec::with_capacity(channels.len() * len),
            ddelta: Vec::with_capacity(channels.len() * len),
            dz: Vec::new(),
            da: Vec::with_capacity(channels.len() * n),
            dd: Vec::with_capacity(channels.len()),
            dbias: Vec::with_capacity(channels.len()),
            db: vec![A::zero(); len * n],
            dc: vec![A::zero(); len * n],
        };
        let mut scratch = RowScratch {
            y0: vec![A::zero(); len],
            states: vec![A::zero(); len * n],
            decays: vec![A::zero(); len * n],
        };
        for ch in channels {
            self.backward_row(bi * dim + ch, grad, &mut scratch, &mut out);
        }
        out
    }

    /// Appends row `row`'s gradients to `out` (and adds its dB, dC shares), recomputing the
    /// forward pass into `scratch`.
    fn backward_row(&self, row: usize, grad: &[A], scratch: &mut RowScratch<A>, out: &mut BlockGrads<A>) {
        let Dims {
            dim, len, state: n, ..
        } = self.dims;
        let (bi, ch) = (row / dim, row % dim);
        let raws = self.raw_steps(row);
        let dts: Vec<A> = raws.iter().map(|&r| self.dt(r)).collect();
        let RowScratch { y0, states, decays } = scratch;
        self.scan_row(row, &dts, y0, Some((states, decays)));
        let h0 = self.initial_state(row);
        let (u, gy) = (&self.u[row * len..][..len], &grad[row * len..][..len]);
        // Through the gate y = y0 · silu(z).
        let g0: Vec<A> = match &self.z {
            Some(z) => {
                let z = &z[row * len..][..len];
                out.dz.extend(
                    gy.iter()
                        .zip(y0.iter())
                        .zip(z)
                        .map(|((&g, &y), &zt)| g * y * UnaryOp::Silu.derivative(zt)),
                );
                gy.iter()
                    .zip(z)
                    .map(|(&g, &zt)| g * UnaryOp::Silu.apply(zt))
                    .collect()
            }
            None => gy.to_vec(),
        };
        let a = &self.a[ch * n..][..n];
        let skip = self.d_skip.as_ref().map_or(A::zero(), |d| d[ch]);
        let (mut dh, mut da, mut dd) = (vec![A::zero(); n], vec![A::zero(); n], A::zero());
        let (mut du, mut ddelta) = (vec![A::zero(); len], vec![A::zero(); len]);
        for t in (0..len).rev() {
            let (raw, dt) = (raws[t], dts[t]);
            let (g, ut) = (g0[t], u[t]);
            let decay = &decays[t * n..][..n];
            let at = (bi * len + t) * n;
            let (bt, ct) = (&self.b[at..][..n], &self.c[at..][..n]);
            let h = &states[t * n..][..n];
            let prev = if t == 0 {
                &h0[..]
            } else {
                &states[(t - 1) * n..][..n]
            };
            let (db, dc) = (&mut out.db[t * n..][..n], &mut out.dc[t * n..][..n]);
            // y0_t = Σ_k C_k h_t[k] + D u_t.
            dd += g * ut;
            let (mut dut, mut ddt) = (g * skip, A::zero());
            for k in 0..n {
                dc[k] += g * h[k];
                dh[k] += g * ct[k];
                // h_t[k] = exp(dt A_k) h_{t-1}[k] + dt B_k u_t.
                ddt += dh[k] * (a[k] * decay[k] * prev[k] + bt[k] * ut);
                da[k] += dh[k] * dt * decay[k] * prev[k];
                db[k] += dh[k] * dt * ut;
                dut += dh[k] * dt * bt[k];
                dh[k] = dh[k] * decay[k];
            }
            du[t] = dut;
            ddelta[t] = if self.softplus {
                ddt * UnaryOp::Softplus.derivative(raw)
            } else {
                ddt
            };
        }
        out.dbias.push(ddelta.iter().copied().sum());
        out.du.extend(du);
        out.ddelta.extend(ddelta);
        out.da.extend(da);
        out.dd.push(dd);
    }
}

/// Per-task buffers of the recomputed forward pass of one row.
struct RowScratch<A> {
    /// The ungated output (L).
    y0: Vec<A>,
    /// Every state h_t (`[L, N]`).
    states: Vec<A>,
    /// Every decay exp(dt A) (`[L, N]`).
    decays: Vec<A>,
}

/// One backward task's share of the gradients: a block of channels of one sequence.
struct BlockGrads<A> {
    /// du of the block's rows, `[rows, L]`.
    du: Vec<A>,
    /// d(delta) of the block's rows, `[rows, L]`.
    ddelta: Vec<A>,
    /// dz of the block's rows, `[rows, L]` (empty without z).
    dz: Vec<A>,
    /// dA of the block's rows, `[rows, N]`.
    da: Vec<A>,
    /// dD of each row.
    dd: Vec<A>,
    /// d(delta_bias) of each row.
    dbias: Vec<A>,
    /// dB summed over the block's rows, `[L, N]`.
    db: Vec<A>,
    /// dC summed over the block's rows, `[L, N]`.
    dc: Vec<A>,
}

/// The scan's output y `[B, D, L]` and last state `[B, D, N]`.
fn forward<T: FloatElement>(s: &Scan<T::Acc>) -> (Tensor, Tensor) {
    let (y, h): (Vec<_>, Vec<_>) = (0..s.dims.batch * s.dims.dim)
        .into_par_iter()
        .map(|row| s.forward_row(row))
        .unzip();
    (
        narrow::<T>(y.concat(), &s.dims.seq()),
        narrow::<T>(h.concat(), &s.dims.states()),
    )
}

/// All gradients of the scan given dL/dy `grad` (widened, `[B, D, L]`).
fn backward<T: FloatElement>(s: &Scan<T::Acc>, grad: &[T::Acc]) -> Result<SelectiveScanGrads> {
    let Dims {
        batch,
        dim,
        len,
        state: n,
    } = s.dims;
    let zero = <T::Acc as num_traits::Zero>::zero();
    // The blocks depend only on the shape, so the partials are always summed in the same order.
    let per_task = dim.div_ceil(TASKS_PER_SEQUENCE).max(1);
    let blocks: Vec<(usize, Range<usize>)> = (0..batch)
        .flat_map(|bi| {
            (0..dim)
                .step_by(per_task)
                .map(move |d0| (bi, d0..(d0 + per_task).min(dim)))
        })
        .collect();
    let parts: Vec<BlockGrads<T::Acc>> = blocks
        .par_iter()
        .map(|(bi, channels)| s.backward_block(*bi, channels.clone(), grad))
        .collect();
    let (mut du, mut ddelta, mut dz) = (Vec::new(), Vec::new(), Vec::new());
    let (mut da, mut dd, mut dbias) = (vec![zero; dim * n], vec![zero; dim], vec![zero; dim]);
    let (mut db, mut dc) = (vec![zero; batch * len * n], vec![zero; batch * len * n]);
    for ((bi, channels), p) in blocks.iter().zip(parts) {
        du.extend(p.du);
        ddelta.extend(p.ddelta);
        dz.extend(p.dz);
        for (r, ch) in channels.clone().enumerate() {
            for (acc, &v) in da[ch * n..][..n].iter_mut().zip(&p.da[r * n..][..n]) {
                *acc += v;
            }
            dd[ch] += p.dd[r];
            dbias[ch] += p.dbias[r];
        }
        let seq = bi * len * n..(bi + 1) * len * n;
        for (acc, v) in db[seq.clone()].iter_mut().zip(p.db) {
            *acc += v;
        }
        for (acc, v) in dc[seq].iter_mut().zip(p.dc) {
            *acc += v;
        }
    }
    let seq = s.dims.seq();
    // dB and dC were gathered as [B, L, N].
    let bc = |v| {
        narrow::<T>(v, &[batch, len, n])
            .transpose(1, 2)
            .map(|t| t.contiguous())
    };
    Ok(SelectiveScanGrads {
        du: narrow::<T>(du, &seq),
        ddelta: narrow::<T>(ddelta, &seq),
        da: narrow::<T>(da, &[dim, n]),
        db: bc(db)?,
        dc: bc(dc)?,
        dd: s.d_skip.is_some().then(|| narrow::<T>(dd, &[dim])),
        dz: s.z.is_some().then(|| narrow::<T>(dz, &seq)),
        ddelta_bias: s.delta_bias.is_some().then(|| narrow::<T>(dbias, &[dim])),
    })
}

/// The operands of a scan as one list (the optional ones when given), for the device check.
pub(crate) fn operand_list<'a>(required: &[&'a Tensor], optional: &[Option<&'a Tensor>]) -> Vec<&'a Tensor> {
    required
        .iter()
        .copied()
        .chain(optional.iter().flatten().copied())
        .collect()
}

/// Packed copies (or the tensors themselves) of a scan's operands on the device.
struct Packed {
    u: Tensor,
    delta: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d_skip: Option<Tensor>,
    z: Option<Tensor>,
    delta_bias: Option<Tensor>,
}

impl Packed {
    fn new(gpu: &Gpu, s: &ScanArgs) -> Result<Self> {
        let opt = |t: Option<&Tensor>| t.map(|t| gpu.packed(t)).transpose();
        Ok(Packed {
            u: gpu.packed(s.u)?,
            delta: gpu.packed(s.delta)?,
            a: gpu.packed(s.a)?,
            b: gpu.packed(s.b)?,
            c: gpu.packed(s.c)?,
            d_skip: opt(s.d_skip)?,
            z: opt(s.z)?,
            delta_bias: opt(s.delta_bias)?,
        })
    }

    /// The launcher's view of the operands.
    fn inputs<T: crate::gpu::GpuElement + cuda::FloatElem>(&self) -> ScanInputs<'_, T> {
        ScanInputs {
            u: self.u.cuda_buffer::<T>(),
            delta: self.delta.cuda_buffer::<T>(),
            a: self.a.cuda_buffer::<T>(),
            b: self.b.cuda_buffer::<T>(),
            c: self.c.cuda_buffer::<T>(),
            d_skip: self.d_skip.as_ref().map(|t| t.cuda_buffer::<T>()),
            z: self.z.as_ref().map(|t| t.cuda_buffer::<T>()),
            delta_bias: self.delta_bias.as_ref().map(|t| t.cuda_buffer::<T>()),
        }
    }
}

/// The launcher's shape of a scan.
fn scan_spec(dims: Dims, softplus: bool) -> ScanSpec {
    ScanSpec {
        batch: dims.batch,
        dim: dims.dim,
        len: dims.len,
        state: dims.state,
        softplus,
    }
}

/// `selective_scan` on a CUDA device: y `[B, D, L]` and the last state `[B, D, N]`.
fn forward_cuda(gpu: &Gpu, s: &ScanArgs, dims: Dims, softplus: bool) -> Result<(Tensor, Tensor)> {
    let p = Packed::new(gpu, s)?;
    let (seq, states) = (dims.seq(), dims.states());
    cuda_float_dispatch!(gpu.op, gpu.device, s.u.dtype(), T => {
        let mut y = gpu.alloc::<T>(numel(&seq))?;
        let mut last = gpu.alloc::<T>(numel(&states))?;
        let spec = scan_spec(dims, softplus);
        gpu.check(gpu.dev.selective_scan(&p.inputs::<T>(), &mut y, &mut last, None, spec))?;
        Ok((gpu.tensor(y, &seq), gpu.tensor(last, &states)))
    })
}

/// `selective_scan_backward` on a CUDA device.
fn backward_cuda(
    gpu: &Gpu,
    s: &ScanArgs,
    dims: Dims,
    softplus: bool,
    grad: &Tensor,
) -> Result<SelectiveScanGrads> {
    let p = Packed::new(gpu, s)?;
    let g = gpu.packed(grad)?;
    let (seq, bc, a_shape, channel) = (dims.seq(), dims.bc(), [dims.dim, dims.state], [dims.dim]);
    cuda_float_dispatch!(gpu.op, gpu.device, s.u.dtype(), T => {
        let (mut du, mut ddelta) = (gpu.alloc::<T>(numel(&seq))?, gpu.alloc::<T>(numel(&seq))?);
        let mut da = gpu.alloc::<T>(numel(&a_shape))?;
        let (mut db, mut dc) = (gpu.alloc::<T>(numel(&bc))?, gpu.alloc::<T>(numel(&bc))?);
        let opt = |given: bool, shape: &[usize]| given.then(|| gpu.alloc::<T>(numel(shape))).transpose();
        let mut dd = opt(s.d_skip.is_some(), &channel)?;
        let mut dz = opt(s.z.is_some(), &seq)?;
        let mut dbias = opt(s.delta_bias.is_some(), &channel)?;
        let grads = ScanGrads {
            du: &mut du,
            ddelta: &mut ddelta,
            da: &mut da,
            db: &mut db,
            dc: &mut dc,
            dd: dd.as_mut(),
            dz: dz.as_mut(),
            ddelta_bias: dbias.as_mut(),
        };
        let spec = scan_spec(dims, softplus);
        gpu.check(gpu.dev.selective_scan_backward(&p.inputs::<T>(), g.cuda_buffer::<T>(), grads, spec))?;
        Ok(SelectiveScanGrads {
            du: gpu.tensor(du, &seq),
            ddelta: gpu.tensor(ddelta, &seq),
            da: gpu.tensor(da, &a_shape),
            db: gpu.tensor(db, &bc),
            dc: gpu.tensor(dc, &bc),
            dd: dd.map(|b| gpu.tensor(b, &channel)),
            dz: dz.map(|b| gpu.tensor(b, &seq)),
            ddelta_bias: dbias.map(|b| gpu.tensor(b, &channel)),
        })
    })
}

/// `selective_state_update` on a CUDA device from `state` `[B, D, N]`: `step` holds the operands
/// of a scan of length one (x, dt, z `[B, D, 1]`, B and C `[B, N, 1]`, A, D, dt_bias).
fn state_update_cuda(
    gpu: &Gpu,
    state: &Tensor,
    step: &ScanArgs,
    dims: Dims,
    softplus: bool,
) -> Result<(Tensor, Tensor)> {
    let p = Packed::new(gpu, step)?;
    let st = gpu.packed(state)?;
    let (row, states) = ([dims.batch, dims.dim], dims.states());
    cuda_float_dispatch!(gpu.op, gpu.device, state.dtype(), T => {
        let mut y = gpu.alloc::<T>(numel(&row))?;
        let mut next = gpu.alloc::<T>(numel(&states))?;
        let spec = scan_spec(dims, softplus);
        gpu.check(gpu.dev.selective_state_update(st.cuda_buffer::<T>(), &p.inputs::<T>(), &mut y, &mut next, spec))?;
        Ok((gpu.tensor(y, &row), gpu.tensor(next, &states)))
    })
}

impl Tensor {
    /// The Mamba-1 selective scan of `self` = u `[B, D, L]` (mamba_ssm's `selective_scan_ref`):
    /// with dt = delta + delta_bias, passed through softplus when `delta_softplus`,
    /// `h_t[n] = exp(dt_t A[d,n]) h_{t-1}[n] + dt_t B[b,n,t] u_t` from h_{-1} = 0 and
    /// `y_t = (Σ_n C[b,n,t] h_t[n] + D[d] u_t) · silu(z_t)`, where D and z are optional.
    /// delta and z are `[B, D, L]`, A is `[D, N]`, B and C are `[B, N, L]`, D and delta_bias are
    /// `[D]`, all of one float dtype. Returns y `[B, D, L]` and the last state h_{L-1} `[B, D, N]`.
    #[allow(clippy::too_many_arguments)]
    pub fn selective_scan(
        &self,
        delta: &Tensor,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        d_skip: Option<&Tensor>,
        z: Option<&Tensor>,
        delta_bias: Option<&Tensor>,
        delta_softplus: bool,
    ) -> Result<(Tensor, Tensor)> {
        let op = "selective_scan";
        let args = ScanArgs {
            u: self,
            delta,
            a,
            b,
            c,
            d_skip,
            z,
            delta_bias,
            initial: None,
        };
        let dims = args.check(op)?;
        let operands = operand_list(&[self, delta, a, b, c], &[d_skip, z, delta_bias]);
        if let Some(gpu) = Gpu::of(op, &operands)? {
            return forward_cuda(&gpu, &args, dims, delta_softplus);
        }
        float_dispatch!(op, self.dtype(), T => {
            Ok(forward::<T>(&Scan::new::<T>(&args, dims, delta_softplus)?))
        })
    }

    /// Backward of `selective_scan` (same operands) given `grad` = dL/dy `[B, D, L]`: a reverse
    /// scan over each row's recomputed states. dA, dB, dC, dD and d(delta_bias), which sum over
    /// rows, are summed in an order fixed by the shape.
    #[allow(clippy::too_many_arguments)]
    pub fn selective_scan_backward(
        &self,
        delta: &Tensor,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        d_skip: Option<&Tensor>,
        z: Option<&Tensor>,
        delta_bias: Option<&Tensor>,
        delta_softplus: bool,
        grad: &Tensor,
    ) -> Result<SelectiveScanGrads> {
        let op = "selective_scan_backward";
        let args = ScanArgs {
            u: self,
            delta,
            a,
            b,
            c,
            d_skip,
            z,
            delta_bias,
            initial: None,
        };
        let dims = args.check(op)?;
        check_operands(op, self, &[("grad", Some(grad), self.shape())])?;
        let operands = operand_list(&[self, delta, a, b, c, grad], &[d_skip, z, delta_bias]);
        if let Some(gpu) = Gpu::of(op, &operands)? {
            return backward_cuda(&gpu, &args, dims, delta_softplus, grad);
        }
        float_dispatch!(op, self.dtype(), T => {
            backward::<T>(&Scan::new::<T>(&args, dims, delta_softplus)?, &widen::<T>(grad))
        })
    }

    /// One decoding step of the selective scan from `self` = state `[B, D, N]`: x, dt and z are
    /// `[B, D]`, A is `[D, N]`, B and C are `[B, N]`, D and dt_bias are `[D]` (mamba_ssm's
    /// `selective_state_update`). Returns y `[B, D]` and the new state `[B, D, N]`; stepping
    /// through a sequence gives the outputs and last state of `selective_scan`.
    #[allow(clippy::too_many_arguments)]
    pub fn selective_state_update(
        &self,
        x: &Tensor,
        dt: &Tensor,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        d_skip: Option<&Tensor>,
        z: Option<&Tensor>,
        dt_bias: Option<&Tensor>,
        dt_softplus: bool,
    ) -> Result<(Tensor, Tensor)> {
        let op = "selective_state_update";
        let (ss, as_) = (self.shape(), a.shape());
        if ss.len() != 3 || as_.len() != 2 {
            return shape_err(
                op,
                format!("needs state [B, D, N] and A [D, N], got {ss:?} and {as_:?}"),
            );
        }
        let dims = Dims {
            batch: ss[0],
            dim: ss[1],
            len: 1,
            state: ss[2],
        };
        let (row, bc, channel) = ([dims.batch, dims.dim], [dims.batch, dims.state], [dims.dim]);
        check_operands(
            op,
            self,
            &[
                ("x", Some(x), &row),
                ("dt", Some(dt), &row),
                ("A", Some(a), &[dims.dim, dims.state]),
                ("B", Some(b), &bc),
                ("C", Some(c), &bc),
                ("D", d_skip, &channel),
                ("z", z, &row),
                ("dt_bias", dt_bias, &channel),
            ],
        )?;
        let operands = operand_list(&[self, x, dt, a, b, c], &[d_skip, z, dt_bias]);
        let gpu = Gpu::of(op, &operands)?;
        // A scan of length one from the given state.
        let (x, dt, b, c) = (
            x.unsqueeze(2)?,
            dt.unsqueeze(2)?,
            b.unsqueeze(2)?,
            c.unsqueeze(2)?,
        );
        let z = z.map(|z| z.unsqueeze(2)).transpose()?;
        let args = ScanArgs {
            u: &x,
            delta: &dt,
            a,
            b: &b,
            c: &c,
            d_skip,
            z: z.as_ref(),
            delta_bias: dt_bias,
            initial: Some(self),
        };
        if let Some(gpu) = gpu {
            return state_update_cuda(&gpu, self, &args, dims, dt_softplus);
        }
        float_dispatch!(op, self.dtype(), T => {
            let (y, h) = forward::<T>(&Scan::new::<T>(&args, dims, dt_softplus)?);
            Ok((y.reshape(&row)?, h))
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

    /// The operands of a random scan: u, delta, A, B, C, D, z, delta_bias.
    fn operands(b: usize, d: usize, l: usize, n: usize, dtype: DType) -> [Tensor; 8] {
        [
            uniform(&[b, d, l], -1.0, 1.0, 1, dtype),
            uniform(&[b, d, l], -1.0, 1.0, 2, dtype),
            uniform(&[d, n], -2.0, -0.2, 3, dtype),
            uniform(&[b, n, l], -1.0, 1.0, 4, dtype),
            uniform(&[b, n, l], -1.0, 1.0, 5, dtype),
            uniform(&[d], -1.0, 1.0, 6, dtype),
            uniform(&[b, d, l], -2.0, 2.0, 7, dtype),
            uniform(&[d], -0.5, 0.5, 8, dtype),
        ]
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.shape(), b.shape());
        let (a, b) = (a.to_vec_f64(), b.to_vec_f64());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn one_channel_by_hand() {
        let t = |v: &[f64], s: &[usize]| Tensor::from_slice(v, s).unwrap();
        let (u, delta) = (t(&[1., 2.], &[1, 1, 2]), t(&[0.5, 1.], &[1, 1, 2]));
        let (a, b, c) = (
            t(&[-1.], &[1, 1]),
            t(&[1., 2.], &[1, 1, 2]),
            t(&[3., 1.], &[1, 1, 2]),
        );
        let d = t(&[0.5], &[1]);
        let (y, h) = u
            .selective_scan(&delta, &a, &b, &c, Some(&d), None, None, false)
            .unwrap();
        // h0 = 0.5·1·1; y0 = 3·h0 + 0.5·1; h1 = e^-1·h0 + 1·2·2; y1 = h1 + 0.5·2.
        let h1 = (-1f64).exp() * 0.5 + 4.0;
        let expected = [2.0, h1 + 1.0];
        assert!(y
            .to_vec_f64()
            .iter()
            .zip(expected)
            .all(|(a, b)| (a - b).abs() < 1e-12));
        assert!((h.to_vec_f64()[0] - h1).abs() < 1e-12 && h.shape() == [1, 1, 1]);
    }

    #[test]
    fn state_updates_step_through_the_scan() {
        let (bs, dim, len, n) = (2, 3, 5, 4);
        let [u, delta, a, b, c, d, z, bias] = operands(bs, dim, len, n, DType::F64);
        let (y, last) = u
            .selective_scan(&delta, &a, &b, &c, Some(&d), Some(&z), Some(&bias), true)
            .unwrap();
        let mut state = Tensor::zeros(&[bs, dim, n], DType::F64);
        for t in 0..len {
            let at = |x: &Tensor| x.narrow(2, t, 1).unwrap().squeeze(2).unwrap();
            let (yt, next) = state
                .selective_state_update(
                    &at(&u),
                    &at(&delta),
                    &a,
                    &at(&b),
                    &at(&c),
                    Some(&d),
                    Some(&at(&z)),
                    Some(&bias),
                    true,
                )
                .unwrap();
            assert!(max_diff(&yt, &at(&y)) < 1e-12, "step {t}");
            state = next;
        }
        assert!(max_diff(&state, &last) < 1e-12);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (bs, dim, len, n) = (2, 2, 4, 3);
        let ops = operands(bs, dim, len, n, DType::F64);
        let w = uniform(&[bs, dim, len], -1.0, 1.0, 9, DType::F64);
        let loss = |ops: &[Tensor]| -> f64 {
            let (y, _) = ops[0]
                .selective_scan(
                    &ops[1],
                    &ops[2],
                    &ops[3],
                    &ops[4],
                    Some(&ops[5]),
                    Some(&ops[6]),
                    Some(&ops[7]),
                    true,
                )
                .unwrap();
            y.mul(&w).unwrap().sum_all().unwrap().to_scalar_f64().unwrap()
        };
        let g = ops[0]
            .selective_scan_backward(
                &ops[1],
                &ops[2],
                &ops[3],
                &ops[4],
                Some(&ops[5]),
                Some(&ops[6]),
                Some(&ops[7]),
                true,
                &w,
            )
            .unwrap();
        let analytic = [
            g.du,
            g.ddelta,
            g.da,
            g.db,
            g.dc,
            g.dd.unwrap(),
            g.dz.unwrap(),
            g.ddelta_bias.unwrap(),
        ];
        crate::testing::assert_finite_differences(&ops, &analytic, loss);
    }

    #[test]
    fn gradients_do_not_depend_on_the_thread_count() {
        // 130 channels make three channels per task: several blocks per sequence.
        let [u, delta, a, b, c, d, z, bias] = operands(2, 130, 5, 3, DType::F32);
        let run = || {
            let g = u
                .selective_scan_backward(&delta, &a, &b, &c, Some(&d), Some(&z), Some(&bias), true, &z)
                .unwrap();
            [g.da, g.db, g.dc, g.dd.unwrap(), g.ddelta_bias.unwrap()].map(|t| t.to_vec::<f32>().unwrap())
        };
        let serial = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        assert_eq!(serial, run());
    }

    #[test]
    fn sixteen_bit_scans_round_the_wide_result() {
        let [u, delta, a, b, c, d, z, bias] = operands(1, 2, 6, 3, DType::BF16);
        let wide: Vec<Tensor> = [&u, &delta, &a, &b, &c, &d, &z, &bias]
            .iter()
            .map(|t| t.to_dtype(DType::F32).unwrap())
            .collect();
        let (y, h) = u
            .selective_scan(&delta, &a, &b, &c, Some(&d), Some(&z), Some(&bias), true)
            .unwrap();
        let (yw, hw) = wide[0]
            .selective_scan(
                &wide[1],
                &wide[2],
                &wide[3],
                &wide[4],
                Some(&wide[5]),
                Some(&wide[6]),
                Some(&wide[7]),
                true,
            )
            .unwrap();
        assert_eq!((y.dtype(), h.dtype()), (DType::BF16, DType::BF16));
        assert_eq!(y.to_vec_f64(), yw.to_dtype(DType::BF16).unwrap().to_vec_f64());
        assert_eq!(h.to_vec_f64(), hw.to_dtype(DType::BF16).unwrap().to_vec_f64());
    }

    #[test]
    fn checks_shapes_and_dtypes() {
        let [u, delta, a, b, c, d, _, _] = operands(1, 2, 3, 4, DType::F32);
        let scan = |u: &Tensor, a: &Tensor, b: &Tensor, d: Option<&Tensor>| {
            u.selective_scan(&delta, a, b, &c, d, None, None, false)
        };
        assert!(scan(&u, &a, &b, None).is_ok());
        assert!(scan(&u.reshape(&[2, 3]).unwrap(), &a, &b, None).is_err());
        assert!(scan(&u, &a.t().unwrap(), &b, None).is_err());
        assert!(scan(&u, &a, &b.narrow(2, 0, 2).unwrap(), None).is_err());
        assert!(scan(&u, &a, &b, Some(&a)).is_err());
        assert!(scan(&u, &a, &b, Some(&d.to_dtype(DType::F64).unwrap())).is_err());
        let ids = Tensor::zeros(&[1, 2, 3], DType::U32);
        assert!(ids
            .selective_scan(&ids, &ids, &ids, &ids, None, None, None, false)
            .is_err());
        assert!(u
            .selective_scan_backward(&delta, &a, &b, &c, None, None, None, false, &b)
            .is_err());
        let state = Tensor::zeros(&[1, 2, 4], DType::F32);
        let row = Tensor::zeros(&[1, 2], DType::F32);
        let bc = Tensor::zeros(&[1, 4], DType::F32);
        assert!(state
            .selective_state_update(&row, &row, &a, &bc, &bc, None, None, None, false)
            .is_ok());
        assert!(state
            .selective_state_update(&row, &row, &a, &row, &bc, None, None, None, false)
            .is_err());
    }

    #[test]
    fn empty_sequences_and_states() {
        let [u, delta, a, b, c, d, z, bias] = operands(2, 3, 0, 4, DType::F32);
        let (y, h) = u
            .selective_scan(&delta, &a, &b, &c, Some(&d), Some(&z), Some(&bias), true)
            .unwrap();
        assert_eq!((y.shape(), h.to_vec_f64()), (&[2, 3, 0][..], vec![0.0; 24]));
        let g = u
            .selective_scan_backward(&delta, &a, &b, &c, Some(&d), Some(&z), Some(&bias), true, &y)
            .unwrap();
        assert_eq!(g.da.to_vec_f64(), vec![0.0; 12]);
        // N = 0: only the skip connection is left.
        let [u, delta, a, b, c, d, _, _] = operands(1, 2, 3, 0, DType::F64);
        let (y, h) = u
            .selective_scan(&delta, &a, &b, &c, Some(&d), None, None, true)
            .unwrap();
        assert_eq!(h.shape(), [1, 2, 0]);
        assert!(max_diff(&y, &u.mul(&d.reshape(&[1, 2, 1]).unwrap()).unwrap()) < 1e-15);
    }
}
