//! Seeded random initialisation: samples are drawn in f64, in order, and rounded to the dtype,
//! so the same seed gives the same tensor on every machine.

use crate::dispatch::float_dispatch;
use crate::layout::numel;
use crate::storage::CpuStorage;
use crate::{DType, Element, Result, Tensor};
use rand::Rng as _;
use rand_distr::{Distribution, Normal};

/// The random generator every initialiser takes: seeded, reproducible across platforms.
pub type Rng = rand::rngs::StdRng;

/// A generator seeded with `seed`.
pub fn seeded_rng(seed: u64) -> Rng {
    rand::SeedableRng::seed_from_u64(seed)
}

fn sampled(
    op: &'static str,
    shape: &[usize],
    dtype: DType,
    mut sample: impl FnMut() -> f64,
) -> Result<Tensor> {
    float_dispatch!(op, dtype, T => {
        let data: Vec<T> = (0..numel(shape)).map(|_| T::from_f64(sample())).collect();
        Ok(Tensor::from_cpu(CpuStorage::from_vec(data), shape))
    })
}

impl Tensor {
    /// Normal(mean, std) samples; `std` must be finite and non-negative.
    pub fn randn(shape: &[usize], dtype: DType, mean: f64, std: f64, rng: &mut Rng) -> Result<Tensor> {
        let normal = Normal::new(mean, std).map_err(|e| crate::TensorError::OutOfRange {
            op: "randn",
            detail: format!("mean {mean}, std {std}: {e}"),
        })?;
        sampled("randn", shape, dtype, || normal.sample(rng))
    }

    /// Uniform samples in `[lo, hi)`; needs `lo < hi`.
    pub fn rand_uniform(shape: &[usize], dtype: DType, lo: f64, hi: f64, rng: &mut Rng) -> Result<Tensor> {
        if lo >= hi || !lo.is_finite() || !hi.is_finite() {
            return crate::error::range_err("rand_uniform", format!("empty or infinite range [{lo}, {hi})"));
        }
        sampled("rand_uniform", shape, dtype, || rng.gen_range(lo..hi))
    }
}

#[cfg(test)]
mod tests {
    use super::seeded_rng;
    use crate::{DType, Tensor};

    #[test]
    fn same_seed_same_samples_with_the_right_moments() {
        let a = Tensor::randn(&[10000], DType::F64, 1.0, 2.0, &mut seeded_rng(3)).unwrap();
        let b = Tensor::randn(&[10000], DType::F64, 1.0, 2.0, &mut seeded_rng(3)).unwrap();
        assert_eq!(a.to_vec_f64(), b.to_vec_f64());
        let v = a.to_vec_f64();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!(
            (mean - 1.0).abs() < 0.1 && (std - 2.0).abs() < 0.1,
            "{mean} {std}"
        );
        let u = Tensor::rand_uniform(&[1000], DType::BF16, -1.0, 1.0, &mut seeded_rng(4))
            .unwrap()
            .to_vec_f64();
        assert!(u.iter().all(|x| (-1.0..=1.0).contains(x)));
        assert!(Tensor::rand_uniform(&[1], DType::F32, 1.0, 1.0, &mut seeded_rng(4)).is_err());
    }
}
