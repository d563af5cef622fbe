//! Fused scaled dot-product attention, forward and backward, without the `[Tq, Tk]` score
//! matrix: keys and values are streamed in tiles with an online softmax (FlashAttention-2's
//! schedule), the per-row log-sum-exp is kept, and the backward pass recomputes the
//! probabilities from it. Memory is O(T·D) per head.
//!
//! Every mask kind lets a query see a prefix of the keys (all of them, up to the causal
//! diagonal, or up to the end of its raster row), so key tiles past that prefix are never
//! touched; an optional key-padding mask per batch row removes single keys. Queries are
//! computed in the compute type (f32 for the 16-bit types, rounded once at the end).

use crate::dispatch::float_dispatch;
use crate::error::shape_err;
use crate::gpu::{cuda_float_dispatch, Gpu};
use crate::ops::tile_gemm;
use crate::storage::CpuStorage;
use crate::{DType, FloatElement, Real, Result, Tensor, TensorError};
use num_traits::{Float, ToPrimitive, Zero};
use rayon::prelude::*;

/// Queries and keys per tile: each (query tile, key tile) pair is a few small GEMMs.
const TILE: usize = 64;

/// Which keys each query may see (before the key-padding mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionMask {
    /// Every key.
    Full,
    /// Keys up to the query's position, aligned to the end of the keys: query i of Tq sees key
    /// j when j <= i + Tk - Tq (so that a prefix of Tk - Tq cached keys is seen by all).
    Causal,
    /// Block-causal over a raster of rows `width` positions wide: query i sees key j when j's
    /// row (j / width) is at most i's row (the pixel decoder's mask).
    BlockCausal {
        /// Positions per raster row.
        width: usize,
    },
}

impl AttentionMask {
    /// Whether query `i` of `tq` may see key `j` of `tk`.
    pub fn allows(self, i: usize, j: usize, tq: usize, tk: usize) -> bool {
        j < self.key_end(i, tq, tk)
    }

    /// The u32 mask `[tq, tk]` (1 where query i may see key j), for paths that build the score
    /// matrix; `None` for [`AttentionMask::Full`].
    pub fn dense(self, tq: usize, tk: usize) -> Result<Option<Tensor>> {
        if self == AttentionMask::Full {
            return Ok(None);
        }
        let v: Vec<u32> = (0..tq * tk)
            .map(|n| u32::from(self.allows(n / tk, n % tk, tq, tk)))
            .collect();
        Ok(Some(Tensor::from_vec(v, &[tq, tk])?))
    }

    /// The number of leading keys query `i` may see: it sees keys `0..end`.
    fn key_end(self, i: usize, tq: usize, tk: usize) -> usize {
        match self {
            AttentionMask::Full => tk,
            AttentionMask::Causal => (i + tk + 1).saturating_sub(tq).min(tk),
            AttentionMask::BlockCausal { width } => ((i / width.max(1) + 1) * width.max(1)).min(tk),
        }
    }
}

/// The scale of the scores and the mask of a fused attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSpec {
    /// Multiplies q·k before the softmax (usually 1/√D).
    pub scale: f64,
    /// Which keys each query may see.
    pub mask: AttentionMask,
}

/// The sizes of one call: q `[b, h, tq, d]`, k and v `[b, hk, tk, d]`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    h: usize,
    hk: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

impl Dims {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.h / self.hk
    }
}

/// The dtype of the log-sum-exp: f64 for f64 inputs, f32 otherwise.
fn lse_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Checks the operands of `op` and returns their sizes.
fn check(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttentionSpec,
    keep: Option<&Tensor>,
) -> Result<Dims> {
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return shape_err(
            op,
            format!(
                "q, k and v must be [B, heads, T, D]; got {:?}, {:?}, {:?}",
                q.shape(),
                k.shape(),
                v.shape()
            ),
        );
    }
    let (qs, ks) = (q.shape(), k.shape());
    if k.shape() != v.shape() {
        return shape_err(op, format!("k {:?} and v {:?} differ", k.shape(), v.shape()));
    }
    let dims = Dims {
        b: qs[0],
        h: qs[1],
        hk: ks[1],
        tq: qs[2],
        tk: ks[2],
        d: qs[3],
    };
    if ks[0] != dims.b || ks[3] != dims.d {
        return shape_err(
            op,
            format!("q {qs:?} and k {ks:?} differ in batch or head dimension"),
        );
    }
    if dims.hk == 0 || !dims.h.is_multiple_of(dims.hk) {
        return shape_err(
            op,
            format!("{} key heads do not divide {} query heads", dims.hk, dims.h),
        );
    }
    q.check_same_dtype(op, k)?;
    q.check_same_dtype(op, v)?;
    if !spec.scale.is_finite() {
        return shape_err(op, format!("the scale must be finite, not {}", spec.scale));
    }
    if spec.mask == (AttentionMask::BlockCausal { width: 0 }) {
        return shape_err(op, "a block-causal mask needs rows at least one wide");
    }
    if let Some(keep) = keep {
        if keep.shape() != [dims.b, dims.tk] || keep.dtype() != DType::U32 {
            return shape_err(
                op,
                format!(
                    "the key-padding mask must be u32 [{}, {}], not {} {:?}",
                    dims.b,
                    dims.tk,
                    keep.dtype(),
                    keep.shape()
                ),
            );
        }
    }
    Ok(dims)
}

/// The key-padding mask as one flag per (batch row, key): all true without one.
fn keep_flags(keep: Option<&Tensor>, dims: &Dims) -> Vec<bool> {
    match keep {
        Some(m) => m
            .contiguous()
            .contiguous_slice::<u32>()
            .iter()
            .map(|&v| v != 0)
            .collect(),
        None => vec![true; dims.b * dims.tk],
    }
}

/// A row-major matrix view: `data[i·rs + j·cs]` is element (i, j) of a `rows x cols` matrix.
#[derive(Clone, Copy)]
struct Mat<'a, A> {
    data: &'a [A],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, A> Mat<'a, A> {
    /// `rows x cols` rows of `data`, each `cols` long.
    fn rows(data: &'a [A], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst (a.rows x b.cols, rows `b.cols` apart) = [dst +] a · b` on this thread.
fn matmul_into<A: Real>(dst: &mut [A], accumulate: bool, a: Mat<'_, A>, b: Mat<'_, A>) {
    assert_eq!(a.cols, b.rows, "attention tile product: inner sizes differ");
    tile_gemm::matmul_into(
        dst,
        b.cols,
        (a.rows, b.cols, a.cols),
        tile_gemm::view(a.data, a.rs, a.cs),
        tile_gemm::view(b.data, b.rs, b.cs),
        accumulate,
    );
}

/// Σ a·b.
fn dot<A: Real>(a: &[A], b: &[A]) -> A {
    a.iter().zip(b).fold(A::zero(), |s, (&x, &y)| s + x * y)
}

/// A tensor's values in the compute type, row-major.
fn widen<T: FloatElement>(t: &Tensor) -> Vec<T::Acc> {
    t.contiguous()
        .contiguous_slice::<T>()
        .iter()
        .map(|v| v.to_acc())
        .collect()
}

/// The forward pass of one tile of `rows` queries `qt` (starting at query `i0` of a head
/// whose keys and values are `kh`, `vh` and key flags `keys`), into `out` and `lse`.
#[allow(clippy::too_many_arguments)]
fn forward_tile<T: FloatElement>(
    qt: &[T::Acc],
    i0: usize,
    kh: &[T::Acc],
    vh: &[T::Acc],
    keys: &[bool],
    dims: Dims,
    spec: &AttentionSpec,
    out: &mut [T],
    lse: &mut [T::Acc],
) {
    let (tq, tk, d) = (dims.tq, dims.tk, dims.d);
    let rows = lse.len();
    let scale = T::Acc::lit(spec.scale);
    let ninf = T::Acc::neg_infinity();
    let ends: Vec<usize> = (i0..i0 + rows).map(|i| spec.mask.key_end(i, tq, tk)).collect();
    let reach = ends.iter().copied().max().unwrap_or(0);
    let mut acc = vec![T::Acc::zero(); rows * d];
    let (mut m, mut sum) = (vec![ninf; rows], vec![T::Acc::zero(); rows]);
    let mut s = vec![T::Acc::zero(); rows * TILE];
    let q = Mat::rows(qt, rows, d);
    for j0 in (0..reach).step_by(TILE) {
        let n = TILE.min(reach - j0);
        let (kt, vt) = (
            Mat::rows(&kh[j0 * d..][..n * d], n, d),
            Mat::rows(&vh[j0 * d..][..n * d], n, d),
        );
        let s = &mut s[..rows * n];
        matmul_into(s, false, q, kt.t());
        for r in 0..rows {
            let sr = &mut s[r * n..][..n];
            let mut tile_max = ninf;
            for (jj, x) in sr.iter_mut().enumerate() {
                let j = j0 + jj;
                *x = if j < ends[r] && keys[j] { *x * scale } else { ninf };
                tile_max = tile_max.max(*x);
            }
            if tile_max == ninf {
                sr.iter_mut().for_each(|x| *x = T::Acc::zero());
                continue;
            }
            let m_new = m[r].max(tile_max);
            let rescale = (m[r] - m_new).exp_fast();
            acc[r * d..][..d].iter_mut().for_each(|a| *a = *a * rescale);
            let mut tile_sum = T::Acc::zero();
            for x in sr.iter_mut() {
                *x = (*x - m_new).exp_fast();
                tile_sum += *x;
            }
            sum[r] = sum[r] * rescale + tile_sum;
            m[r] = m_new;
        }
        matmul_into(&mut acc, true, Mat::rows(s, rows, n), vt);
    }
    for r in 0..rows {
        if sum[r] > T::Acc::zero() {
            for (o, &a) in out[r * d..][..d].iter_mut().zip(&acc[r * d..][..d]) {
                *o = T::from_acc(a / sum[r]);
            }
            lse[r] = m[r] + sum[r].ln();
        } else {
            lse[r] = ninf;
        }
    }
}

/// The forward pass: the output `[B, H, Tq, D]` and the log-sum-exp `[B, H, Tq]` (-inf for a
/// query that sees no key; its output row is zero). Tasks are (batch row, head, query tile).
fn forward<T: FloatElement>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: Dims,
    spec: &AttentionSpec,
    keep: &[bool],
) -> (Vec<T>, Vec<T::Acc>) {
    let Dims { h, tq, tk, d, .. } = dims;
    let (qw, kw, vw) = (widen::<T>(q), widen::<T>(k), widen::<T>(v));
    let mut out = vec![T::from_acc(T::Acc::zero()); qw.len()];
    let mut lse = vec![T::Acc::zero(); dims.b * h * tq];
    if tq == 0 || d == 0 {
        return (out, lse);
    }
    out.par_chunks_mut(tq * d)
        .zip(lse.par_chunks_mut(tq))
        .enumerate()
        .for_each(|(bh, (out, lse))| {
            let (bi, hi) = (bh / h, bh % h);
            let kv = (bi * dims.hk + hi / dims.group()) * tk * d;
            let (kh, vh) = (&kw[kv..][..tk * d], &vw[kv..][..tk * d]);
            let qh = &qw[bh * tq * d..][..tq * d];
            out.par_chunks_mut(TILE * d)
                .zip(lse.par_chunks_mut(TILE))
                .enumerate()
                .for_each(|(tile, (out, lse))| {
                    let i0 = tile * TILE;
                    let qt = &qh[i0 * d..][..lse.len() * d];
                    forward_tile::<T>(qt, i0, kh, vh, &keep[bi * tk..][..tk], dims, spec, out, lse);
                });
        });
    (out, lse)
}

/// The gradients (dq, dk, dv) in the compute type.
type Grads<A> = (Vec<A>, Vec<A>, Vec<A>);

/// The backward pass given the forward's output, log-sum-exp and dL/d(out): one task per
/// (batch row, key/value head), which owns that head's dk and dv and its query heads' dq; per
/// (query tile, key tile) the probabilities are recomputed from the log-sum-exp and every
/// product is a tile GEMM.
#[allow(clippy::too_many_arguments)]
fn backward<T: FloatElement>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
    dims: Dims,
    spec: &AttentionSpec,
    keep: &[bool],
) -> Grads<T::Acc> {
    let Dims { hk, tq, tk, d, .. } = dims;
    let g = dims.group();
    let (qw, kw, vw) = (widen::<T>(q), widen::<T>(k), widen::<T>(v));
    let (ow, gw) = (widen::<T>(out), widen::<T>(grad));
    let lw: Vec<T::Acc> = lse.to_vec_f64().iter().map(|&x| T::Acc::lit(x)).collect();
    let scale = T::Acc::lit(spec.scale);
    let zero = T::Acc::zero();
    let ninf = T::Acc::neg_infinity();
    let (mut dq, mut dk, mut dv) = (vec![zero; qw.len()], vec![zero; kw.len()], vec![zero; vw.len()]);
    if tq == 0 || tk == 0 || d == 0 {
        return (dq, dk, dv);
    }
    dq.par_chunks_mut(g * tq * d)
        .zip(dk.par_chunks_mut(tk * d))
        .zip(dv.par_chunks_mut(tk * d))
        .enumerate()
        .for_each(|(task, ((dq, dk), dv))| {
            let bi = task / hk;
            let kv = task * tk * d;
            let (kh, vh) = (&kw[kv..][..tk * d], &vw[kv..][..tk * d]);
            let keys = &keep[bi * tk..][..tk];
            let mut p = [zero; TILE * TILE];
            let mut dp = [zero; TILE * TILE];
            // The query heads of this key head are consecutive: rows task·g·tq onwards.
            for head in 0..g {
                for i0 in (0..tq).step_by(TILE) {
                    let rows = TILE.min(tq - i0);
                    let first = (task * g + head) * tq + i0;
                    let span = first * d..(first + rows) * d;
                    let qt = Mat::rows(&qw[span.clone()], rows, d);
                    let ot = Mat::rows(&ow[span.clone()], rows, d);
                    let gt = Mat::rows(&gw[span], rows, d);
                    let lse_t = &lw[first..][..rows];
                    let ends: Vec<usize> = (i0..i0 + rows).map(|i| spec.mask.key_end(i, tq, tk)).collect();
                    let reach = ends.iter().copied().max().unwrap_or(0);
                    // D_i = rowsum(dO ∘ O).
                    let delta: Vec<T::Acc> = (0..rows)
                        .map(|r| dot(&gt.data[r * d..][..d], &ot.data[r * d..][..d]))
                        .collect();
                    let dq_t = &mut dq[(head * tq + i0) * d..][..rows * d];
                    for j0 in (0..reach).step_by(TILE) {
                        let n = TILE.min(reach - j0);
                        let kt = Mat::rows(&kh[j0 * d..][..n * d], n, d);
                        let vt = Mat::rows(&vh[j0 * d..][..n * d], n, d);
                        let (p, dp) = (&mut p[..rows * n], &mut dp[..rows * n]);
                        matmul_into(p, false, qt, kt.t());
                        for r in 0..rows {
                            for (jj, x) in p[r * n..][..n].iter_mut().enumerate() {
                                let j = j0 + jj;
                                *x = if j < ends[r] && keys[j] && lse_t[r] != ninf {
                                    (*x * scale - lse_t[r]).exp_fast()
                                } else {
                                    zero
                                };
                            }
                        }
                        // dV += Pᵀ dO; dP = dO Vᵀ; dS = P ∘ (dP − D) · scale.
                        matmul_into(&mut dv[j0 * d..][..n * d], true, Mat::rows(p, rows, n).t(), gt);
                        matmul_into(dp, false, gt, vt.t());
                        for r in 0..rows {
                            for (x, &pv) in dp[r * n..][..n].iter_mut().zip(&p[r * n..][..n]) {
                                *x = pv * (*x - delta[r]) * scale;
                            }
                        }
                        // dQ += dS K; dK += dSᵀ Q.
                        let ds = Mat::rows(&dp[..], rows, n);
                        matmul_into(dq_t, true, ds, kt);
                        matmul_into(&mut dk[j0 * d..][..n * d], true, ds.t(), qt);
                    }
                }
            }
        });
    (dq, dk, dv)
}

/// The CUDA arm of [`Tensor::attention`]: the operands packed, the fused kernel, `lse` in f32.
fn forward_cuda(
    gpu: &Gpu,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    key_padding: Option<&Tensor>,
    dims: Dims,
    spec: &AttentionSpec,
) -> Result<(Tensor, Tensor)> {
    let (q, k, v) = (gpu.packed(q)?, gpu.packed(k)?, gpu.packed(v)?);
    let keep = key_padding.map(|t| gpu.packed(t)).transpose()?;
    let (kernel_dims, mask) = kernel_args(dims, spec);
    cuda_float_dispatch!(gpu.op, gpu.device, q.dtype(), T => {
        let mut out = gpu.alloc::<T>(q.numel())?;
        let mut lse = gpu.alloc::<f32>(dims.b * dims.h * dims.tq)?;
        gpu.check(gpu.dev.attention_forward(
            (q.cuda_buffer::<T>(), k.cuda_buffer::<T>(), v.cuda_buffer::<T>()),
            keep.as_ref().map(|t| t.cuda_buffer::<u32>()),
            &mut out,
            &mut lse,
            kernel_dims,
            spec.scale as f32,
            mask,
        ))?;
        Ok((gpu.tensor(out, q.shape()), gpu.tensor(lse, &[dims.b, dims.h, dims.tq])))
    })
}

/// The kernels' sizes and mask code of a call.
fn kernel_args(
    dims: Dims,
    spec: &AttentionSpec,
) -> (cuda::kernels::AttentionDims, cuda::kernels::AttentionMaskKind) {
    let kernel_dims = cuda::kernels::AttentionDims {
        b: dims.b,
        h: dims.h,
        hk: dims.hk,
        tq: dims.tq,
        tk: dims.tk,
        d: dims.d,
    };
    let mask = match spec.mask {
        AttentionMask::Full => cuda::kernels::AttentionMaskKind::Full,
        AttentionMask::Causal => cuda::kernels::AttentionMaskKind::Causal,
        AttentionMask::BlockCausal { width } => cuda::kernels::AttentionMaskKind::BlockCausal { width },
    };
    (kernel_dims, mask)
}

/// The CUDA arm of [`Tensor::attention_backward`]: the operands packed (`lse` as f32), the
/// deterministic backward kernels.
fn backward_cuda(
    gpu: &Gpu,
    operands: [&Tensor; 6],
    key_padding: Option<&Tensor>,
    dims: Dims,
    spec: &AttentionSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let [q, k, v, out, lse, grad] = operands;
    let (q, k, v, out, grad) = (
        gpu.packed(q)?,
        gpu.packed(k)?,
        gpu.packed(v)?,
        gpu.packed(out)?,
        gpu.packed(grad)?,
    );
    let lse = gpu.cast(lse, DType::F32)?;
    let keep = key_padding.map(|t| gpu.packed(t)).transpose()?;
    let (kernel_dims, mask) = kernel_args(dims, spec);
    cuda_float_dispatch!(gpu.op, gpu.device, q.dtype(), T => {
        let mut dq = gpu.alloc::<T>(q.numel())?;
        let mut dk = gpu.alloc::<T>(k.numel())?;
        let mut dv = gpu.alloc::<T>(v.numel())?;
        let mut delta = gpu.alloc::<f32>(dims.b * dims.h * dims.tq)?;
        let inputs = cuda::kernels::AttentionBackward {
            qkv: (q.cuda_buffer::<T>(), k.cuda_buffer::<T>(), v.cuda_buffer::<T>()),
            out: out.cuda_buffer::<T>(),
            lse: lse.cuda_buffer::<f32>(),
            grad: grad.cuda_buffer::<T>(),
            keep: keep.as_ref().map(|t| t.cuda_buffer::<u32>()),
        };
        gpu.check(gpu.dev.attention_backward(
            &inputs,
            (&mut dq, &mut dk, &mut dv),
            &mut delta,
            kernel_dims,
            spec.scale as f32,
            mask,
        ))?;
        Ok((
            gpu.tensor(dq, q.shape()),
            gpu.tensor(dk, k.shape()),
            gpu.tensor(dv, v.shape()),
        ))
    })
}

/// Values in the compute type rounded to `T`, as a tensor of `shape`.
fn narrow<T: FloatElement>(v: Vec<T::Acc>, shape: &[usize]) -> Tensor {
    let data: Vec<T> = v.into_iter().map(T::from_acc).collect();
    Tensor::from_cpu(CpuStorage::from_vec(data), shape)
}

impl Tensor {
    /// Fused attention of queries `self` `[B, H, Tq, D]` over keys `k` and values `v`
    /// `[B, Hk, Tk, D]` (Hk divides H; query head i uses key head i / (H / Hk)):
    /// `softmax(q kᵀ · scale, masked) v`. `key_padding` (u32 `[B, Tk]`, nonzero = keep)
    /// removes keys per batch row. Returns the output `[B, H, Tq, D]` and the per-row
    /// log-sum-exp of the scaled, masked scores `[B, H, Tq]` (f32; f64 for f64 inputs), which
    /// the backward pass needs. A query that sees no key gets a zero row and a log-sum-exp of
    /// -inf. On CUDA: head dims up to 128, bf16 and f16 on the tensor cores.
    pub fn attention(
        &self,
        k: &Tensor,
        v: &Tensor,
        spec: &AttentionSpec,
        key_padding: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let op = "attention";
        let dims = check(op, self, k, v, spec, key_padding)?;
        let operands: Vec<&Tensor> = [self, k, v].into_iter().chain(key_padding).collect();
        if let Some(gpu) = Gpu::of(op, &operands)? {
            return forward_cuda(&gpu, (self, k, v), key_padding, dims, spec);
        }
        let keep = keep_flags(key_padding, &dims);
        float_dispatch!(op, self.dtype(), T => {
            let (out, lse) = forward::<T>(self, k, v, dims, spec, &keep);
            let lse: Vec<f64> = lse.iter().map(|v| v.to_f64().unwrap_or(f64::NAN)).collect();
            let lse = Tensor::from_vec(lse, &[dims.b, dims.h, dims.tq])?;
            Ok((
                Tensor::from_cpu(CpuStorage::from_vec(out), self.shape()),
                lse.to_dtype(lse_dtype(self.dtype()))?,
            ))
        })
    }

    /// The backward pass of [`Tensor::attention`]: `(dq, dk, dv)` from the same operands, the
    /// forward's output `out` and log-sum-exp `lse`, and dL/d(out) `grad`. Deterministic: each
    /// key head's gradients are summed by one task in a fixed order (on CUDA, each gradient
    /// element by one thread, without atomics).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        grad: &Tensor,
        spec: &AttentionSpec,
        key_padding: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let op = "attention_backward";
        let dims = check(op, self, k, v, spec, key_padding)?;
        if out.shape() != self.shape() || grad.shape() != self.shape() {
            return shape_err(
                op,
                format!(
                    "out {:?} and its gradient {:?} must have the queries' shape {:?}",
                    out.shape(),
                    grad.shape(),
                    self.shape()
                ),
            );
        }
        if lse.shape() != [dims.b, dims.h, dims.tq] {
            return shape_err(
                op,
                format!(
                    "the log-sum-exp {:?} must be [{}, {}, {}]",
                    lse.shape(),
                    dims.b,
                    dims.h,
                    dims.tq
                ),
            );
        }
        self.check_same_dtype(op, out)?;
        self.check_same_dtype(op, grad)?;
        if lse.dtype() == DType::U32 {
            return Err(TensorError::DType {
                op,
                dtype: lse.dtype(),
            });
        }
        let operands: Vec<&Tensor> = [self, k, v, out, lse, grad]
            .into_iter()
            .chain(key_padding)
            .collect();
        if let Some(gpu) = Gpu::of(op, &operands)? {
            return backward_cuda(&gpu, [self, k, v, out, lse, grad], key_padding, dims, spec);
        }
        let keep = keep_flags(key_padding, &dims);
        float_dispatch!(op, self.dtype(), T => {
            let (dq, dk, dv) = backward::<T>(self, k, v, out, lse, grad, dims, spec, &keep);
            Ok((
                narrow::<T>(dq, self.shape()),
                narrow::<T>(dk, k.shape()),
                narrow::<T>(dv, v.shape()),
            ))
        })
    }
}
