//! Causal depthwise 1-D convolution (the short convolution of Mamba blocks), parallel over
//! (batch, channel) rows and computed in the dtype's `Acc` type.

use crate::dispatch::float_dispatch;
use crate::error::shape_err;
use crate::gpu::{cuda_float_dispatch, Gpu};
use crate::storage::CpuStorage;
use crate::{FloatElement, Real, Result, Tensor};
use cuda::kernels::{ConvGrads, ConvSpec};
use num_traits::Zero;
use rayon::prelude::*;

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

/// The convolution's shape for the kernels (no fused SiLU).
fn spec(x: &Tensor, k: usize) -> ConvSpec {
    let s = x.shape();
    ConvSpec {
        batch: s[0],
        channels: s[1],
        len: s[2],
        kernel: k,
        silu: false,
    }
}

/// `conv1d_causal_depthwise` on a CUDA device.
fn conv_cuda(gpu: &Gpu, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, k: usize) -> Result<Tensor> {
    let (xp, w) = (gpu.packed(x)?, gpu.packed(weight)?);
    let b = bias.map(|b| gpu.packed(b)).transpose()?;
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let mut y = gpu.alloc::<T>(xp.numel())?;
        let bb = b.as_ref().map(|b| b.cuda_buffer::<T>());
        gpu.check(gpu.dev.conv1d(xp.cuda_buffer::<T>(), w.cuda_buffer::<T>(), bb, &mut y, spec(x, k)))?;
        Ok(gpu.tensor(y, x.shape()))
    })
}

/// `conv1d_causal_depthwise_backward` on a CUDA device: (dx, dweight, dbias).
fn conv_backward_cuda(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    k: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (xp, w, g) = (gpu.packed(x)?, gpu.packed(weight)?, gpu.packed(grad)?);
    let c = x.dim(1);
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let mut dx = gpu.alloc::<T>(xp.numel())?;
        let (mut dw, mut db) = (gpu.alloc::<T>(c * k)?, gpu.alloc::<T>(c)?);
        let grads = ConvGrads { dx: &mut dx, dweight: &mut dw, dbias: &mut db };
        let operands = (xp.cuda_buffer::<T>(), w.cuda_buffer::<T>(), None);
        gpu.check(gpu.dev.conv1d_backward(operands, g.cuda_buffer::<T>(), grads, spec(x, k)))?;
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

impl Tensor {
    /// Causal depthwise convolution of `self` = x `[B, C, L]` with `weight` `[C, K]` and an
    /// optional `bias` `[C]`, all of one float dtype:
    /// `y[b,c,t] = bias[c] + Σ_k weight[c,k] · x[b,c,t-(K-1)+k]`, with x zero before the
    /// sequence start. The result is `[B, C, L]`.
    pub fn conv1d_causal_depthwise(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (_, c, l, k) = check("conv1d_causal_depthwise", self, weight)?;
        if let Some(b) = bias {
            if b.shape() != [c] {
                return shape_err(
                    "conv1d_causal_depthwise",
                    format!("bias {:?} for {c} channels", b.shape()),
                );
            }
            self.check_same_dtype("conv1d_causal_depthwise", b)?;
        }
        let mut operands = vec![self, weight];
        operands.extend(bias);
        if let Some(gpu) = Gpu::of("conv1d_causal_depthwise", &operands)? {
            return conv_cuda(&gpu, self, weight, bias, k);
        }
        let (x, w) = (self.contiguous(), weight.contiguous());
        float_dispatch!("conv1d_causal_depthwise", self.dtype(), T => {
            type A = <T as FloatElement>::Acc;
            let (xs, ws) = (x.contiguous_slice::<T>(), w.contiguous_slice::<T>());
            let ws: Vec<A> = ws.iter().map(|v| v.to_acc()).collect();
            let bs: Option<Vec<A>> = bias.map(|b| b.to_vec_f64().into_iter().map(A::lit).collect());
            let mut out = vec![T::from_acc(Zero::zero()); xs.len()];
            if l > 0 {
                out.par_chunks_mut(l).enumerate().for_each(|(row, y)| {
                    let ch = row % c;
                    let (xr, wr) = (&xs[row * l..(row + 1) * l], &ws[ch * k..(ch + 1) * k]);
                    let b0 = bs.as_ref().map_or(A::zero(), |b| b[ch]);
                    for (t, o) in y.iter_mut().enumerate() {
                        // Taps j with input time t - (K-1) + j >= 0.
                        let j0 = (k - 1).saturating_sub(t);
                        let taps = xr[t + j0 + 1 - k..=t].iter().zip(&wr[j0..]);
                        *o = T::from_acc(b0 + taps.map(|(xv, &wv)| wv * xv.to_acc()).sum::<A>());
                    }
                });
            }
            Ok(Tensor::from_cpu(CpuStorage::from_vec(out), self.shape()))
        })
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
        let op = "conv1d_causal_depthwise_backward";
        let (_, c, l, k) = check(op, self, weight)?;
        if grad.shape() != self.shape() {
            return shape_err(
                op,
                format!("input {:?} vs gradient {:?}", self.shape(), grad.shape()),
            );
        }
        self.check_same_dtype(op, grad)?;
        if let Some(gpu) = Gpu::of(op, &[self, weight, grad])? {
            return conv_backward_cuda(&gpu, self, weight, grad, k);
        }
        let (x, w, g) = (self.contiguous(), weight.contiguous(), grad.contiguous());
        float_dispatch!(op, self.dtype(), T => {
            type A = <T as FloatElement>::Acc;
            let (xs, gs) = (x.contiguous_slice::<T>(), g.contiguous_slice::<T>());
            let ws: Vec<A> = w.contiguous_slice::<T>().iter().map(|v| v.to_acc()).collect();
            let mut dx = vec![T::from_acc(Zero::zero()); xs.len()];
            // One pass per (b, c) row: dx of the row, and the row's [dw_0..dw_{K-1}, db].
            let partials: Vec<Vec<A>> = if l > 0 {
                dx.par_chunks_mut(l)
                    .enumerate()
                    .map(|(row, d)| {
                        let ch = row % c;
                        let (xr, gr, wr) = (&xs[row * l..][..l], &gs[row * l..][..l], &ws[ch * k..][..k]);
                        let gr: Vec<A> = gr.iter().map(|v| v.to_acc()).collect();
                        // dx[t] = Σ_j w[j] · g[t + (K-1) - j], over output times t' < L.
                        for (t, o) in d.iter_mut().enumerate() {
                            let j0 = (t + k).saturating_sub(l);
                            let taps = wr[j0..].iter().zip(gr[t..=t + k - 1 - j0].iter().rev());
                            *o = T::from_acc(taps.map(|(&wv, &gv)| wv * gv).sum::<A>());
                        }
                        // dw[j] = Σ_t g[t] · x[t - (K-1) + j]; db = Σ_t g[t].
                        let mut p = vec![A::zero(); k + 1];
                        for (j, dw) in p[..k].iter_mut().enumerate() {
                            let shift = k - 1 - j;
                            if shift < l {
                                *dw = gr[shift..].iter().zip(xr).map(|(&gv, xv)| gv * xv.to_acc()).sum();
                            }
                        }
                        p[k] = gr.iter().copied().sum();
                        p
                    })
                    .collect()
            } else {
                Vec::new()
            };
            // Per channel, summed over the batch in order (independent of the thread count).
            let mut dw = vec![A::zero(); c * k];
            let mut db = vec![A::zero(); c];
            for (row, p) in partials.iter().enumerate() {
                let ch = row % c;
                dw[ch * k..(ch + 1) * k].iter_mut().zip(p).for_each(|(u, &v)| *u += v);
                db[ch] += p[k];
            }
            let narrow = |v: Vec<A>| v.into_iter().map(T::from_acc).collect::<Vec<T>>();
            Ok((
                Tensor::from_cpu(CpuStorage::from_vec(dx), self.shape()),
                Tensor::from_cpu(CpuStorage::from_vec(narrow(dw)), &[c, k]),
                Tensor::from_cpu(CpuStorage::from_vec(narrow(db)), &[c]),
            ))
        })
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
