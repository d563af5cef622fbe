//! Checking backward rules against central finite differences.

use crate::{Result, Var};
use tensor::{DType, Tensor};

/// The outcome of a gradient check: per input, the relative error
/// `‖analytic - numeric‖ / max(‖numeric‖, 1e-12)` of the gradient of a random projection of the output,
/// where each element's difference first has the finite difference's own rounding noise taken off
/// (see [`check_gradients`]).
#[derive(Clone, Debug)]
pub struct GradCheck {
    /// One relative error per input.
    pub relative_errors: Vec<f64>,
}

impl GradCheck {
    /// The largest relative error over all inputs (infinite if any is NaN).
    pub fn max_error(&self) -> f64 {
        self.relative_errors.iter().fold(
            0.0,
            |m: f64, &e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
        )
    }
}

/// Compares the gradients that `backward` gives for `f(inputs)` with central differences of step
/// `eps`, in f64. The output is projected on fixed pseudo-random weights `w` (loss = Σ w·f), so the
/// whole Jacobian takes part, not only its column sums. Every input must be f64.
///
/// A central difference in f64 carries rounding noise of about `ε·S / eps`, where `ε` is f64's
/// machine epsilon and `S = Σ|w·f|` the size of the terms summed into the loss: when a gradient
/// is itself that small, the noise alone would look like a wrong backward rule. Each element's
/// difference is therefore reduced by [`ROUNDING_ALLOWANCE`]` · ε·S / eps` (never below zero)
/// before the relative error is taken; a wrong rule still shows, since its error is of the size of
/// the gradient, not of the noise.
pub fn check_gradients(f: impl Fn(&[Var]) -> Result<Var>, inputs: &[Tensor], eps: f64) -> Result<GradCheck> {
    for t in inputs {
        if t.dtype() != DType::F64 {
            return Err(tensor::TensorError::DType {
                op: "check_gradients (inputs must be f64)",
                dtype: t.dtype(),
            }
            .into());
        }
    }
    let loss =
        |vars: &[Var], w: &Tensor| -> Result<Var> { f(vars)?.mul(&Var::constant(w.clone()))?.sum_all() };
    let probe: Vec<Var> = inputs.iter().map(|t| Var::constant(t.clone())).collect();
    let out_shape = f(&probe)?.value().shape().to_vec();
    let w = projection_weights(&out_shape);
    let terms = f(&probe)?.value().to_vec_f64();
    let loss_scale: f64 = terms.iter().zip(w.to_vec_f64()).map(|(y, w)| (y * w).abs()).sum();
    let noise = ROUNDING_ALLOWANCE * f64::EPSILON * loss_scale / eps;

    let vars: Vec<Var> = inputs.iter().map(|t| Var::parameter(t.clone())).collect();
    loss(&vars, &w)?.backward()?;

    let mut relative_errors = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let analytic = match vars[i].grad() {
            Some(g) => g.to_vec_f64(),
            None => vec![0.0; input.numel()],
        };
        let base = input.to_vec_f64();
        let mut numeric = Vec::with_capacity(base.len());
        for j in 0..base.len() {
            let eval = |delta: f64| -> Result<f64> {
                let mut data = base.clone();
                data[j] += delta;
                let mut args = probe.clone();
                args[i] = Var::constant(Tensor::from_vec(data, input.shape())?);
                Ok(loss(&args, &w)?.value().to_scalar_f64()?)
            };
            numeric.push((eval(eps)? - eval(-eps)?) / (2.0 * eps));
        }
        let diff: f64 = analytic
            .iter()
            .zip(&numeric)
            .map(|(a, n)| ((a - n).abs() - noise).max(0.0).powi(2))
            .sum();
        let norm: f64 = numeric.iter().map(|n| n * n).sum();
        relative_errors.push(diff.sqrt() / norm.sqrt().max(1e-12));
    }
    Ok(GradCheck { relative_errors })
}

/// How many machine epsilons of the loss's size a finite difference's rounding may cost: the ops
/// under test round each output several times before the loss sums them.
pub const ROUNDING_ALLOWANCE: f64 = 64.0;

/// Deterministic weights in [0.5, 1.5) with varying signs, so no gradient cancels by symmetry.
fn projection_weights(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n)
        .map(|i| {
            let u = ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
            let sign = if i % 3 == 1 { -1.0 } else { 1.0 };
            sign * (0.5 + u)
        })
        .collect();
    Tensor::from_vec(data, shape).expect("length matches shape")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `scale·x·x` with the second factor detached: its backward gives half the true gradient.
    fn half_gradient(v: &[Var], scale: f64) -> Result<Var> {
        v[0].affine(scale, 0.0)?.mul(&v[0].detach())
    }

    #[test]
    fn a_wrong_rule_fails_even_when_its_gradient_is_tiny_next_to_the_loss() {
        let x = Tensor::from_vec(vec![0.3, -0.7, 0.9, 0.5], &[4]).unwrap();
        // Loss terms of size 1 set the rounding allowance; the gradient is 1e5 times smaller.
        let f = |v: &[Var]| half_gradient(v, 1e-5)?.affine(1.0, 1.0);
        let report = check_gradients(f, &[x], 1e-6).unwrap();
        assert!(report.max_error() > 0.4, "{:?}", report.relative_errors);
    }

    #[test]
    fn a_right_rule_passes() {
        let x = Tensor::from_vec(vec![0.3, -0.7, 0.9, 0.5], &[4]).unwrap();
        let report = check_gradients(|v| v[0].mul(&v[0])?.affine(1e-5, 1.0), &[x], 1e-6).unwrap();
        assert!(report.max_error() < 1e-6, "{:?}", report.relative_errors);
    }
}
