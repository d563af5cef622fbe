//! Shared helpers of the property-test suites: a plain f64 reference implementation of every op,
//! random inputs, conversions between `RefTensor` and `Tensor`, the relative error of a result
//! against its reference, and the GPU suites' harness ([`gpu`]).

pub mod attention_reference;
pub mod gpu;
pub mod reference;

use autograd::{check_gradients, Var};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use reference::RefTensor;
use tensor::{DType, Tensor};

/// Proptest settings for a suite: `cases` random cases (times `EMMA_TEST_CASES_SCALE`, 1 by
/// default, for a longer local run), no failure persistence files.
pub fn config(cases: u32) -> ProptestConfig {
    let scale = std::env::var("EMMA_TEST_CASES_SCALE")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(1);
    ProptestConfig {
        cases: cases.saturating_mul(scale),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Shapes of rank `1..=max_rank` with every dimension in `1..=max_dim` (size 1 and odd sizes included).
pub fn shape(max_rank: usize, max_dim: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1..=max_dim, 1..=max_rank)
}

/// Values drawn uniformly from `[lo, hi)` with a seeded generator.
pub fn uniform(n: usize, lo: f64, hi: f64, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

/// A random reference tensor of `shape` with values in `[lo, hi)`.
pub fn random_ref(shape: &[usize], lo: f64, hi: f64, seed: u64) -> RefTensor {
    RefTensor::new(shape.to_vec(), uniform(shape.iter().product(), lo, hi, seed))
}

/// A random f64 tensor of `shape` with values in `[lo, hi)`.
pub fn random_f64(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Tensor {
    to_tensor(&random_ref(shape, lo, hi, seed), DType::F64)
}

/// The reference tensor's values rounded to `dtype`.
pub fn to_tensor(r: &RefTensor, dtype: DType) -> Tensor {
    Tensor::from_vec(r.data.clone(), &r.shape)
        .and_then(|t| t.to_dtype(dtype))
        .expect("reference data matches its shape")
}

/// A tensor's values (any dtype, any layout) as a reference tensor.
pub fn to_ref(t: &Tensor) -> RefTensor {
    RefTensor::new(t.shape().to_vec(), t.to_vec_f64())
}

/// Random u32 ids in `0..bound`.
pub fn random_ids(n: usize, bound: usize, seed: u64) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..bound)).collect()
}

/// Ids as a u32 tensor of `shape`.
pub fn ids_tensor(ids: &[usize], shape: &[usize]) -> Tensor {
    Tensor::from_vec(ids.iter().map(|&i| i as u32).collect(), shape).expect("ids match their shape")
}

/// Checks the gradients of `f` at the f64 `inputs` by central differences (step 1e-6) and fails
/// the proptest case when any input's relative error reaches 1e-6.
pub fn check(f: impl Fn(&[Var]) -> autograd::Result<Var>, inputs: &[Tensor]) -> Result<(), TestCaseError> {
    let report = check_gradients(f, inputs, 1e-6).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(
        report.max_error() < 1e-6,
        "relative errors {:?} for input shapes {:?}",
        report.relative_errors,
        inputs.iter().map(|t| t.shape().to_vec()).collect::<Vec<_>>()
    );
    Ok(())
}

/// The relative L2 error ‖a − b‖ / ‖b‖ of `a` against the reference `b` over all elements (any
/// dtype, layout or device): the absolute error ‖a‖ where `b` is all zeros; infinite on NaN or
/// when the element counts differ.
pub fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    let (x, y) = (a.to_vec_f64(), b.to_vec_f64());
    if x.len() != y.len() || x.iter().chain(&y).any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let diff = x
        .iter()
        .zip(&y)
        .map(|(p, q)| (p - q) * (p - q))
        .sum::<f64>()
        .sqrt();
    let norm = y.iter().map(|q| q * q).sum::<f64>().sqrt();
    if norm > 0.0 {
        diff / norm
    } else {
        diff
    }
}
