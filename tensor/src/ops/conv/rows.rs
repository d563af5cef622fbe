//! The CPU kernels of the causal depthwise conv over x laid out as `[B, C, L]` rows (each
//! channel's steps adjacent in memory): one task per (batch, channel) row.

use super::{activate, pre_grad, Taps};
use crate::FloatElement;
use num_traits::Zero;
use rayon::prelude::*;

/// The pre-activation of output step `t` of one row: `bias + Σ_j w[j]·x[t-(K-1)+j]` over the
/// taps whose input is at or after step 0, summed in tap order from zero.
#[inline(always)]
fn pre_at<T: FloatElement>(xr: &[T], wr: &[T::Acc], b0: T::Acc, t: usize) -> T::Acc {
    let k = wr.len();
    let j0 = (k - 1).saturating_sub(t);
    let taps = xr[t + j0 + 1 - k..=t].iter().zip(&wr[j0..]);
    b0 + taps.map(|(xv, &wv)| wv * xv.to_acc()).sum::<T::Acc>()
}

/// y `[B, C, L]` from x `[B, C, L]` (contiguous).
pub(super) fn forward<T: FloatElement>(xs: &[T], taps: &Taps<T::Acc>, len: usize, silu: bool) -> Vec<T> {
    let (c, k) = (taps.channels, taps.kernel);
    let mut out = vec![T::from_acc(Zero::zero()); xs.len()];
    if len > 0 {
        out.par_chunks_mut(len).enumerate().for_each(|(row, y)| {
            let ch = row % c;
            let (xr, wr) = (
                &xs[row * len..(row + 1) * len],
                &taps.weight[ch * k..(ch + 1) * k],
            );
            for (t, o) in y.iter_mut().enumerate() {
                *o = activate::<T>(pre_at::<T>(xr, wr, taps.bias[ch], t), silu);
            }
        });
    }
    out
}

/// (dx `[B, C, L]`, dweight `[C, K]`, dbias `[C]`) from x and dL/dy `[B, C, L]` (contiguous).
pub(super) fn backward<T: FloatElement>(
    xs: &[T],
    gs: &[T],
    taps: &Taps<T::Acc>,
    len: usize,
    silu: bool,
) -> (Vec<T>, Vec<T::Acc>, Vec<T::Acc>) {
    type A<T> = <T as FloatElement>::Acc;
    let (c, k, l) = (taps.channels, taps.kernel, len);
    let mut dx = vec![T::from_acc(Zero::zero()); xs.len()];
    // One pass per (b, c) row: dx of the row, and the row's [dw_0..dw_{K-1}, db].
    let partials: Vec<Vec<A<T>>> = if l > 0 {
        dx.par_chunks_mut(l)
            .enumerate()
            .map(|(row, d)| {
                let ch = row % c;
                let (xr, gr, wr) = (
                    &xs[row * l..][..l],
                    &gs[row * l..][..l],
                    &taps.weight[ch * k..][..k],
                );
                // dL/d(pre-activation) of every step.
                let gr: Vec<A<T>> = (0..l)
                    .map(|t| {
                        let pre = if silu {
                            pre_at::<T>(xr, wr, taps.bias[ch], t)
                        } else {
                            A::<T>::zero()
                        };
                        pre_grad::<T>(pre, gr[t], silu)
                    })
                    .collect();
                // dx[t] = Σ_j w[j] · g[t + (K-1) - j], over output times t' < L.
                for (t, o) in d.iter_mut().enumerate() {
                    let j0 = (t + k).saturating_sub(l);
                    let terms = wr[j0..].iter().zip(gr[t..=t + k - 1 - j0].iter().rev());
                    *o = T::from_acc(terms.map(|(&wv, &gv)| wv * gv).sum::<A<T>>());
                }
                // dw[j] = Σ_t g[t] · x[t - (K-1) + j]; db = Σ_t g[t].
                let mut p = vec![A::<T>::zero(); k + 1];
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
    let mut dw = vec![A::<T>::zero(); c * k];
    let mut db = vec![A::<T>::zero(); c];
    for (row, p) in partials.iter().enumerate() {
        let ch = row % c;
        dw[ch * k..(ch + 1) * k]
            .iter_mut()
            .zip(p)
            .for_each(|(u, &v)| *u += v);
        db[ch] += p[k];
    }
    (dx, dw, db)
}
