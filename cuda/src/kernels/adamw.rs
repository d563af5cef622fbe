//! The fused AdamW step.

use super::need;
use crate::compile::ADAMW;
use crate::device::{DeviceBuffer, FloatElem, GpuDevice};
use crate::error::{CudaError, Result};
use crate::launch::{entry, launch, AdamArg, Arg, Grid};
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

impl AdamWStep {
    /// The kernel's coefficients, computed in f64 and rounded to f32 as the CPU optimiser
    /// rounds its literals.
    fn coefficients(&self) -> Result<AdamArg> {
        if self.step == 0 {
            return Err(CudaError::shape("adamw", "steps count from 1"));
        }
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        Ok(AdamArg {
            beta1: self.beta1 as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            inv_bc1: (1.0 / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: self.eps as f32,
            lr: self.lr as f32,
            decay_factor: (1.0 - self.lr * self.weight_decay) as f32,
        })
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
        let coefficients = step.coefficients()?;
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
