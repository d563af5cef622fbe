//! Helpers for the kernels' unit tests.

use crate::Tensor;

/// Asserts that each `analytic[i]` is the gradient of `loss` with respect to `inputs[i]`, by
/// central differences of step 1e-6 in f64, to an absolute tolerance of 1e-7 per element.
pub(crate) fn assert_finite_differences(
    inputs: &[Tensor],
    analytic: &[Tensor],
    loss: impl Fn(&[Tensor]) -> f64,
) {
    for (i, grad) in analytic.iter().enumerate() {
        assert_eq!(grad.shape(), inputs[i].shape());
        let base = inputs[i].to_vec_f64();
        for (j, &expected) in grad.to_vec_f64().iter().enumerate() {
            let at = |step: f64| {
                let mut v = base.clone();
                v[j] += step;
                let mut moved = inputs.to_vec();
                moved[i] = Tensor::from_vec(v, inputs[i].shape()).unwrap();
                loss(&moved)
            };
            let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!(
                (numeric - expected).abs() < 1e-7,
                "input {i}[{j}]: {numeric} vs {expected}"
            );
        }
    }
}
