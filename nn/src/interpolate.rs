//! Bicubic resampling of 2-D position-embedding grids, as PyTorch's `F.interpolate(mode=
//! "bicubic", align_corners=False)` computes it, with or without `antialias`. Resampling is
//! linear, so it is done as two matrix products `Wy · grid · Wxᵀ` (differentiable for free).

use crate::Result;
use autograd::Var;
use tensor::Tensor;

/// The PyTorch bicubic kernel with parameter `a` (-0.75 plain, -0.5 antialiased).
fn cubic(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// The `[n_out, n_in]` matrix that resamples a length-`n_in` signal to `n_out` samples.
pub fn bicubic_matrix(n_in: usize, n_out: usize, antialias: bool) -> Vec<f64> {
    let scale = n_in as f64 / n_out as f64;
    let mut m = vec![0.0; n_out * n_in];
    for i in 0..n_out {
        let row = &mut m[i * n_in..(i + 1) * n_in];
        if antialias {
            // PIL-style separable filter: window of half-width 2·max(scale, 1), truncated at the
            // borders and renormalised.
            let support = 2.0 * scale.max(1.0);
            let inv = 1.0 / scale.max(1.0);
            let center = scale * (i as f64 + 0.5);
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
            let w: Vec<f64> = (lo..hi)
                .map(|j| cubic((j as f64 - center + 0.5) * inv, -0.5))
                .collect();
            let total: f64 = w.iter().sum();
            for (j, wv) in (lo..hi).zip(w) {
                row[j] += if total != 0.0 { wv / total } else { 0.0 };
            }
        } else {
            // Four taps around the source position, indices clamped to the border.
            let src = (i as f64 + 0.5) * scale - 0.5;
            let f = src.floor();
            let t = src - f;
            let taps = [
                cubic(t + 1.0, -0.75),
                cubic(t, -0.75),
                cubic(1.0 - t, -0.75),
                cubic(2.0 - t, -0.75),
            ];
            for (k, w) in taps.iter().enumerate() {
                let j = (f as i64 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
                row[j] += w;
            }
        }
    }
    m
}

/// Resamples a grid `[h, w, dim]` to `[out_h, out_w, dim]`.
pub fn resize_grid(grid: &Var, out_h: usize, out_w: usize, antialias: bool) -> Result<Var> {
    let s = grid.value().shape().to_vec();
    let (h, w, d) = (s[0], s[1], s[2]);
    let (dtype, device) = (grid.value().dtype(), grid.value().device());
    let weights = |n_in, n_out| -> Result<Tensor> {
        let m = Tensor::from_vec(bicubic_matrix(n_in, n_out, antialias), &[n_out, n_in])?;
        Ok(m.to_dtype(dtype)?.to_device(device)?)
    };
    let (wy, wx) = (weights(h, out_h)?, weights(w, out_w)?);
    // Rows: [out_h, h] x [h, w*d]; then columns: per output row, [out_w, w] x [w, d].
    let rows = Var::constant(wy)
        .matmul(&grid.reshape(&[h, w * d])?)?
        .reshape(&[out_h, w, d])?;
    Ok(Var::constant(wx).matmul(&rows)?)
}

#[cfg(test)]
mod tests {
    use super::bicubic_matrix;

    #[test]
    fn same_size_is_the_identity_and_rows_sum_to_one() {
        for aa in [false, true] {
            let m = bicubic_matrix(5, 5, aa);
            for i in 0..5 {
                for j in 0..5 {
                    let expected = if i == j { 1.0 } else { 0.0 };
                    assert!(
                        (m[i * 5 + j] - expected).abs() < 1e-12,
                        "aa={aa} {i} {j} {}",
                        m[i * 5 + j]
                    );
                }
            }
            let up = bicubic_matrix(4, 7, aa);
            for i in 0..7 {
                let s: f64 = up[i * 4..(i + 1) * 4].iter().sum();
                assert!((s - 1.0).abs() < 1e-12);
            }
        }
    }
}
