//! Shared machinery of elementwise kernels: parallel maps over one, two or three
//! (broadcast) operands.

use crate::layout::{broadcast_shapes, Layout};
use crate::tensor::PAR_CHUNK;
use crate::{Element, Result, Tensor};
use rayon::prelude::*;

/// Fills `out` in parallel chunks; `fill(start, chunk)` writes elements `start..start+chunk.len()`.
fn par_fill<O: Element>(n: usize, fill: impl Fn(usize, &mut [O]) + Sync) -> Vec<O> {
    let mut out = vec![O::from_f64(0.0); n];
    out.par_chunks_mut(PAR_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| fill(c * PAR_CHUNK, chunk));
    out
}

/// `f` applied to every element of `x`, in row-major order of its logical shape.
pub(crate) fn map<A: Element, O: Element>(x: &Tensor, f: impl Fn(A) -> O + Sync) -> Vec<O> {
    let src = x.storage_slice::<A>();
    if x.is_contiguous() {
        let xs = x.contiguous_slice::<A>();
        return par_fill(xs.len(), |start, chunk| {
            for (o, &v) in chunk.iter_mut().zip(&xs[start..]) {
                *o = f(v);
            }
        });
    }
    par_fill(x.numel(), |start, chunk| {
        let offsets = x.layout().offsets_from(start, chunk.len());
        for (o, i) in chunk.iter_mut().zip(offsets) {
            *o = f(src[i]);
        }
    })
}

/// The broadcast shape of several operands, or an error naming them all.
pub(crate) fn broadcast_all(op: &'static str, xs: &[&Tensor]) -> Result<Vec<usize>> {
    xs.iter().try_fold(xs[0].shape().to_vec(), |acc, x| {
        broadcast_shapes(op, &acc, x.shape())
    })
}

/// `f(a, b)` elementwise over the numpy broadcast of `a` and `b`; returns the values and shape.
pub(crate) fn zip_map<A: Element, B: Element, O: Element>(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(A, B) -> O + Sync,
) -> Result<(Vec<O>, Vec<usize>)> {
    let shape = broadcast_all(op, &[a, b])?;
    if a.shape() == b.shape() && a.is_contiguous() && b.is_contiguous() {
        let (xa, xb) = (a.contiguous_slice::<A>(), b.contiguous_slice::<B>());
        let out = par_fill(xa.len(), |start, chunk| {
            for ((o, &u), &v) in chunk.iter_mut().zip(&xa[start..]).zip(&xb[start..]) {
                *o = f(u, v);
            }
        });
        return Ok((out, shape));
    }
    let (la, lb) = (a.layout().broadcast_to(&shape)?, b.layout().broadcast_to(&shape)?);
    let (sa, sb) = (a.storage_slice::<A>(), b.storage_slice::<B>());
    let out = par_fill(crate::layout::numel(&shape), |start, chunk| {
        let ia = la.offsets_from(start, chunk.len());
        let ib = lb.offsets_from(start, chunk.len());
        for ((o, i), j) in chunk.iter_mut().zip(ia).zip(ib) {
            *o = f(sa[i], sb[j]);
        }
    });
    Ok((out, shape))
}

/// `f(a, b, c)` elementwise over the broadcast of three operands.
pub(crate) fn zip3_map<A: Element, B: Element, C: Element, O: Element>(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    f: impl Fn(A, B, C) -> O + Sync,
) -> Result<(Vec<O>, Vec<usize>)> {
    let shape = broadcast_all(op, &[a, b, c])?;
    let layouts: Vec<Layout> = [a, b, c]
        .iter()
        .map(|t| t.layout().broadcast_to(&shape))
        .collect::<Result<_>>()?;
    let (sa, sb, sc) = (
        a.storage_slice::<A>(),
        b.storage_slice::<B>(),
        c.storage_slice::<C>(),
    );
    let out = par_fill(crate::layout::numel(&shape), |start, chunk| {
        let ia = layouts[0].offsets_from(start, chunk.len());
        let ib = layouts[1].offsets_from(start, chunk.len());
        let ic = layouts[2].offsets_from(start, chunk.len());
        for (((o, i), j), k) in chunk.iter_mut().zip(ia).zip(ib).zip(ic) {
            *o = f(sa[i], sb[j], sc[k]);
        }
    });
    Ok((out, shape))
}
