//! Fused scaled dot-product attention (`attention.cu`): the forward pass with its per-row
//! log-sum-exp, and the deterministic backward pass (no atomics); bf16 and f16 on the tensor
//! cores, f32 on the CUDA cores.

use super::{need, product};
use crate::compile::ATTENTION;
use crate::device::{DType, DeviceBuffer, FloatElem, GpuDevice};
use crate::error::{CudaError, Result};
use crate::launch::{entry, launch, Arg, Grid};

/// The largest head dim the kernels take.
pub const ATTENTION_MAX_HEAD_DIM: usize = 128;
/// Query rows per block of the tensor-core kernel.
const QUERY_TILE: usize = 64;
/// Threads per block (four warps).
const THREADS: u32 = 128;
/// Keys (or queries) per block of the f32 backward kernels (the 16-bit ones take `QUERY_TILE`).
const BACKWARD_TILE: usize = 32;

/// The sizes of one attention call: q `[b, h, tq, d]`, k and v `[b, hk, tk, d]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    /// Batch.
    pub b: usize,
    /// Query heads.
    pub h: usize,
    /// Key and value heads (divides `h`).
    pub hk: usize,
    /// Queries per head.
    pub tq: usize,
    /// Keys per head.
    pub tk: usize,
    /// Head dim.
    pub d: usize,
}

/// Which keys each query sees (the kernels' codes of `tensor::AttentionMask`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionMaskKind {
    /// Every key.
    Full,
    /// Query i of Tq sees key j when j <= i + Tk - Tq.
    Causal,
    /// Query i sees key j when j / width <= i / width.
    BlockCausal {
        /// Positions per raster row.
        width: usize,
    },
}

impl AttentionMaskKind {
    fn code(self) -> (i32, usize) {
        match self {
            AttentionMaskKind::Full => (0, 0),
            AttentionMaskKind::Causal => (1, 0),
            AttentionMaskKind::BlockCausal { width } => (2, width),
        }
    }
}

/// The buffers of [`GpuDevice::attention_backward`].
pub struct AttentionBackward<'a, T: FloatElem> {
    /// Queries, keys and values.
    pub qkv: (&'a DeviceBuffer<T>, &'a DeviceBuffer<T>, &'a DeviceBuffer<T>),
    /// The forward's output.
    pub out: &'a DeviceBuffer<T>,
    /// The forward's log-sum-exp.
    pub lse: &'a DeviceBuffer<f32>,
    /// dL/d(out).
    pub grad: &'a DeviceBuffer<T>,
    /// The key-padding mask, if any.
    pub keep: Option<&'a DeviceBuffer<u32>>,
}

/// The kernels' trailing arguments, the same for every attention kernel but the delta pre-pass:
/// sizes, scale and mask.
fn shape_args(dims: AttentionDims, scale: f32, mask: AttentionMaskKind) -> [Arg; 9] {
    let AttentionDims { b, h, hk, tq, tk, d } = dims;
    let (kind, width) = mask.code();
    [
        Arg::size(b),
        Arg::size(h),
        Arg::size(hk),
        Arg::size(tq),
        Arg::size(tk),
        Arg::size(d),
        Arg::F32(scale),
        Arg::I32(kind),
        Arg::size(width),
    ]
}

impl GpuDevice {
    /// Checks the sizes and the operands shared by the forward and the backward launchers and
    /// returns the element counts of the queries and of the keys.
    fn check_attention_operands<T: FloatElem>(
        &self,
        op: &'static str,
        (q, k, v): (&DeviceBuffer<T>, &DeviceBuffer<T>, &DeviceBuffer<T>),
        keep: Option<&DeviceBuffer<u32>>,
        dims: AttentionDims,
    ) -> Result<(usize, usize)> {
        let AttentionDims { b, h, hk, tq, tk, d } = dims;
        if d == 0 || d > ATTENTION_MAX_HEAD_DIM {
            return Err(CudaError::shape(
                op,
                format!("head dim {d}: the kernels take 1 to {ATTENTION_MAX_HEAD_DIM}"),
            ));
        }
        if hk == 0 || h % hk != 0 {
            return Err(CudaError::shape(
                op,
                format!("{hk} key heads do not divide {h} query heads"),
            ));
        }
        let nq = product(op, "queries", &[b, h, tq, d])?;
        let nk = product(op, "keys", &[b, hk, tk, d])?;
        need(self, op, "q", q, nq)?;
        need(self, op, "k", k, nk)?;
        need(self, op, "v", v, nk)?;
        if let Some(keep) = keep {
            need(self, op, "key padding", keep, b * tk)?;
        }
        Ok((nq, nk))
    }

    /// `out = softmax(q kᵀ · scale, masked) v` and `lse` (the log-sum-exp of each query's scaled,
    /// masked scores; -inf and a zero row for a query that sees no key). `keep` (u32 `[b, tk]`,
    /// nonzero = keep) removes keys per batch row. All buffers contiguous.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward<T: FloatElem>(
        &self,
        (q, k, v): (&DeviceBuffer<T>, &DeviceBuffer<T>, &DeviceBuffer<T>),
        keep: Option<&DeviceBuffer<u32>>,
        out: &mut DeviceBuffer<T>,
        lse: &mut DeviceBuffer<f32>,
        dims: AttentionDims,
        scale: f32,
        mask: AttentionMaskKind,
    ) -> Result<()> {
        let op = "attention_forward";
        let AttentionDims { b, h, tq, .. } = dims;
        let (nq, _) = self.check_attention_operands(op, (q, k, v), keep, dims)?;
        need(self, op, "out", out, nq)?;
        need(self, op, "lse", lse, b * h * tq)?;
        if nq == 0 {
            return Ok(());
        }
        let args: Vec<Arg> = [
            Arg::buf(q),
            Arg::buf(k),
            Arg::buf(v),
            Arg::opt(keep),
            Arg::buf(out),
            Arg::buf(lse),
        ]
        .into_iter()
        .chain(shape_args(dims, scale, mask))
        .collect();
        let blocks = match T::DTYPE {
            DType::F32 => (b * h * tq).div_ceil(THREADS as usize / 32),
            _ => b * h * tq.div_ceil(QUERY_TILE),
        };
        launch(
            self,
            &ATTENTION,
            &entry::<T>("attention_forward"),
            Grid::blocks(blocks, THREADS),
            &args,
        )
    }

    /// The gradients `(dq, dk, dv)` of [`GpuDevice::attention_forward`] for dL/d(out) `grad`,
    /// from the same operands, the forward's output and its log-sum-exp; `delta` (f32
    /// `[b, h, tq]`) is scratch for rowsum(dO ∘ O). Deterministic: every gradient element is
    /// summed by one thread in a fixed order.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward<T: FloatElem>(
        &self,
        inputs: &AttentionBackward<T>,
        (dq, dk, dv): (&mut DeviceBuffer<T>, &mut DeviceBuffer<T>, &mut DeviceBuffer<T>),
        delta: &mut DeviceBuffer<f32>,
        dims: AttentionDims,
        scale: f32,
        mask: AttentionMaskKind,
    ) -> Result<()> {
        let op = "attention_backward";
        let AttentionDims { b, h, hk, tq, tk, d } = dims;
        let (q, k, v) = inputs.qkv;
        let (nq, nk) = self.check_attention_operands(op, inputs.qkv, inputs.keep, dims)?;
        need(self, op, "out", inputs.out, nq)?;
        need(self, op, "gradient", inputs.grad, nq)?;
        need(self, op, "lse", inputs.lse, b * h * tq)?;
        need(self, op, "delta", delta, b * h * tq)?;
        need(self, op, "dq", dq, nq)?;
        need(self, op, "dk", dk, nk)?;
        need(self, op, "dv", dv, nk)?;
        if nq == 0 && nk == 0 {
            return Ok(());
        }
        let tile = match T::DTYPE {
            DType::F32 => BACKWARD_TILE,
            _ => QUERY_TILE,
        };
        let rows = b * h * tq;
        if rows > 0 {
            let args = [
                Arg::buf(inputs.out),
                Arg::buf(inputs.grad),
                Arg::buf(delta),
                Arg::size(rows),
                Arg::size(d),
            ];
            let blocks = rows.div_ceil(THREADS as usize / 32);
            launch(
                self,
                &ATTENTION,
                &entry::<T>("attention_delta"),
                Grid::blocks(blocks, THREADS),
                &args,
            )?;
        }
        let common = shape_args(dims, scale, mask);
        let head = [
            Arg::buf(q),
            Arg::buf(k),
            Arg::buf(v),
            Arg::buf(inputs.grad),
            Arg::buf(inputs.lse),
            Arg::buf(delta),
            Arg::opt(inputs.keep),
        ];
        if nk > 0 {
            let args: Vec<Arg> = head
                .iter()
                .copied()
                .chain([Arg::buf(dk), Arg::buf(dv)])
                .chain(common)
                .collect();
            let blocks = b * hk * tk.div_ceil(tile);
            launch(
                self,
                &ATTENTION,
                &entry::<T>("attention_backward_kv"),
                Grid::blocks(blocks, THREADS),
                &args,
            )?;
        }
        if nq > 0 {
            let args: Vec<Arg> = head.iter().copied().chain([Arg::buf(dq)]).chain(common).collect();
            let blocks = b * h * tq.div_ceil(tile);
            launch(
                self,
                &ATTENTION,
                &entry::<T>("attention_backward_q"),
                Grid::blocks(blocks, THREADS),
                &args,
            )?;
        }
        Ok(())
    }
}
