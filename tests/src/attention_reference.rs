//! A plain f64 attention with its gradients, for the fused attention's suites (CPU and GPU):
//! it builds each query's scores over the keys it may see, takes the softmax and multiplies,
//! and differentiates that by the textbook softmax rule (dS = P ∘ (dP − rowsum(P ∘ dP))), not by
//! the fused kernels' log-sum-exp recomputation.

#![allow(clippy::needless_range_loop)] // the reference indexes like the formulas it spells out

use tensor::AttentionMask;

/// The sizes and mask of one attention call: q `[b, h, tq, d]`, k and v `[b, hk, tk, d]`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSizes {
    /// Batch.
    pub b: usize,
    /// Query heads.
    pub h: usize,
    /// Key heads.
    pub hk: usize,
    /// Queries.
    pub tq: usize,
    /// Keys.
    pub tk: usize,
    /// Head dim.
    pub d: usize,
    /// Which keys each query sees.
    pub mask: AttentionMask,
}

/// Whether query `i` may see key `j` under `mask` (the definition, written out on its own).
pub fn allowed(mask: AttentionMask, i: usize, j: usize, tq: usize, tk: usize) -> bool {
    match mask {
        AttentionMask::Full => true,
        AttentionMask::Causal => j as i64 <= i as i64 + tk as i64 - tq as i64,
        AttentionMask::BlockCausal { width } => j / width <= i / width,
    }
}

/// The reference's results: out, log-sum-exp, dq, dk, dv (all f64, row-major), and the
/// norms of the two terms whose difference makes dq and dk (Σ P·dP·k and Σ P·D·k): where a
/// query sees a single key they cancel exactly, dq and dk are zero, and f32 leaves rounding
/// noise of the size of the terms, so errors are taken relative to the larger of the result and
/// those terms.
pub struct AttentionReference {
    /// The output `[b, h, tq, d]`.
    pub out: Vec<f64>,
    /// The log-sum-exp `[b, h, tq]` (-inf where a query sees no key).
    pub lse: Vec<f64>,
    /// dL/dq.
    pub dq: Vec<f64>,
    /// dL/dk.
    pub dk: Vec<f64>,
    /// dL/dv.
    pub dv: Vec<f64>,
    /// The norm of the terms that cancel in dq.
    pub dq_terms: f64,
    /// The norm of the terms that cancel in dk.
    pub dk_terms: f64,
}

/// Plain attention in f64 with its gradients for the output gradient `go`.
pub fn attention_reference(
    c: &AttentionSizes,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    keep: &[bool],
    go: &[f64],
    scale: f64,
) -> AttentionReference {
    let AttentionSizes {
        b,
        h,
        hk,
        tq,
        tk,
        d,
        mask,
    } = *c;
    let mut r = AttentionReference {
        out: vec![0.0; b * h * tq * d],
        lse: vec![f64::NEG_INFINITY; b * h * tq],
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; v.len()],
        dq_terms: 0.0,
        dk_terms: 0.0,
    };
    let (mut dq_terms, mut dk_terms) = (vec![0.0; q.len()], vec![0.0; k.len()]);
    for bi in 0..b {
        for hi in 0..h {
            let kh = bi * hk + hi / (h / hk);
            for i in 0..tq {
                let row = (bi * h + hi) * tq + i;
                let qi = &q[row * d..][..d];
                let seen: Vec<usize> = (0..tk)
                    .filter(|&j| keep[bi * tk + j] && allowed(mask, i, j, tq, tk))
                    .collect();
                if seen.is_empty() {
                    continue;
                }
                let key = |j: usize| &k[(kh * tk + j) * d..][..d];
                let val = |j: usize| &v[(kh * tk + j) * d..][..d];
                let s: Vec<f64> = seen
                    .iter()
                    .map(|&j| scale * qi.iter().zip(key(j)).map(|(a, b)| a * b).sum::<f64>())
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                r.lse[row] = m + z.ln();
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
                let gi = &go[row * d..][..d];
                for (&j, &pj) in seen.iter().zip(&p) {
                    for e in 0..d {
                        r.out[row * d + e] += pj * val(j)[e];
                        r.dv[(kh * tk + j) * d + e] += pj * gi[e];
                    }
                }
                let dp: Vec<f64> = seen
                    .iter()
                    .map(|&j| gi.iter().zip(val(j)).map(|(a, b)| a * b).sum::<f64>())
                    .collect();
                let pdp: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for ((&j, &pj), &dpj) in seen.iter().zip(&p).zip(&dp) {
                    let ds = pj * (dpj - pdp) * scale;
                    let term = pj * dpj.abs().max(pdp.abs()) * scale;
                    for e in 0..d {
                        r.dq[row * d + e] += ds * key(j)[e];
                        r.dk[(kh * tk + j) * d + e] += ds * qi[e];
                        dq_terms[row * d + e] += term * key(j)[e].abs();
                        dk_terms[(kh * tk + j) * d + e] += term * qi[e].abs();
                    }
                }
            }
        }
    }
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    r.dq_terms = norm(&dq_terms);
    r.dk_terms = norm(&dk_terms);
    r
}
