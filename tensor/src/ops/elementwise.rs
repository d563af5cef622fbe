//! Shared machinery of elementwise kernels: parallel maps over one, two or three
//! (broadcast) operands.

use crate::layout::{broadcast_shapes, Layout};
use crate::ops::par_write::{par_write, write_each};
use crate::tensor::PAR_CHUNK;
use crate::{Element, Real, Result, Tensor};
use std::mem::MaybeUninit;

/// Runs `f` compiled for the widest vector instructions this CPU has (AVX2 + FMA, or AVX-512),
/// chosen at run time: the build itself targets baseline x86-64, whose 4-wide SSE2 is what a
/// plain loop would get. Kernels call it around their inner loops.
#[inline(always)]
pub(crate) fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// Lanes of a group of partial results: one AVX-512 register of f32.
pub(crate) const LANES: usize = 16;

/// `combine` of f(x) over `xs` from `init`, in `G` groups of [`LANES`] interleaved partial
/// results combined in order at the end: an order fixed by the length (not by threads) that
/// vectorises, where a strictly sequential fold cannot. More groups keep more independent chains
/// in flight (for a cheap `combine`, such as a max).
#[inline(always)]
pub(crate) fn lane_fold<const G: usize, S: Copy, A: Real>(
    xs: &[S],
    init: A,
    f: impl Fn(S) -> A,
    combine: impl Fn(A, A) -> A,
) -> A {
    let mut acc = [[init; LANES]; G];
    let blocks = xs.chunks_exact(G * LANES);
    let rest = blocks.remainder();
    for block in blocks {
        for (lanes, part) in acc.iter_mut().zip(block.chunks_exact(LANES)) {
            for (s, &v) in lanes.iter_mut().zip(part) {
                *s = combine(*s, f(v));
            }
        }
    }
    for (lanes, part) in acc.iter_mut().zip(rest.chunks(LANES)) {
        for (s, &v) in lanes.iter_mut().zip(part) {
            *s = combine(*s, f(v));
        }
    }
    let mut total = init;
    for lanes in &acc {
        for &s in lanes {
            total = combine(total, s);
        }
    }
    total
}

/// Σ f(x) over `xs`, in [`LANES`] partial sums (see [`lane_fold`]).
#[inline(always)]
pub(crate) fn lane_sum<S: Copy, A: Real>(xs: &[S], f: impl Fn(S) -> A) -> A {
    lane_fold::<1, _, _>(xs, A::zero(), f, |a, b| a + b)
}

/// Σ f(a, b) over the pairs of `a` and `b` (the shorter length), in [`LANES`] partial sums as
/// [`lane_sum`] takes them (a fold over two slices, not one).
#[inline(always)]
pub(crate) fn lane_sum_pairs<S: Copy, T: Copy, A: Real>(a: &[S], b: &[T], f: impl Fn(S, T) -> A) -> A {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [A::zero(); LANES];
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += f(x, y);
        }
    }
    let tail = n - n % LANES;
    for ((s, &x), &y) in acc.iter_mut().zip(&a[tail..]).zip(&b[tail..]) {
        *s += f(x, y);
    }
    acc.iter().fold(A::zero(), |t, &s| t + s)
}

/// `n` elements written in parallel chunks of [`PAR_CHUNK`]: `fill(start, chunk)` writes
/// elements `start..start+chunk.len()`, every one of them (see [`par_write`]).
///
/// # Safety
/// `fill` must write every element of `chunk`.
unsafe fn par_fill<O: Element>(n: usize, fill: impl Fn(usize, &mut [MaybeUninit<O>]) + Sync) -> Vec<O> {
    // SAFETY: passed on to the caller.
    unsafe {
        par_write(n, PAR_CHUNK, |c, chunk| {
            with_simd(
                #[inline(always)]
                || fill(c * PAR_CHUNK, chunk),
            )
        })
    }
}

/// `f` applied to every element of `x`, in row-major order of its logical shape.
pub(crate) fn map<A: Element, O: Element>(x: &Tensor, f: impl Fn(A) -> O + Sync) -> Vec<O> {
    let src = x.storage_slice::<A>();
    if x.is_contiguous() {
        let xs = x.contiguous_slice::<A>();
        // SAFETY: `xs[start..]` is at least as long as the chunk, so every element is written.
        return unsafe {
            par_fill(xs.len(), |start, chunk| {
                for (o, &v) in chunk.iter_mut().zip(&xs[start..]) {
                    o.write(f(v));
                }
            })
        };
    }
    let rows = Rows::new(x.shape(), &[x.layout()]);
    let step = rows.steps[0];
    // SAFETY: both loops write every element of the piece (the slice indexing panics otherwise).
    unsafe {
        rows.fill(|piece, [i]| {
            let n = piece.len();
            if step == 1 {
                for (o, &v) in piece.iter_mut().zip(&src[i..i + n]) {
                    o.write(f(v));
                }
            } else {
                for (k, o) in piece.iter_mut().enumerate() {
                    o.write(f(src[i + k * step]));
                }
            }
        })
    }
}

/// A broadcast walk in rows: the trailing axes that every operand steps through at one stride
/// are merged into rows of `len` elements; each operand's row starts are the offsets of its
/// `outer` layout (the remaining axes) and it moves `steps` elements along a row (0 when it is
/// broadcast there). Each piece of a row then runs over plain slices or a repeated scalar.
struct Rows {
    len: usize,
    outer: Vec<Layout>,
    steps: Vec<usize>,
    numel: usize,
}

impl Rows {
    /// The rows of `layouts`, each already broadcast to `shape`.
    fn new(shape: &[usize], layouts: &[&Layout]) -> Self {
        let rank = shape.len();
        let mut len = 1;
        let mut axis = rank;
        // Merge axis `axis - 1` into the row while every operand's stride there continues the row.
        while axis > 0 {
            let d = axis - 1;
            let mergeable = axis == rank
                || layouts
                    .iter()
                    .all(|l| l.strides()[d] == l.strides()[axis] * shape[axis]);
            if !mergeable {
                break;
            }
            len *= shape[d];
            axis = d;
        }
        let steps = layouts
            .iter()
            .map(|l| if rank == 0 { 0 } else { l.strides()[rank - 1] })
            .collect();
        let outer = layouts
            .iter()
            .map(|l| Layout::from_parts(shape[..axis].to_vec(), l.strides()[..axis].to_vec(), l.offset()))
            .collect();
        Rows {
            len: len.max(1),
            outer,
            steps,
            numel: crate::layout::numel(shape),
        }
    }

    /// Fills the output in parallel tasks of [`PAR_CHUNK`] elements: `run(piece, starts)` writes
    /// `piece`, a run of consecutive elements within one row, whose first element each operand
    /// `k` holds at storage offset `starts[k]`. A row longer than a task is split across tasks.
    ///
    /// # Safety
    /// `run` must write every element of `piece`.
    unsafe fn fill<O: Element, const K: usize>(
        &self,
        run: impl Fn(&mut [MaybeUninit<O>], [usize; K]) + Sync,
    ) -> Vec<O> {
        // SAFETY: the pieces below cover each chunk, and `run` writes each piece in full.
        unsafe {
            par_write(self.numel, PAR_CHUNK, |c, chunk| {
                with_simd(
                    #[inline(always)]
                    || {
                        let start = c * PAR_CHUNK;
                        let (first_row, mut col) = (start / self.len, start % self.len);
                        let rows = (col + chunk.len()).div_ceil(self.len);
                        let mut row_starts: [_; K] =
                            std::array::from_fn(|k| self.outer[k].offsets_from(first_row, rows));
                        let mut done = 0;
                        while done < chunk.len() {
                            let take = (self.len - col).min(chunk.len() - done);
                            let starts = std::array::from_fn(|k| {
                                row_starts[k].next().expect("one start per row") + col * self.steps[k]
                            });
                            run(&mut chunk[done..done + take], starts);
                            done += take;
                            col = 0;
                        }
                    },
                )
            })
        }
    }
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
        // SAFETY: both operands hold at least `chunk.len()` elements from `start`.
        let out = unsafe {
            par_fill(xa.len(), |start, chunk| {
                for ((o, &u), &v) in chunk.iter_mut().zip(&xa[start..]).zip(&xb[start..]) {
                    o.write(f(u, v));
                }
            })
        };
        return Ok((out, shape));
    }
    let (la, lb) = (a.layout().broadcast_to(&shape)?, b.layout().broadcast_to(&shape)?);
    let (sa, sb) = (a.storage_slice::<A>(), b.storage_slice::<B>());
    let rows = Rows::new(&shape, &[&la, &lb]);
    let (step_a, step_b) = (rows.steps[0], rows.steps[1]);
    // SAFETY: every arm writes the whole piece (the slice indexing panics otherwise).
    let out = unsafe {
        rows.fill(|piece, [i, j]| {
            let n = piece.len();
            match (step_a, step_b) {
                (1, 1) => {
                    for ((o, &u), &v) in piece.iter_mut().zip(&sa[i..i + n]).zip(&sb[j..j + n]) {
                        o.write(f(u, v));
                    }
                }
                (1, 0) => {
                    let v = sb[j];
                    for (o, &u) in piece.iter_mut().zip(&sa[i..i + n]) {
                        o.write(f(u, v));
                    }
                }
                (0, 1) => {
                    let u = sa[i];
                    for (o, &v) in piece.iter_mut().zip(&sb[j..j + n]) {
                        o.write(f(u, v));
                    }
                }
                _ => {
                    for (k, o) in piece.iter_mut().enumerate() {
                        o.write(f(sa[i + k * step_a], sb[j + k * step_b]));
                    }
                }
            }
        })
    };
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
    // SAFETY: `write_each` writes every element of the chunk (or panics).
    let out = unsafe {
        par_fill(crate::layout::numel(&shape), |start, chunk| {
            let ia = layouts[0].offsets_from(start, chunk.len());
            let ib = layouts[1].offsets_from(start, chunk.len());
            let ic = layouts[2].offsets_from(start, chunk.len());
            let values = ia.zip(ib).zip(ic).map(|((i, j), k)| f(sa[i], sb[j], sc[k]));
            write_each(chunk, values);
        })
    };
    Ok((out, shape))
}

#[cfg(test)]
mod tests {
    use crate::Tensor;

    /// Rows longer than a task, and tasks that start inside a row, give the plain loop's values.
    #[test]
    fn long_broadcast_rows_split_across_tasks() {
        let n = 3 * super::PAR_CHUNK + 5;
        let x = Tensor::from_vec((0..2 * n).map(|i| i as f64).collect(), &[2, n]).unwrap();
        let y = Tensor::from_vec((0..n).map(|i| (i % 7) as f64).collect(), &[n]).unwrap();
        let s = Tensor::from_vec(vec![0.5f64], &[1]).unwrap();
        let (xv, yv) = (x.to_vec_f64(), y.to_vec_f64());
        let by_row: Vec<f64> = (0..2 * n).map(|i| xv[i] + yv[i % n]).collect();
        assert_eq!(x.add(&y).unwrap().to_vec_f64(), by_row);
        let scaled: Vec<f64> = xv.iter().map(|v| v * 0.5).collect();
        assert_eq!(x.mul(&s).unwrap().to_vec_f64(), scaled);
        // A transposed view walks with a step of n; the unary map takes the same path.
        let t = x.transpose(0, 1).unwrap();
        let expected: Vec<f64> = (0..n).flat_map(|c| [xv[c], xv[n + c]]).map(|v| -v).collect();
        assert_eq!(t.neg().unwrap().to_vec_f64(), expected);
        let doubled: Vec<f64> = expected.iter().map(|v| -2.0 * v).collect();
        assert_eq!(t.add(&t).unwrap().to_vec_f64(), doubled);
    }
}
