//! Shared pieces of the GPU test suites: the device under test, a proptest runner that skips
//! without a GPU, inputs held on both devices, and the comparison of a GPU output with the CPU
//! reference.

use crate::config;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use std::fmt::Debug;
use tensor::{Device, Tensor};

/// The device under test.
pub const GPU: Device = Device::Cuda(0);

/// The outcome of one proptest case.
pub type TestResult = Result<(), TestCaseError>;

/// Whether GPU tests can run on `cuda:0`: prints one line `skipped: <reason>` when not, and
/// panics instead when `EMMA_REQUIRE_GPU=1` (a GPU run must not pass by skipping).
pub fn gpu_ready() -> bool {
    match tensor::cuda_device(0) {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("EMMA_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("EMMA_REQUIRE_GPU=1 but no usable GPU: {e}");
            }
            println!("skipped: {e}");
            false
        }
    }
}

/// Runs `test` on `cases` values of `strategy` when a GPU is usable.
pub fn run<S>(cases: u32, strategy: S, test: impl Fn(S::Value) -> TestResult)
where
    S: Strategy,
    S::Value: Debug,
{
    if !gpu_ready() {
        return;
    }
    if let Err(e) = TestRunner::new(config(cases)).run(&strategy, test) {
        panic!("{e}");
    }
}

/// Turns an error into a failed case.
pub trait OrFail<T> {
    /// The value, or a failed case naming the error.
    fn or_fail(self) -> Result<T, TestCaseError>;
}

impl<T> OrFail<T> for tensor::Result<T> {
    fn or_fail(self) -> Result<T, TestCaseError> {
        self.map_err(|e| TestCaseError::fail(format!("unexpected error: {e}")))
    }
}

impl<T> OrFail<T> for autograd::Result<T> {
    fn or_fail(self) -> Result<T, TestCaseError> {
        self.map_err(|e| TestCaseError::fail(format!("unexpected error: {e}")))
    }
}

/// Which device's copy of a [`Pair`] a call uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The host copy, the reference.
    Cpu,
    /// The copy on the GPU under test.
    Gpu,
}

/// One input on both devices: the same logical values.
#[derive(Clone)]
pub struct Pair {
    /// The input on the host.
    pub cpu: Tensor,
    /// The input on the GPU.
    pub gpu: Tensor,
}

impl Pair {
    /// A host tensor and its copy on the GPU.
    pub fn of(t: Tensor) -> Result<Pair, TestCaseError> {
        Ok(Pair {
            gpu: t.to_device(GPU).or_fail()?,
            cpu: t,
        })
    }

    /// The copy on `side`.
    pub fn on(&self, side: Side) -> &Tensor {
        match side {
            Side::Cpu => &self.cpu,
            Side::Gpu => &self.gpu,
        }
    }

    /// `f` applied on both devices.
    pub fn map(&self, f: impl Fn(&Tensor) -> tensor::Result<Tensor>) -> Result<Pair, TestCaseError> {
        Ok(Pair {
            cpu: f(&self.cpu).or_fail()?,
            gpu: f(&self.gpu).or_fail()?,
        })
    }
}

/// Fails unless `gpu` lives on the GPU and matches `cpu` in shape, dtype and values: a relative
/// error ([`crate::rel_error`]) of at most `tol`; NaN or infinity never passes. `what` names the
/// output in the failure message.
pub fn check_close(what: &str, cpu: &Tensor, gpu: &Tensor, tol: f64) -> TestResult {
    prop_assert_eq!(gpu.device(), GPU, "{}", what);
    prop_assert_eq!(gpu.shape(), cpu.shape(), "{}", what);
    prop_assert_eq!(gpu.dtype(), cpu.dtype(), "{}", what);
    let out = gpu.to_device(Device::Cpu).or_fail()?;
    let (values, reference) = (out.to_vec_f64(), cpu.to_vec_f64());
    prop_assert!(
        reference.iter().all(|v| v.is_finite()),
        "{what}: the CPU reference is not finite: {:?}",
        &reference[..reference.len().min(8)]
    );
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(TestCaseError::fail(format!(
            "{what}: GPU output {} at {i} of shape {:?}",
            values[i],
            gpu.shape()
        )));
    }
    let err = crate::rel_error(&out, cpu);
    prop_assert!(
        err <= tol,
        "{what} {} {:?}: relative error {err:e} > {tol:e}\n gpu {:?}\n cpu {:?}",
        gpu.dtype(),
        gpu.shape(),
        &values[..values.len().min(8)],
        &reference[..reference.len().min(8)]
    );
    Ok(())
}
