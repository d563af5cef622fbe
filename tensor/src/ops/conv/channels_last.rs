//! The CPU kernels of the causal depthwise conv over channels-last x: a `[B, C, L]` view whose
//! C channels of each step are adjacent in memory (a transposed `[B, L, C]` tensor, or a slice
//! of one, as Mamba's in_proj output is). Each step is then a vector of C values, and every
//! loop runs along the channels: x is read in place, with no transposing copy, and the
//! outputs are written channels-last too.

use super::{activate, pre_grad, Taps};
use crate::ops::elementwise::with_simd;
use crate::ops::par_write::par_write;
use crate::{FloatElement, Real, Tensor};
use num_traits::Zero;
use rayon::prelude::*;

/// Output steps per task of the forward pass.
const FORWARD_STEPS: usize = 16;
/// Steps per block of the backward pass: its weight-gradient partial sums, added in block
/// order, fix the order of summation independently of the thread count.
const BACKWARD_STEPS: usize = 64;

/// The steps of a channels-last `[B, C, L]` view: step t of sequence b is the C values at
/// `offset + b·batch_stride + t·time_stride`.
pub(super) struct Steps<'a, T> {
    data: &'a [T],
    offset: usize,
    batch_stride: usize,
    time_stride: usize,
    channels: usize,
}

impl<'a, T: FloatElement> Steps<'a, T> {
    /// The steps of `t` (on the CPU) when it is a `[B, C, L]` view with adjacent channels (C > 1).
    pub(super) fn of(t: &'a Tensor) -> Option<Self> {
        let (shape, strides) = (t.shape(), t.layout().strides());
        (shape.len() == 3 && shape[1] > 1 && strides[1] == 1).then(|| Steps {
            data: t.storage_slice::<T>(),
            offset: t.layout().offset(),
            batch_stride: strides[0],
            time_stride: strides[2],
            channels: shape[1],
        })
    }

    /// The C values of step `t` of sequence `b`.
    #[inline(always)]
    fn at(&self, b: usize, t: usize) -> &'a [T] {
        &self.data[self.offset + b * self.batch_stride + t * self.time_stride..][..self.channels]
    }
}

/// The weight as `[K, C]`: tap j's weights of all channels adjacent.
fn by_tap<A: Real>(taps: &Taps<A>) -> Vec<A> {
    let (c, k) = (taps.channels, taps.kernel);
    (0..k * c).map(|i| taps.weight[(i % c) * k + i / c]).collect()
}

/// `acc += Σ_j w[j]·x[t-(K-1)+j]` per channel over the taps whose input is at or after step 0,
/// in tap order: the same sum, in the same order, as the row kernel's.
#[inline(always)]
fn add_taps<T: FloatElement>(acc: &mut [T::Acc], x: &Steps<'_, T>, w: &[T::Acc], b: usize, t: usize) {
    let c = acc.len();
    let k = w.len() / c;
    for j in (k - 1).saturating_sub(t)..k {
        let (xr, wr) = (x.at(b, t + j + 1 - k), &w[j * c..][..c]);
        for ((a, &xv), &wv) in acc.iter_mut().zip(xr).zip(wr) {
            *a += wv * xv.to_acc();
        }
    }
}

/// y as a dense `[B, L, C]` vector.
pub(super) fn forward<T: FloatElement>(
    x: &Steps<'_, T>,
    taps: &Taps<T::Acc>,
    (batch, len): (usize, usize),
    silu: bool,
) -> Vec<T> {
    let c = taps.channels;
    let w = by_tap(taps);
    // SAFETY: every task writes all C values of each of its steps (the pieces are whole steps).
    unsafe {
        par_write(batch * len * c, FORWARD_STEPS * c, |task, piece| {
            with_simd(
                #[inline(always)]
                || {
                    let mut acc = vec![T::Acc::zero(); c];
                    for (i, out) in piece.chunks_mut(c).enumerate() {
                        let step = task * FORWARD_STEPS + i;
                        let (b, t) = (step / len, step % len);
                        acc.fill(T::Acc::zero());
                        add_taps(&mut acc, x, &w, b, t);
                        for ((o, &a), &b0) in out.iter_mut().zip(&acc).zip(&taps.bias) {
                            o.write(activate::<T>(b0 + a, silu));
                        }
                    }
                },
            )
        })
    }
}

/// (dx as a dense `[B, L, C]` vector, dweight `[C, K]`, dbias `[C]`) from x and dL/dy, both
/// channels-last.
pub(super) fn backward<T: FloatElement>(
    x: &Steps<'_, T>,
    g: &Steps<'_, T>,
    taps: &Taps<T::Acc>,
    (batch, len): (usize, usize),
    silu: bool,
) -> (Vec<T>, Vec<T::Acc>, Vec<T::Acc>) {
    type A<T> = <T as FloatElement>::Acc;
    let (c, k) = (taps.channels, taps.kernel);
    let w = by_tap(taps);
    let mut dx = vec![T::from_acc(A::<T>::zero()); batch * len * c];
    // (sequence, first step) of every block, each with its own rows of dx.
    let starts: Vec<(usize, usize)> = (0..batch)
        .flat_map(|b| (0..len).step_by(BACKWARD_STEPS).map(move |t| (b, t)))
        .collect();
    let pieces: Vec<&mut [T]> = if c * len == 0 {
        Vec::new()
    } else {
        dx.chunks_mut(len * c)
            .flat_map(|seq| seq.chunks_mut(BACKWARD_STEPS * c))
            .collect()
    };
    // Per block: [dw by tap (K x C), db (C)].
    let partials: Vec<Vec<A<T>>> = starts
        .into_par_iter()
        .zip(pieces)
        .map(|((b, t0), dx)| {
            with_simd(
                #[inline(always)]
                || {
                    let t1 = (t0 + BACKWARD_STEPS).min(len);
                    // dL/d(pre-activation) of steps t0 .. t1+K-1, the ones dx of the block reads.
                    let ext = (t1 + k - 1).min(len);
                    let mut gp = vec![A::<T>::zero(); (ext - t0) * c];
                    let mut acc = vec![A::<T>::zero(); c];
                    for (t, row) in (t0..ext).zip(gp.chunks_mut(c)) {
                        if silu {
                            acc.fill(A::<T>::zero());
                            add_taps(&mut acc, x, &w, b, t);
                        }
                        for (((o, &gv), &a), &b0) in row.iter_mut().zip(g.at(b, t)).zip(&acc).zip(&taps.bias)
                        {
                            *o = pre_grad::<T>(b0 + a, gv, silu);
                        }
                    }
                    // dx[t] = Σ_j w[j] · g[t + (K-1) - j] over output steps before L, in tap order.
                    for (t, out) in (t0..t1).zip(dx.chunks_mut(c)) {
                        acc.fill(A::<T>::zero());
                        for j in (t + k).saturating_sub(len)..k {
                            let (gr, wr) = (&gp[(t + k - 1 - j - t0) * c..][..c], &w[j * c..][..c]);
                            for ((a, &gv), &wv) in acc.iter_mut().zip(gr).zip(wr) {
                                *a += wv * gv;
                            }
                        }
                        for (o, &a) in out.iter_mut().zip(&acc) {
                            *o = T::from_acc(a);
                        }
                    }
                    // dw[j] += g[t] · x[t - (K-1) + j]; db += g[t].
                    let mut part = vec![A::<T>::zero(); (k + 1) * c];
                    for (t, gr) in (t0..t1).zip(gp.chunks(c)) {
                        for j in (k - 1).saturating_sub(t)..k {
                            let xr = x.at(b, t + j + 1 - k);
                            for ((p, &gv), &xv) in part[j * c..][..c].iter_mut().zip(gr).zip(xr) {
                                *p += gv * xv.to_acc();
                            }
                        }
                        for (p, &gv) in part[k * c..].iter_mut().zip(gr) {
                            *p += gv;
                        }
                    }
                    part
                },
            )
        })
        .collect();
    let mut dw = vec![A::<T>::zero(); c * k];
    let mut db = vec![A::<T>::zero(); c];
    for part in &partials {
        for (j, tap) in part.chunks(c).take(k).enumerate() {
            for (ch, &v) in tap.iter().enumerate() {
                dw[ch * k + j] += v;
            }
        }
        db.iter_mut().zip(&part[k * c..]).for_each(|(d, &v)| *d += v);
    }
    (dx, dw, db)
}
