//! The fused AdamW step.

use super::need;
use crate::compile::ADAMW;
use crate::device::{DeviceBuffer, FloatElem, GpuDevice};
use crate::error::{CudaError, Result};
use crate::launch::{entry, launch, Arg, Grid};
use half::bf16;

/// One AdamW step's hyper-parameters (as `nn`'s `AdamWConfig`) and its 1-based step number.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay for this parameter (0 for norms and biases).
    pub weight_decay: f64,
    /// The step being taken, from 1 (for the bias corrections).
    pub step: u64,
}

/// The coefficients one AdamW step applies (`AdamParams` in adamw.cu, whose field order this
/// follows): `m = beta1·m + one_minus_beta1·g`, `v = beta2·v + one_minus_beta2·g²`,
/// `p = p·decay_factor − lr·(m·inv_bc1) / (sqrt(v·inv_bc2) + eps)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamCoefficients<F> {
    /// First-moment decay.
    pub beta1: F,
    /// 1 − beta1.
    pub one_minus_beta1: F,
    /// Second-moment decay.
    pub beta2: F,
    /// 1 − beta2.
    pub one_minus_beta2: F,
    /// 1 / (1 − beta1^step).
    pub inv_bc1: F,
    /// 1 / (1 − beta2^step).
    pub inv_bc2: F,
    /// Denominator epsilon.
    pub eps: F,
    /// Learning rate.
    pub lr: F,
    /// 1 − lr · weight_decay.
    pub decay_factor: F,
}

impl<F: Copy> AdamCoefficients<F> {
    /// Every coefficient converted by `f` (e.g. rounded once to the compute type).
    pub fn map<G>(&self, f: impl Fn(F) -> G) -> AdamCoefficients<G> {
        AdamCoefficients {
            beta1: f(self.beta1),
            one_minus_beta1: f(self.one_minus_beta1),
            beta2: f(self.beta2),
            one_minus_beta2: f(self.one_minus_beta2),
            inv_bc1: f(self.inv_bc1),
            inv_bc2: f(self.inv_bc2),
            eps: f(self.eps),
            lr: f(self.lr),
            decay_factor: f(self.decay_factor),
        }
    }
}

impl AdamWStep {
    /// The step's coefficients, computed in f64 (the kernel and the CPU update round them
    /// once to their compute type).
    pub fn coefficients(&self) -> AdamCoefficients<f64> {
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        AdamCoefficients {
            beta1: self.beta1,
            one_minus_beta1: 1.0 - self.beta1,
            beta2: self.beta2,
            one_minus_beta2: 1.0 - self.beta2,
            inv_bc1: 1.0 / bc1,
            inv_bc2: 1.0 / bc2,
            eps: self.eps,
            lr: self.lr,
            decay_factor: 1.0 - self.lr * self.weight_decay,
        }
    }
}

impl GpuDevice {
    /// Updates f32 master weights `param` and moments `m`, `v` in place from `grad` (f32, bf16
    /// or f16); writes the updated weights rounded to bf16 into `param_bf16` when given.
    pub fn adamw<G: FloatElem>(
        &self,
        param: &mut DeviceBuffer<f32>,
        grad: &DeviceBuffer<G>,
        (m, v): (&mut DeviceBuffer<f32>, &mut DeviceBuffer<f32>),
        param_bf16: Option<&mut DeviceBuffer<bf16>>,
        step: &AdamWStep,
    ) -> Result<()> {
        let n = param.len();
        self.check_owner("adamw", param)?;
        need(self, "adamw", "gradient", grad, n)?;
        need(self, "adamw", "first moment", m, n)?;
        need(self, "adamw", "second moment", v, n)?;
        if let Some(copy) = &param_bf16 {
            need(self, "adamw", "bf16 copy", copy, n)?;
        }
        if step.step == 0 {
            return Err(CudaError::shape("adamw", "steps count from 1"));
        }
        let coefficients = step.coefficients().map(|v| v as f32);
        if n == 0 {
            return Ok(());
        }
        let args = [
            Arg::buf(param),
            Arg::buf(grad),
            Arg::buf(m),
            Arg::buf(v),
            Arg::opt(param_bf16.as_deref()),
            Arg::size(n),
            Arg::Adam(coefficients),
        ];
        launch(
            self,
            &ADAMW,
            &entry::<G>("adamw"),
            Grid::elementwise(self, n),
            &args,
        )
    }
}
