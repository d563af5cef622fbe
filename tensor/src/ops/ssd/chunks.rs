//! The chunked SSD algorithm as matrix products: the CPU kernels of `ssd_scan` and of its
//! backward, one head of one sequence at a time (heads run in parallel, so each product runs on
//! one thread).
//!
//! Within a chunk of q steps, with `cum_i` the running sum of dt·A from the chunk's start
//! (inclusive), `e_i = exp(cum_i)` and `S` the state entering the chunk (`[P, N]`):
//!
//! ```text
//! W_ij  = (C_i·B_j) exp(cum_i - cum_j) dt_j  for j <= i, 0 above the diagonal   [q, q]
//! Y     = W X + diag(e) C Sᵀ + D X                                              [q, P]
//! S_out = e_{q-1} S + (diag(u) X)ᵀ B,   u_j = exp(cum_{q-1} - cum_j) dt_j        [P, N]
//! ```
//!
//! The backward differentiates exactly these products, chunk by chunk in reverse, carrying
//! dL/dS from each chunk to the one before; the states entering the chunks are recomputed
//! first (one pass of the last line).

use super::{HeadGrads, Ssd};
use crate::ops::tile_gemm::{matmul_into, view, View};
use crate::{Real, UnaryOp};

/// The steps of one head of one sequence: the raw dt (+ bias), the step (its softplus when
/// asked for) and the running sums of step·A restarted at every chunk.
struct Steps<A> {
    raw: Vec<A>,
    dt: Vec<A>,
    cum: Vec<A>,
}

/// Scratch buffers of one head, reused across its chunks.
struct Scratch<A> {
    /// W, then (backward) dW and dL/d(C·B), `[q, q]`.
    w: Vec<A>,
    dw: Vec<A>,
    /// `[q, P]` rows: diag(u) X, diag(e) dY, C Sᵀ, dL/d(diag(u) X).
    xu: Vec<A>,
    ge: Vec<A>,
    t: Vec<A>,
    dxu: Vec<A>,
    /// diag(e) C, `[q, N]`.
    ce: Vec<A>,
    /// (backward) The decays exp(cum_i - cum_j), `[q, q]`, and one row of dW ∘ W.
    l: Vec<A>,
    trow: Vec<A>,
}

impl<A: Real> Scratch<A> {
    fn new(chunk: usize, p: usize, n: usize) -> Self {
        let zeros = |len: usize| vec![A::zero(); len];
        Scratch {
            w: zeros(chunk * chunk),
            dw: zeros(chunk * chunk),
            xu: zeros(chunk * p),
            ge: zeros(chunk * p),
            t: zeros(chunk * p),
            dxu: zeros(chunk * p),
            ce: zeros(chunk * n),
            l: zeros(chunk * chunk),
            trow: zeros(chunk),
        }
    }
}

impl<A: Real> Ssd<A> {
    /// Steps `t0..t0+q` of a chunk.
    #[inline(always)]
    fn chunk_range(&self, chunk: usize, ci: usize) -> (usize, usize) {
        let t0 = ci * chunk;
        (t0, (t0 + chunk).min(self.dims.len) - t0)
    }

    /// x of head `h` from step `t0` on, as `[q, P]` rows (H·P apart).
    #[inline(always)]
    fn x_rows(&self, bi: usize, t0: usize, h: usize) -> View<'_, A> {
        let d = self.dims;
        view(
            &self.x[((bi * d.len + t0) * d.heads + h) * d.head_dim..],
            d.heads * d.head_dim,
            1,
        )
    }

    /// B or C (`v`) of group `g` from step `t0` on, as `[q, N]` rows (G·N apart).
    #[inline(always)]
    fn group_rows<'v>(&self, v: &'v [A], bi: usize, t0: usize, g: usize) -> View<'v, A> {
        let d = self.dims;
        view(
            &v[((bi * d.len + t0) * d.groups + g) * d.state..],
            d.groups * d.state,
            1,
        )
    }

    /// The steps of head `h` of sequence `bi`.
    #[inline(always)]
    fn steps(&self, bi: usize, h: usize, chunk: usize) -> Steps<A> {
        let len = self.dims.len;
        let (raw, dt): (Vec<A>, Vec<A>) = (0..len).map(|t| self.step(bi, t, h)).unzip();
        let mut cum = vec![A::zero(); len];
        let mut run = A::zero();
        for t in 0..len {
            if t % chunk == 0 {
                run = A::zero();
            }
            run += dt[t] * self.a[h];
            cum[t] = run;
        }
        Steps { raw, dt, cum }
    }

    /// The gradients that flow through the chunk products `C_i · B_j` into C and B: each
    /// (sequence, chunk, group) sums its heads' dL/d(C·B) (in head order), then `dC = dCB B` and
    /// `dB = dCBᵀ C`. Returns dB and dC, `[B, L, G, N]`.
    pub(super) fn products_backward(&self, chunk: usize, parts: &[HeadGrads<A>]) -> (Vec<A>, Vec<A>) {
        use rayon::prelude::*;
        let d = self.dims;
        let chunks = d.len.div_ceil(chunk);
        let per_group = d.heads / d.groups;
        let blocks: Vec<(Vec<A>, Vec<A>)> = (0..d.batch * chunks * d.groups)
            .into_par_iter()
            .map(|i| {
                let (bi, ci, g) = (i / (chunks * d.groups), i / d.groups % chunks, i % d.groups);
                let (t0, q) = self.chunk_range(chunk, ci);
                let mut dcb = vec![A::zero(); q * q];
                for h in g * per_group..(g + 1) * per_group {
                    for (acc, &v) in dcb.iter_mut().zip(&parts[bi * d.heads + h].dcb[ci]) {
                        *acc += v;
                    }
                }
                let (mut db, mut dc) = (vec![A::zero(); q * d.state], vec![A::zero(); q * d.state]);
                let b = self.group_rows(&self.b, bi, t0, g);
                let c = self.group_rows(&self.c, bi, t0, g);
                matmul_into(&mut dc, d.state, (q, d.state, q), view(&dcb, q, 1), b, false);
                matmul_into(&mut db, d.state, (q, d.state, q), view(&dcb, 1, q), c, false);
                (db, dc)
            })
            .collect();
        let mut db = vec![A::zero(); d.batch * d.len * d.groups * d.state];
        let mut dc = db.clone();
        for (i, (bb, cc)) in blocks.iter().enumerate() {
            let (bi, ci, g) = (i / (chunks * d.groups), i / d.groups % chunks, i % d.groups);
            let (t0, q) = self.chunk_range(chunk, ci);
            for r in 0..q {
                let at = ((bi * d.len + t0 + r) * d.groups + g) * d.state;
                db[at..at + d.state].copy_from_slice(&bb[r * d.state..][..d.state]);
                dc[at..at + d.state].copy_from_slice(&cc[r * d.state..][..d.state]);
            }
        }
        (db, dc)
    }

    /// `C_i · B_j` of every chunk, per (sequence, chunk, group) in that order: row-major `[q, q]`
    /// (only j <= i is used), q being the chunk's length. Shared by the heads of a group.
    pub(super) fn chunk_products(&self, chunk: usize) -> Vec<Vec<A>> {
        use rayon::prelude::*;
        let d = self.dims;
        let chunks = d.len.div_ceil(chunk);
        (0..d.batch * chunks * d.groups)
            .into_par_iter()
            .map(|i| {
                let (bi, ci, g) = (i / (chunks * d.groups), i / d.groups % chunks, i % d.groups);
                let (t0, q) = self.chunk_range(chunk, ci);
                let mut m = vec![A::zero(); q * q];
                let c = self.group_rows(&self.c, bi, t0, g);
                let b = self.group_rows(&self.b, bi, t0, g);
                matmul_into(&mut m, q, (q, q, d.state), c, view(b.data, b.cs, b.rs), false);
                m
            })
            .collect()
    }

    /// Fills `w` (`[q, q]`) with W of the chunk at `t0` from its products `cb`.
    #[inline(always)]
    fn fill_w(&self, steps: &Steps<A>, t0: usize, q: usize, cb: &[A], w: &mut [A]) {
        let (dt, cum) = (&steps.dt[t0..t0 + q], &steps.cum[t0..t0 + q]);
        for i in 0..q {
            let row = &mut w[i * q..][..q];
            let terms = cb[i * q..][..=i].iter().zip(&cum[..=i]).zip(&dt[..=i]);
            for (o, ((&cb, &cj), &step)) in row[..=i].iter_mut().zip(terms) {
                *o = cb * (cum[i] - cj).exp_fast() * step;
            }
            row[i + 1..].fill(A::zero());
        }
    }

    /// Fills `xu` (`[q, P]`) with diag(u) X of the chunk at `t0`; returns e_{q-1}.
    #[inline(always)]
    fn fill_xu(&self, steps: &Steps<A>, bi: usize, h: usize, t0: usize, q: usize, xu: &mut [A]) -> A {
        let p = self.dims.head_dim;
        let x = self.x_rows(bi, t0, h);
        let end = steps.cum[t0 + q - 1];
        for j in 0..q {
            let u = (end - steps.cum[t0 + j]).exp_fast() * steps.dt[t0 + j];
            for (o, &v) in xu[j * p..][..p].iter_mut().zip(&x.data[j * x.rs..][..p]) {
                *o = u * v;
            }
        }
        end.exp_fast()
    }

    /// `state ← e_{q-1} state + (diag(u) X)ᵀ B`: the state leaving the chunk at `t0`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn pass_chunk(
        &self,
        steps: &Steps<A>,
        bi: usize,
        h: usize,
        t0: usize,
        q: usize,
        xu: &mut [A],
        state: &mut [A],
    ) {
        let (p, n) = (self.dims.head_dim, self.dims.state);
        let decay = self.fill_xu(steps, bi, h, t0, q, xu);
        state.iter_mut().for_each(|s| *s = decay * *s);
        let b = self.group_rows(&self.b, bi, t0, self.group(h));
        matmul_into(state, n, (p, n, q), view(xu, 1, p), b, true);
    }

    /// The chunked forward of head `h` of sequence `bi`, given `cb` from `chunk_products`:
    /// writes y (`[L, P]`) and returns the final state.
    #[inline(always)]
    pub(super) fn chunked_head(
        &self,
        bi: usize,
        h: usize,
        chunk: usize,
        cb: &[Vec<A>],
        y: &mut [A],
    ) -> Vec<A> {
        let d = self.dims;
        let (p, n, g) = (d.head_dim, d.state, self.group(h));
        let chunks = d.len.div_ceil(chunk);
        let steps = self.steps(bi, h, chunk);
        let mut s = Scratch::new(chunk.min(d.len), p, n);
        let mut state = self.initial_state(bi, h);
        let skip = self.skip(h);
        for ci in 0..chunks {
            let (t0, q) = self.chunk_range(chunk, ci);
            let (x, c) = (self.x_rows(bi, t0, h), self.group_rows(&self.c, bi, t0, g));
            let yc = &mut y[t0 * p..(t0 + q) * p];
            // Y = W X + diag(e) C Sᵀ + D X.
            self.fill_w(&steps, t0, q, &cb[(bi * chunks + ci) * d.groups + g], &mut s.w);
            matmul_into(yc, p, (q, p, q), view(&s.w, q, 1), x, false);
            for i in 0..q {
                let e = steps.cum[t0 + i].exp_fast();
                for (o, &v) in s.ce[i * n..][..n].iter_mut().zip(&c.data[i * c.rs..][..n]) {
                    *o = e * v;
                }
            }
            matmul_into(yc, p, (q, p, n), view(&s.ce, n, 1), view(&state, 1, n), true);
            if skip != A::zero() {
                for i in 0..q {
                    for (o, &v) in yc[i * p..][..p].iter_mut().zip(&x.data[i * x.rs..][..p]) {
                        *o += skip * v;
                    }
                }
            }
            self.pass_chunk(&steps, bi, h, t0, q, &mut s.xu, &mut state);
        }
        state
    }

    /// The backward pass of head `h` of sequence `bi` given dL/dy `grad` (all heads) and `cb`
    /// from `chunk_products`.
    #[inline(always)]
    pub(super) fn backward_head(
        &self,
        bi: usize,
        h: usize,
        chunk: usize,
        cb: &[Vec<A>],
        grad: &[A],
    ) -> HeadGrads<A> {
        let d = self.dims;
        let (len, p, n, g, a, skip) = (d.len, d.head_dim, d.state, self.group(h), self.a[h], self.skip(h));
        let pn = p * n;
        let chunks = len.div_ceil(chunk);
        let steps = self.steps(bi, h, chunk);
        let mut s = Scratch::new(chunk.min(len), p, n);
        // The state entering every chunk.
        let mut entering = self.initial_state(bi, h);
        entering.resize(chunks * pn, A::zero());
        for ci in 0..chunks.saturating_sub(1) {
            let (t0, q) = self.chunk_range(chunk, ci);
            let (done, next) = entering.split_at_mut((ci + 1) * pn);
            next[..pn].copy_from_slice(&done[ci * pn..]);
            self.pass_chunk(&steps, bi, h, t0, q, &mut s.xu, &mut next[..pn]);
        }
        let mut out = HeadGrads {
            dx: vec![A::zero(); len * p],
            ddt: vec![A::zero(); len],
            da: A::zero(),
            dd: A::zero(),
            db: vec![A::zero(); len * n],
            dc: vec![A::zero(); len * n],
            dinitial: vec![A::zero(); pn],
            dcb: vec![Vec::new(); chunks],
        };
        let mut dcum = vec![A::zero(); chunk.min(len)];
        // dL/d(state leaving the chunk), and dL/d(state entering it).
        let (mut d_out, mut d_in) = (vec![A::zero(); pn], vec![A::zero(); pn]);
        for ci in (0..chunks).rev() {
            let (t0, q) = self.chunk_range(chunk, ci);
            let (x, b, c) = (
                self.x_rows(bi, t0, h),
                self.group_rows(&self.b, bi, t0, g),
                self.group_rows(&self.c, bi, t0, g),
            );
            let gy = view(&grad[((bi * len + t0) * d.heads + h) * p..], d.heads * p, 1);
            let s_in = &entering[ci * pn..][..pn];
            let (dt, cum) = (&steps.dt[t0..t0 + q], &steps.cum[t0..t0 + q]);
            let products = &cb[(bi * chunks + ci) * d.groups + g];
            let dcum = &mut dcum[..q];
            dcum.fill(A::zero());
            let ddt = &mut out.ddt[t0..t0 + q];
            let (dx, db, dc) = (
                &mut out.dx[t0 * p..(t0 + q) * p],
                &mut out.db[t0 * n..(t0 + q) * n],
                &mut out.dc[t0 * n..(t0 + q) * n],
            );

            // Y = W X: dW = dY Xᵀ, dX = Wᵀ dY; then through W to C·B, cum and dt. The decays
            // exp(cum_i - cum_j) are kept from building W.
            for i in 0..q {
                let (l_row, w_row) = (&mut s.l[i * q..(i + 1) * q], &mut s.w[i * q..(i + 1) * q]);
                let terms = products[i * q..][..=i].iter().zip(&cum[..=i]).zip(&dt[..=i]);
                for ((l, w), ((&cb, &cj), &step)) in l_row[..=i].iter_mut().zip(&mut w_row[..=i]).zip(terms) {
                    *l = (cum[i] - cj).exp_fast();
                    *w = cb * *l * step;
                }
                w_row[i + 1..].fill(A::zero());
            }
            matmul_into(&mut s.dw, q, (q, q, p), gy, view(x.data, x.cs, x.rs), false);
            matmul_into(dx, p, (q, p, q), view(&s.w, 1, q), gy, false);
            for i in 0..q {
                let row = i * q..i * q + i + 1;
                let (dw_row, w_row, l_row) = (&mut s.dw[row.clone()], &s.w[row.clone()], &s.l[row.clone()]);
                let through = &mut s.trow[..=i];
                // Element-wise first (vectorises), the row's sum apart.
                for (((((dw, &w), &l), &cb), t), ((dc, dd), &step)) in dw_row
                    .iter_mut()
                    .zip(w_row)
                    .zip(l_row)
                    .zip(&products[row])
                    .zip(through.iter_mut())
                    .zip(dcum[..=i].iter_mut().zip(ddt[..=i].iter_mut()).zip(&dt[..=i]))
                {
                    *t = *dw * w;
                    *dc = *dc - *t;
                    *dd += *dw * l * cb;
                    *dw = *dw * l * step;
                }
                let sum: A = through.iter().copied().sum();
                dcum[i] += sum;
                s.dw[i * q + i + 1..(i + 1) * q].fill(A::zero());
            }
            // dL/d(C·B) goes to C and B once per group (`products_backward`), not per head.
            out.dcb[ci] = s.dw[..q * q].to_vec();

            // Y += diag(e) C Sᵀ.
            matmul_into(&mut s.t, p, (q, p, n), c, view(s_in, 1, n), false);
            for i in 0..q {
                let e = cum[i].exp_fast();
                let mut sum = A::zero();
                for ((o, &gv), &tv) in s.ge[i * p..][..p]
                    .iter_mut()
                    .zip(&gy.data[i * gy.rs..][..p])
                    .zip(&s.t[i * p..][..p])
                {
                    *o = e * gv;
                    sum += *o * tv;
                }
                dcum[i] += sum;
            }
            matmul_into(dc, n, (q, n, p), view(&s.ge, p, 1), view(s_in, n, 1), true);
            matmul_into(&mut d_in, n, (p, n, q), view(&s.ge, 1, p), c, false);

            // Y += D X.
            if self.d_skip.is_some() {
                for i in 0..q {
                    let (gi, xi) = (&gy.data[i * gy.rs..][..p], &x.data[i * x.rs..][..p]);
                    for ((o, &gv), &xv) in dx[i * p..][..p].iter_mut().zip(gi).zip(xi) {
                        *o += skip * gv;
                        out.dd += gv * xv;
                    }
                }
            }

            // S_out = e_{q-1} S + (diag(u) X)ᵀ B; nothing flows back from the last chunk's state.
            if ci + 1 < chunks {
                let end = cum[q - 1];
                let decay = self.fill_xu(&steps, bi, h, t0, q, &mut s.xu);
                let mut through_decay = A::zero();
                for ((di, &o), &si) in d_in.iter_mut().zip(&d_out).zip(s_in) {
                    *di += decay * o;
                    through_decay += o * si;
                }
                dcum[q - 1] += decay * through_decay;
                matmul_into(&mut s.dxu, p, (q, p, n), b, view(&d_out, 1, n), false);
                matmul_into(db, n, (q, n, p), view(&s.xu, p, 1), view(&d_out, n, 1), true);
                for j in 0..q {
                    let w = (end - cum[j]).exp_fast();
                    let u = w * dt[j];
                    let (dxu, xj) = (&s.dxu[j * p..][..p], &x.data[j * x.rs..][..p]);
                    let mut du = A::zero();
                    for ((o, &dv), &xv) in dx[j * p..][..p].iter_mut().zip(dxu).zip(xj) {
                        *o += u * dv;
                        du += dv * xv;
                    }
                    ddt[j] += du * w;
                    dcum[q - 1] += du * u;
                    dcum[j] = dcum[j] - du * u;
                }
            }

            // cum_i = Σ_{k<=i} dt_k A.
            let mut below = A::zero();
            for k in (0..q).rev() {
                below += dcum[k];
                ddt[k] += a * below;
                out.da += dt[k] * below;
            }
            std::mem::swap(&mut d_out, &mut d_in);
        }
        out.dinitial = d_out;
        if self.softplus {
            for (o, &raw) in out.ddt.iter_mut().zip(&steps.raw) {
                *o = *o * UnaryOp::Softplus.derivative(raw);
            }
        }
        out
    }
}
