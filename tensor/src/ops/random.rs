//! Seeded random initialisation: samples are drawn in f64, one after another in row-major
//! order, and rounded to the dtype, so the same seed gives the same tensor on every machine
//! and thread count (for a given `rand` version), and the 16-bit tensors are the f64 ones
//! rounded.

use crate::dispatch::float_dispatch;
use crate::error::range_err;
use crate::layout::numel;
use crate::storage::CpuStorage;
use crate::{DType, Element, Result, Tensor};
use rand::Rng as _;
use rand_distr::{Distribution, Normal};

/// The random generator every initialiser takes: seeded and reproducible.
pub type Rng = rand::rngs::StdRng;

/// A generator seeded with `seed`.
pub fn seeded_rng(seed: u64) -> Rng {
    rand::SeedableRng::seed_from_u64(seed)
}

/// A float tensor of `shape` filled in order with `sample()` rounded to `dtype`; u32 is an
/// error (and then nothing is drawn).
fn sampled(
    op: &'static str,
    shape: &[usize],
    dtype: DType,
    mut sample: impl FnMut() -> f64,
) -> Result<Tensor> {
    float_dispatch!(op, dtype, T => {
        let data: Vec<T> = (0..numel(shape)).map(|_| <T as Element>::from_f64(sample())).collect();
        Ok(Tensor::from_cpu(CpuStorage::from_vec(data), shape))
    })
}

impl Tensor {
    /// Samples of Normal(mean, std) in a float `dtype`; `mean` must be finite and `std` finite
    /// and non-negative.
    pub fn randn(shape: &[usize], dtype: DType, mean: f64, std: f64, rng: &mut Rng) -> Result<Tensor> {
        if !mean.is_finite() || !std.is_finite() || std < 0.0 {
            return range_err(
                "randn",
                format!("needs a finite mean and std >= 0, got mean {mean}, std {std}"),
            );
        }
        let normal = Normal::new(mean, std).map_err(|e| crate::TensorError::OutOfRange {
            op: "randn",
            detail: format!("mean {mean}, std {std}: {e}"),
        })?;
        sampled("randn", shape, dtype, || normal.sample(rng))
    }

    /// Uniform samples in `[lo, hi)` in a float `dtype`; needs finite `lo < hi` with a finite
    /// `hi - lo`. Rounding to a 16-bit dtype can give exactly `hi`.
    pub fn rand_uniform(shape: &[usize], dtype: DType, lo: f64, hi: f64, rng: &mut Rng) -> Result<Tensor> {
        if lo >= hi || !lo.is_finite() || !hi.is_finite() || !(hi - lo).is_finite() {
            return range_err(
                "rand_uniform",
                format!("empty, infinite or overflowing range [{lo}, {hi})"),
            );
        }
        sampled("rand_uniform", shape, dtype, || rng.gen_range(lo..hi))
    }
}

#[cfg(test)]
mod tests {
    use super::seeded_rng;
    use crate::{bf16, DType, Tensor};

    fn mean_std(v: &[f64]) -> (f64, f64) {
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        (mean, var.sqrt())
    }

    #[test]
    fn same_seed_same_samples_with_the_right_moments() {
        let a = Tensor::randn(&[10000], DType::F64, 1.0, 2.0, &mut seeded_rng(3)).unwrap();
        let b = Tensor::randn(&[10000], DType::F64, 1.0, 2.0, &mut seeded_rng(3)).unwrap();
        assert_eq!(a.to_vec_f64(), b.to_vec_f64());
        let c = Tensor::randn(&[10000], DType::F64, 1.0, 2.0, &mut seeded_rng(4)).unwrap();
        assert_ne!(a.to_vec_f64(), c.to_vec_f64());
        let (mean, std) = mean_std(&a.to_vec_f64());
        assert!(
            (mean - 1.0).abs() < 0.1 && (std - 2.0).abs() < 0.1,
            "{mean} {std}"
        );
        let mut rng = seeded_rng(5);
        let u = Tensor::rand_uniform(&[10000], DType::F32, -1.0, 3.0, &mut rng)
            .unwrap()
            .to_vec_f64();
        assert!(u.iter().all(|x| (-1.0..3.0).contains(x)));
        let (mean, std) = mean_std(&u);
        assert!(
            (mean - 1.0).abs() < 0.05 && (std - 4.0 / 12f64.sqrt()).abs() < 0.05,
            "{mean} {std}"
        );
    }

    #[test]
    fn sixteen_bit_samples_are_the_f64_samples_rounded() {
        let wide = Tensor::randn(&[2, 50], DType::F64, 0.0, 1.0, &mut seeded_rng(7)).unwrap();
        let narrow = Tensor::randn(&[2, 50], DType::BF16, 0.0, 1.0, &mut seeded_rng(7)).unwrap();
        let rounded: Vec<bf16> = wide.to_vec_f64().into_iter().map(bf16::from_f64).collect();
        assert_eq!(narrow.to_vec::<bf16>().unwrap(), rounded);
        let u = Tensor::rand_uniform(&[1000], DType::F16, -1.0, 1.0, &mut seeded_rng(4)).unwrap();
        assert!(u.to_vec_f64().iter().all(|x| (-1.0..=1.0).contains(x)));
        assert_eq!(
            Tensor::randn(&[0, 3], DType::F32, 0.0, 1.0, &mut seeded_rng(1))
                .unwrap()
                .shape(),
            &[0, 3]
        );
    }

    #[test]
    fn bad_arguments_are_errors() {
        let mut rng = seeded_rng(4);
        assert!(Tensor::randn(&[2], DType::U32, 0.0, 1.0, &mut rng).is_err());
        assert!(Tensor::rand_uniform(&[2], DType::U32, 0.0, 1.0, &mut rng).is_err());
        assert!(Tensor::randn(&[2], DType::F32, 0.0, -1.0, &mut rng).is_err());
        assert!(Tensor::randn(&[2], DType::F32, 0.0, f64::INFINITY, &mut rng).is_err());
        assert!(Tensor::randn(&[2], DType::F32, f64::NAN, 1.0, &mut rng).is_err());
        assert!(Tensor::rand_uniform(&[1], DType::F32, 1.0, 1.0, &mut rng).is_err());
        assert!(Tensor::rand_uniform(&[1], DType::F32, 0.0, f64::INFINITY, &mut rng).is_err());
    }
}
