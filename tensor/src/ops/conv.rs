//! Causal depthwise 1-D convolution (the short convolution of Mamba blocks), parallel over
//! (batch, channel) rows.

use crate::dispatch::float_dispatch;
use crate::error::shape_err;
use crate::storage::CpuStorage;
use crate::{FloatElement, Real, Result, Tensor};
use num_traits::Zero;
use rayon::prelude::*;

/// Checks x `[B, C, L]` and weight `[C, K]`; returns (B, C, L, K).
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

impl Tensor {
    /// `self` = x `[B, C, L]`, `weight` `[C, K]`, optional `bias` `[C]`:
    /// `y[b,c,t] = bias[c] + Σ_k weight[c,k] · x[b,c,t-(K-1)+k]`, zero before the sequence start.
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
        let (x, w) = (self.contiguous(), weight.contiguous());
        float_dispatch!("conv1d_causal_depthwise", self.dtype(), T => {
            let (xs, ws) = (x.contiguous_slice::<T>(), w.contiguous_slice::<T>());
            let bs = bias.map(|b| b.to_vec_f64());
            let mut out = vec![T::from_acc(Zero::zero()); xs.len()];
            if l > 0 {
                out.par_chunks_mut(l).enumerate().for_each(|(row, y)| {
                    let ch = row % c;
                    let (xr, wr) = (&xs[row * l..(row + 1) * l], &ws[ch * k..(ch + 1) * k]);
                    let b0 = bs.as_ref().map_or(0.0, |b| b[ch]);
                    for (t, o) in y.iter_mut().enumerate() {
                        let mut acc = <T as FloatElement>::Acc::lit(b0);
                        for (j, wv) in wr.iter().enumerate() {
                            // Input time index t - (K-1) + j, skipped before the start.
                            if let Some(ti) = (t + j).checked_sub(k - 1) {
                                acc += wv.to_acc() * xr[ti].to_acc();
                            }
                        }
                        *o = T::from_acc(acc);
                    }
                });
            }
            Ok(Tensor::from_cpu(CpuStorage::from_vec(out), self.shape()))
        })
    }

    /// Backward with `self` = x: returns (dx, dweight, dbias).
    pub fn conv1d_causal_depthwise_backward(
        &self,
        weight: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, c, l, k) = check("conv1d_causal_depthwise_backward", self, weight)?;
        if grad.shape() != self.shape() {
            return shape_err(
                "conv1d_causal_depthwise_backward",
                format!("input {:?} vs gradient {:?}", self.shape(), grad.shape()),
            );
        }
        let (x, w, g) = (self.contiguous(), weight.contiguous(), grad.contiguous());
        float_dispatch!("conv1d_causal_depthwise_backward", self.dtype(), T => {
            type A = <T as FloatElement>::Acc;
            let (xs, ws, gs) = (x.contiguous_slice::<T>(), w.contiguous_slice::<T>(), g.contiguous_slice::<T>());
            // dx[t] = Σ_j w[j] · g[t + (K-1) - j], over output times inside the sequence.
            let mut dx = vec![T::from_acc(Zero::zero()); xs.len()];
            if l > 0 {
                dx.par_chunks_mut(l).enumerate().for_each(|(row, d)| {
                    let ch = row % c;
                    let (gr, wr) = (&gs[row * l..(row + 1) * l], &ws[ch * k..(ch + 1) * k]);
                    for (t, o) in d.iter_mut().enumerate() {
                        let mut acc = A::zero();
                        for (j, wv) in wr.iter().enumerate() {
                            let to = t + k - 1 - j;
                            if to < l {
                                acc += wv.to_acc() * gr[to].to_acc();
                            }
                        }
                        *o = T::from_acc(acc);
                    }
                });
            }
            // dw[c, j] = Σ_b Σ_t g[b,c,t] · x[b,c,t-(K-1)+j]; db[c] = Σ_b Σ_t g[b,c,t].
            let per_channel: Vec<(Vec<A>, A)> = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let mut dw = vec![A::zero(); k];
                    let mut db = A::zero();
                    for bi in 0..b {
                        let row = bi * c + ch;
                        let (xr, gr) = (&xs[row * l..(row + 1) * l], &gs[row * l..(row + 1) * l]);
                        for (t, gv) in gr.iter().enumerate() {
                            let gv = gv.to_acc();
                            db += gv;
                            for (j, d) in dw.iter_mut().enumerate() {
                                if let Some(ti) = (t + j).checked_sub(k - 1) {
                                    *d += gv * xr[ti].to_acc();
                                }
                            }
                        }
                    }
                    (dw, db)
                })
                .collect();
            let dw: Vec<T> = per_channel.iter().flat_map(|(dw, _)| dw.iter().map(|&v| T::from_acc(v))).collect();
            let db: Vec<T> = per_channel.iter().map(|(_, db)| T::from_acc(*db)).collect();
            Ok((
                Tensor::from_cpu(CpuStorage::from_vec(dx), self.shape()),
                Tensor::from_cpu(CpuStorage::from_vec(dw), &[c, k]),
                Tensor::from_cpu(CpuStorage::from_vec(db), &[c]),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::Tensor;

    #[test]
    fn kernel_of_two_mixes_previous_and_current_step() {
        let x = Tensor::from_vec(vec![1f64, 2., 3.], &[1, 1, 3]).unwrap();
        let w = Tensor::from_vec(vec![10f64, 1.], &[1, 2]).unwrap();
        let b = Tensor::from_vec(vec![0.5f64], &[1]).unwrap();
        let y = x.conv1d_causal_depthwise(&w, Some(&b)).unwrap();
        assert_eq!(y.to_vec_f64(), vec![1.5, 12.5, 23.5]);
        let (dx, dw, db) = x
            .conv1d_causal_depthwise_backward(&w, &Tensor::ones(&[1, 1, 3], crate::DType::F64))
            .unwrap();
        assert_eq!(dx.to_vec_f64(), vec![11., 11., 1.]);
        assert_eq!(dw.to_vec_f64(), vec![3., 6.]);
        assert_eq!(db.to_vec_f64(), vec![3.]);
    }
}
