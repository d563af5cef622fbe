//! Seeded random initialisation.

use crate::{DType, Result, Tensor};

/// The random generator every initialiser takes: seeded, reproducible across platforms.
pub type Rng = rand::rngs::StdRng;

/// A generator seeded with `seed`.
pub fn seeded_rng(seed: u64) -> Rng {
    rand::SeedableRng::seed_from_u64(seed)
}

impl Tensor {
    /// Normal(mean, std) samples.
    pub fn randn(shape: &[usize], dtype: DType, mean: f64, std: f64, rng: &mut Rng) -> Result<Tensor> {
        todo!("{shape:?} {dtype} {mean} {std} {rng:?}")
    }

    /// Uniform samples in `[lo, hi)`.
    pub fn rand_uniform(shape: &[usize], dtype: DType, lo: f64, hi: f64, rng: &mut Rng) -> Result<Tensor> {
        todo!("{shape:?} {dtype} {lo} {hi} {rng:?}")
    }
}
