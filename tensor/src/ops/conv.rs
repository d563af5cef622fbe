//! Causal depthwise 1-D convolution (the short convolution of Mamba blocks), optionally
//! followed by SiLU, computed in the dtype's `Acc` type. The CPU kernels follow x's memory
//! order: `[B, C, L]` rows (`rows`) or channels-last (`channels_last`, read in place and
//! written channels-last), so a mixer that keeps its activations as `[B, L, C]` pays no
//! transposing copies.

use crate::dispatch::float_dispatch;
use crate::error::shape_err;
use crate::gpu::{cuda_float_dispatch, Gpu};
use crate::ops::unary::silu_fused;
use crate::storage::CpuStorage;
use crate::{FloatElement, Real, Result, Tensor, UnaryOp};
use cuda::kernels::{ConvGrads, ConvSpec};
use num_traits::Zero;

mod channels_last;
mod rows;

/// Checks x `[B, C, L]` and weight `[C, K]` (K > 0) of one dtype; returns (B, C, L, K).
fn check(op: &'static str, x: &Tensor, weight: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let (xs, ws) = (x.shape(), weight.shape());
    if xs.len() != 3 || ws.len() != 2 || ws[0] != xs[1] || ws[1] == 0 {
        return shape_err(
            op,
            format!("needs x [B, C, L] and weight [C, K>0], got {xs:?} and {ws:?}"),
        );
    }
    x.check_same_dtype(op, weight)?;
    Ok((xs[0], xs[1], xs[2], ws[1]))
}

/// Checks an optional bias against C channels and x's dtype.
fn check_bias(op: &'static str, x: &Tensor, bias: Option<&Tensor>, c: usize) -> Result<()> {
    if let Some(b) = bias {
        if b.shape() != [c] {
            return shape_err(op, format!("bias {:?} for {c} channels", b.shape()));
        }
        x.check_same_dtype(op, b)?;
    }
    Ok(())
}

/// The convolution's shape for the kernels.
fn spec(x: &Tensor, k: usize, silu: bool) -> ConvSpec {
    let s = x.shape();
    ConvSpec {
        batch: s[0],
        channels: s[1],
        len: s[2],
        kernel: k,
        silu,
    }
}

/// The weight `[C, K]` and the bias `[C]` (zeros without one) in the compute type.
struct Taps<A> {
    weight: Vec<A>,
    bias: Vec<A>,
    channels: usize,
    kernel: usize,
}

impl<A: Real> Taps<A> {
    fn new<T: FloatElement<Acc = A>>(weight: &Tensor, bias: Option<&Tensor>) -> Self {
        let (channels, kernel) = (weight.dim(0), weight.dim(1));
        let w = weight.contiguous();
        Taps {
            weight: w.contiguous_slice::<T>().iter().map(|v| v.to_acc()).collect(),
            bias: bias.map_or_else(
                || vec![A::zero(); channels],
                |b| b.to_vec_f64().into_iter().map(A::lit).collect(),
            ),
            channels,
            kernel,
        }
    }
}

/// The output from the pre-activation: rounded to T, then (with SiLU) SiLU of that, rounded
/// again, exactly as the unfused conv followed by the `silu` op rounds.
#[inline(always)]
fn activate<T: FloatElement>(pre: T::Acc, silu: bool) -> T {
    let y = T::from_acc(pre);
    if silu {
        T::from_acc(silu_fused(y.to_acc()))
    } else {
        y
    }
}

/// dL/d(pre-activation) from dL/dy `g`: with SiLU, `g · silu'(pre rounded to T)` rounded to T,
/// exactly as the unfused `silu` backward rounds it; else `g`.
#[inline(always)]
fn pre_grad<T: FloatElement>(pre: T::Acc, g: T, silu: bool) -> T::Acc {
    if silu {
        T::from_acc(g.to_acc() * UnaryOp::Silu.derivative(T::from_acc(pre).to_acc())).to_acc()
    } else {
        g.to_acc()
    }
}

/// `data` (dense `[B, L, C]`) seen as the `[B, C, L]` result.
fn channels_last_tensor<T: FloatElement>(data: Vec<T>, (b, c, l): (usize, usize, usize)) -> Result<Tensor> {
    Tensor::from_cpu(CpuStorage::from_vec(data), &[b, l, c]).transpose(1, 2)
}

/// The forward on a CUDA device.
fn conv_cuda(gpu: &Gpu, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, silu: bool) -> Result<Tensor> {
    let (xp, w) = (gpu.packed(x)?, gpu.packed(weight)?);
    let b = bias.map(|b| gpu.packed(b)).transpose()?;
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let mut y = gpu.alloc::<T>(xp.numel())?;
        let bb = b.as_ref().map(|b| b.cuda_buffer::<T>());
        let spec = spec(x, weight.dim(1), silu);
        gpu.check(gpu.dev.conv1d(xp.cuda_buffer::<T>(), w.cuda_buffer::<T>(), bb, &mut y, spec))?;
        Ok(gpu.tensor(y, x.shape()))
    })
}

/// The backward on a CUDA device: (dx, dweight, dbias).
fn conv_backward_cuda(
    gpu: &Gpu,
    (x, weight, bias): (&Tensor, &Tensor, Option<&Tensor>),
    grad: &Tensor,
    silu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (xp, w, g) = (gpu.packed(x)?, gpu.packed(weight)?, gpu.packed(grad)?);
    let b = bias.map(|b| gpu.packed(b)).transpose()?;
    let (c, k) = (x.dim(1), weight.dim(1));
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let mut dx = gpu.alloc::<T>(xp.numel())?;
        let (mut dw, mut db) = (gpu.alloc::<T>(c * k)?, gpu.alloc::<T>(c)?);
        let grads = ConvGrads { dx: &mut dx, dweight: &mut dw, dbias: &mut db };
        let operands = (xp.cuda_buffer::<T>(), w.cuda_buffer::<T>(), b.as_ref().map(|b| b.cuda_buffer::<T>()));
        gpu.check(gpu.dev.conv1d_backward(operands, g.cuda_buffer::<T>(), grads, spec(x, k, silu)))?;
        Ok((gpu.tensor(dx, x.shape()), gpu.tensor(dw, &[c, k]), gpu.tensor(db, &[c])))
    })
}

/// `conv1d_step` on a CUDA device: the state is copied, then rolled in place by the kernel.
fn step_cuda(
    gpu: &Gpu,
    state: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (sp, xp, w) = (gpu.packed(state)?, gpu.packed(x)?, gpu.packed(weight)?);
    let b = bias.map(|b| gpu.packed(b)).transpose()?;
    let (batch, channels, kernel) = (state.dim(0), state.dim(1), weight.dim(1));
    let spec = ConvSpec {
        batch,
        channels,
        len: 1,
        kernel,
        silu: false,
    };
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let mut rolled = gpu.alloc::<T>(sp.numel())?;
        gpu.check(gpu.dev.copy(sp.cuda_buffer::<T>(), &mut rolled))?;
        let mut y = gpu.alloc::<T>(batch * channels)?;
        let bb = b.as_ref().map(|b| b.cuda_buffer::<T>());
        let (xb, wb) = (xp.cuda_buffer::<T>(), w.cuda_buffer::<T>());
        gpu.check(gpu.dev.conv1d_update(&mut rolled, xb, wb, bb, &mut y, spec))?;
        Ok((gpu.tensor(y, &[batch, channels]), gpu.tensor(rolled, state.shape())))
    })
}

/// The forward of `conv1d_causal_depthwise` (`silu` false) and `conv1d_causal_depthwise_silu`.
fn conv(op: &'static str, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, silu: bool) -> Result<Tensor> {
    let (b, c, l, _) = check(op, x, weight)?;
    check_bias(op, x, bias, c)?;
    let mut operands = vec![x, weight];
    operands.extend(bias);
    if let Some(gpu) = Gpu::of(op, &operands)? {
        return conv_cuda(&gpu, x, weight, bias, silu);
    }
    float_dispatch!(op, x.dtype(), T => {
        let taps = Taps::new::<T>(weight, bias);
        if let Some(steps) = channels_last::Steps::<T>::of(x) {
            return channels_last_tensor(channels_last::forward(&steps, &taps, (b, l), silu), (b, c, l));
        }
        let x = x.contiguous();
        let y = rows::forward(x.contiguous_slice::<T>(), &taps, l, silu);
        Ok(Tensor::from_cpu(CpuStorage::from_vec(y), x.shape()))
    })
}

/// The backward of `conv` from x and dL/dy: (dx, dweight, dbias).
fn conv_backward(
    op: &'static str,
    (x, weight, bias): (&Tensor, &Tensor, Option<&Tensor>),
    grad: &Tensor,
    silu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, c, l, k) = check(op, x, weight)?;
    check_bias(op, x, bias, c)?;
    if grad.shape() != x.shape() {
        return shape_err(
            op,
            format!("input {:?} vs gradient {:?}", x.shape(), grad.shape()),
        );
    }
    x.check_same_dtype(op, grad)?;
    let mut operands = vec![x, weight, grad];
    operands.extend(bias);
    if let Some(gpu) = Gpu::of(op, &operands)? {
        return conv_backward_cuda(&gpu, (x, weight, bias), grad, silu);
    }
    float_dispatch!(op, x.dtype(), T => {
        let taps = Taps::new::<T>(weight, bias);
        let narrow = |v: Vec<<T as FloatElement>::Acc>| v.into_iter().map(T::from_acc).collect::<Vec<T>>();
        let params = |dw, db| (
            Tensor::from_cpu(CpuStorage::from_vec(narrow(dw)), &[c, k]),
            Tensor::from_cpu(CpuStorage::from_vec(narrow(db)), &[c]),
        );
        if let Some(xs) = channels_last::Steps::<T>::of(x) {
            // The gradient channels-last as well (a copy only when it is not).
            let g = match channels_last::Steps::<T>::of(grad) {
                Some(_) => grad.clone(),
                None => grad.transpose(1, 2)?.contiguous().transpose(1, 2)?,
            };
            let gs = channels_last::Steps::<T>::of(&g).expect("channels-last by construction");
            let (dx, dw, db) = channels_last::backward(&xs, &gs, &taps, (b, l), silu);
            let (dw, db) = params(dw, db);
            return Ok((channels_last_tensor(dx, (b, c, l))?, dw, db));
        }
        let (xc, g) = (x.contiguous(), grad.contiguous());
        let (dx, dw, db) = rows::backward(xc.contiguous_slice::<T>(), g.contiguous_slice::<T>(), &taps, l, silu);
        let (dw, db) = params(dw, db);
        Ok((Tensor::from_cpu(CpuStorage::from_vec(dx), x.shape()), dw, db))
    })
}

impl Tensor {
    /// Causal depthwise convolution of `self` = x `[B, C, L]` with `weight` `[C, K]` and an
    /// optional `bias` `[C]`, all of one float dtype:
    /// `y[b,c,t] = bias[c] + Σ_k weight[c,k] · x[b,c,t-(K-1)+k]`, with x zero before the
    /// sequence start. The result is `[B, C, L]`; on the CPU it is stored channels-last (a
    /// transposed `[B, L, C]`) when x's channels are adjacent in memory.
    pub fn conv1d_causal_depthwise(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        conv("conv1d_causal_depthwise", self, weight, bias, false)
    }

    /// `silu(conv1d_causal_depthwise(x))` in one pass, rounded exactly as the two ops are.
    pub fn conv1d_causal_depthwise_silu(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        conv("conv1d_causal_depthwise_silu", self, weight, bias, true)
    }

    /// One decoding step of `conv1d_causal_depthwise`: `self` = state `[B, C, K-1]` holds the
    /// previous K-1 inputs of each channel, `x` `[B, C]` is the next one. Returns
    /// `y[b,c] = bias[c] + Σ_k weight[c,k] · [state, x][b,c,k]` `[B, C]`, computed in the compute
    /// type and rounded once, and the state after `x` (shifted left by one, ending with `x`).
    /// Stepping through a sequence gives the outputs of the full convolution.
    pub fn conv1d_step(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let op = "conv1d_step";
        let (b, c, keep) = match self.shape() {
            &[b, c, keep] => (b, c, keep),
            other => return shape_err(op, format!("needs state [B, C, K-1], got {other:?}")),
        };
        if x.shape() != [b, c] || weight.shape() != [c, keep + 1] || bias.is_some_and(|t| t.shape() != [c]) {
            return shape_err(
                op,
                format!(
                    "state {:?} needs x [{b}, {c}], weight [{c}, {}] and bias [{c}], got x {:?}, weight {:?}, bias {:?}",
                    self.shape(),
                    keep + 1,
                    x.shape(),
                    weight.shape(),
                    bias.map(Tensor::shape)
                ),
            );
        }
        let mut operands = vec![self, x, weight];
        operands.extend(bias);
        for t in &operands[1..] {
            self.check_same_dtype(op, t)?;
        }
        if let Some(gpu) = Gpu::of(op, &operands)? {
            return step_cuda(&gpu, self, x, weight, bias);
        }
        let k = keep + 1;
        let (state, x, w) = (self.contiguous(), x.contiguous(), weight.contiguous());
        float_dispatch!(op, self.dtype(), T => {
            type A = <T as FloatElement>::Acc;
            let (ss, xs, ws) = (state.contiguous_slice::<T>(), x.contiguous_slice::<T>(), w.contiguous_slice::<T>());
            let bs: Option<Vec<A>> = bias.map(|t| t.to_vec_f64().into_iter().map(A::lit).collect());
            let mut y = Vec::with_capacity(b * c);
            let mut rolled = Vec::with_capacity(ss.len());
            for row in 0..b * c {
                let ch = row % c;
                let window = ss[row * keep..(row + 1) * keep].iter().chain(std::iter::once(&xs[row]));
                let b0 = bs.as_ref().map_or(A::zero(), |bv| bv[ch]);
                let taps = window.clone().zip(&ws[ch * k..(ch + 1) * k]);
                y.push(T::from_acc(b0 + taps.map(|(v, wv)| wv.to_acc() * v.to_acc()).sum::<A>()));
                rolled.extend(window.skip(1).copied());
            }
            Ok((
                Tensor::from_cpu(CpuStorage::from_vec(y), &[b, c]),
                Tensor::from_cpu(CpuStorage::from_vec(rolled), self.shape()),
            ))
        })
    }

    /// Backward of `conv1d_causal_depthwise` with `self` = x and `grad` = dL/dy (shape and
    /// dtype of x): returns (dx `[B, C, L]`, dweight `[C, K]`, dbias `[C]`). dbias is
    /// Σ_{b,t} grad; it is meaningful only when the forward pass had a bias.
    pub fn conv1d_causal_depthwise_backward(
        &self,
        weight: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        conv_backward(
            "conv1d_causal_depthwise_backward",
            (self, weight, None),
            grad,
            false,
        )
    }

    /// Backward of `conv1d_causal_depthwise_silu` with `self` = x and `grad` = dL/dy: the
    /// pre-activation is recomputed from x, `weight` and `bias` (the forward's), and the
    /// gradients are those of the unfused conv and `silu`, rounded as they round.
    pub fn conv1d_causal_depthwise_silu_backward(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        conv_backward(
            "conv1d_causal_depthwise_silu_backward",
            (self, weight, bias),
            grad,
            true,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Tensor};

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn kernel_of_two_mixes_previous_and_current_step() {
        let x = Tensor::from_vec(vec![1f64, 2., 3.], &[1, 1, 3]).unwrap();
        let w = Tensor::from_vec(vec![10f64, 1.], &[1, 2]).unwrap();
        let b = Tensor::from_vec(vec![0.5f64], &[1]).unwrap();
        let y = x.conv1d_causal_depthwise(&w, Some(&b)).unwrap();
        assert_eq!(y.to_vec_f64(), vec![1.5, 12.5, 23.5]);
        let (dx, dw, db) = x
            .conv1d_causal_depthwise_backward(&w, &Tensor::ones(&[1, 1, 3], DType::F64))
            .unwrap();
        assert_eq!(dx.to_vec_f64(), vec![11., 11., 1.]);
        assert_eq!(dw.to_vec_f64(), vec![3., 6.]);
        assert_eq!(db.to_vec_f64(), vec![3.]);
    }

    #[test]
    fn kernel_longer_than_the_sequence_per_channel() {
        // B = 2, C = 2, L = 2, K = 3: y[t] = w2·x[t] + w1·x[t-1] (+ w0·x[t-2], always zero).
        let x = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6., 7., 8.], &[2, 2, 2]).unwrap();
        let w = Tensor::from_vec(vec![100f32, 10., 1., 0., 1., -1.], &[2, 3]).unwrap();
        let y = x.conv1d_causal_depthwise(&w, None).unwrap();
        assert_eq!(
            y.to_vec::<f32>().unwrap(),
            vec![1., 12., -3., -1., 5., 56., -7., -1.]
        );
        let g = Tensor::from_vec(vec![1f32, 1., 1., 0., 2., 0., 0., 1.], &[2, 2, 2]).unwrap();
        let (dx, dw, db) = x.conv1d_causal_depthwise_backward(&w, &g).unwrap();
        // dx[t] = w2·g[t] + w1·g[t+1].
        assert_eq!(
            dx.to_vec::<f32>().unwrap(),
            vec![11., 1., -1., 0., 2., 0., 1., -1.]
        );
        // dw[c] = [0, Σ g[t]·x[t-1], Σ g[t]·x[t]]; db[c] = Σ g.
        assert_eq!(dw.to_vec::<f32>().unwrap(), vec![0., 1., 13., 0., 7., 11.]);
        assert_eq!(db.to_vec::<f32>().unwrap(), vec![4., 2.]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let xv: Vec<f64> = (0..10).map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0).collect();
        let gv: Vec<f64> = (0..10).map(|i| ((i * 3 % 7) as f64 - 3.0) / 2.0).collect();
        let w = Tensor::from_vec(vec![0.3f64, -0.7, 1.1, 0.2, 0.5, -1.3], &[2, 3]).unwrap();
        let loss = |x: &[f64]| -> f64 {
            let y = Tensor::from_slice(x, &[1, 2, 5])
                .unwrap()
                .conv1d_causal_depthwise(&w, None)
                .unwrap();
            y.to_vec_f64().iter().zip(&gv).map(|(a, b)| a * b).sum()
        };
        let x = Tensor::from_slice(&xv, &[1, 2, 5]).unwrap();
        let g = Tensor::from_slice(&gv, &[1, 2, 5]).unwrap();
        let (dx, _, _) = x.conv1d_causal_depthwise_backward(&w, &g).unwrap();
        let numeric: Vec<f64> = (0..xv.len())
            .map(|i| {
                let (mut p, mut m) = (xv.clone(), xv.clone());
                p[i] += 1e-6;
                m[i] -= 1e-6;
                (loss(&p) - loss(&m)) / 2e-6
            })
            .collect();
        assert!(close(&dx.to_vec_f64(), &numeric, 1e-8), "{dx:?} vs {numeric:?}");
    }

    #[test]
    fn checks_shapes_and_dtypes() {
        let x = Tensor::ones(&[1, 2, 3], DType::F32);
        let w = Tensor::ones(&[2, 2], DType::F32);
        assert!(x
            .conv1d_causal_depthwise(&Tensor::ones(&[3, 2], DType::F32), None)
            .is_err());
        assert!(x
            .conv1d_causal_depthwise(&Tensor::ones(&[2, 0], DType::F32), None)
            .is_err());
        assert!(x
            .conv1d_causal_depthwise(&w.to_dtype(DType::F64).unwrap(), None)
            .is_err());
        assert!(x
            .conv1d_causal_depthwise(&w, Some(&Tensor::ones(&[3], DType::F32)))
            .is_err());
        assert!(x
            .conv1d_causal_depthwise(&w, Some(&Tensor::ones(&[2], DType::BF16)))
            .is_err());
        assert!(x
            .conv1d_causal_depthwise_backward(&w, &Tensor::ones(&[1, 2, 3], DType::F64))
            .is_err());
        assert!(x
            .conv1d_causal_depthwise_backward(&w, &Tensor::ones(&[1, 2, 2], DType::F32))
            .is_err());
        let u = Tensor::ones(&[1, 2, 3], DType::U32);
        assert!(u
            .conv1d_causal_depthwise(&Tensor::ones(&[2, 2], DType::U32), None)
            .is_err());
        let empty = Tensor::ones(&[2, 2, 0], DType::BF16);
        let (dx, dw, db) = empty
            .conv1d_causal_depthwise_backward(&w.to_dtype(DType::BF16).unwrap(), &empty)
            .unwrap();
        assert_eq!(
            (dx.shape(), dw.to_vec_f64(), db.to_vec_f64()),
            (&[2, 2, 0][..], vec![0.; 4], vec![0.; 2])
        );
    }

    #[test]
    fn stepping_through_a_sequence_gives_the_full_convolution() {
        let (b, c, l, k) = (2, 3, 7, 4);
        let mut rng = crate::seeded_rng(3);
        let x = Tensor::randn(&[b, c, l], DType::F32, 0.0, 1.0, &mut rng).unwrap();
        let w = Tensor::randn(&[c, k], DType::F32, 0.0, 1.0, &mut rng).unwrap();
        let bias = Tensor::randn(&[c], DType::F32, 0.0, 1.0, &mut rng).unwrap();
        let full = x.conv1d_causal_depthwise(&w, Some(&bias)).unwrap();
        let mut state = Tensor::zeros(&[b, c, k - 1], DType::F32);
        for t in 0..l {
            let xt = x.narrow(2, t, 1).unwrap().reshape(&[b, c]).unwrap();
            let (y, next) = state.conv1d_step(&xt, &w, Some(&bias)).unwrap();
            let want = full.narrow(2, t, 1).unwrap().reshape(&[b, c]).unwrap();
            // The same taps in the same order (zeros for the steps before the start): exact.
            assert_eq!(y.to_vec_f64(), want.to_vec_f64(), "step {t}");
            state = next;
        }
        // The state holds the last K-1 inputs.
        let last = x.narrow(2, l - (k - 1), k - 1).unwrap();
        assert_eq!(state.to_vec_f64(), last.to_vec_f64());
        let err = state.conv1d_step(&w, &w, None).unwrap_err().to_string();
        assert!(err.contains("needs x [2, 3]"), "{err}");
    }
}
