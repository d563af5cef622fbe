//! AdamW with decoupled weight decay (Loshchilov & Hutter), on named f32 parameters.

use crate::Result;
use std::collections::BTreeMap;
use tensor::{AdamWStep, Tensor};

/// AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (not applied to 1-D parameters: norms and biases).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW state: step count and both moments per parameter name.
pub struct AdamW {
    /// Hyper-parameters (the learning rate may be changed between steps by a schedule).
    pub config: AdamWConfig,
    step: u64,
    moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    /// A fresh optimiser.
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            step: 0,
            moments: BTreeMap::new(),
        }
    }

    /// An optimiser continuing from a saved state: `step` steps taken and the first and second
    /// moments by parameter name (as [`AdamW::moments`] gives them).
    pub fn resume(config: AdamWConfig, step: u64, moments: BTreeMap<String, (Tensor, Tensor)>) -> Self {
        AdamW {
            config,
            step,
            moments,
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The first and second moments by parameter name (for checkpoints).
    pub fn moments(&self) -> &BTreeMap<String, (Tensor, Tensor)> {
        &self.moments
    }

    /// Updates every parameter that has a gradient in `grads`; others are left as they are. A
    /// parameter and its moments are updated in their own memory when nothing else holds them.
    pub fn step(
        &mut self,
        params: &mut BTreeMap<String, Tensor>,
        grads: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        self.step += 1;
        let c = self.config;
        for (name, g) in grads {
            let Some(p) = params.get_mut(name) else { continue };
            let (mut m, mut v) = match self.moments.remove(name) {
                Some(mv) => mv,
                None => (
                    Tensor::zeros_on(p.shape(), p.dtype(), p.device())?,
                    Tensor::zeros_on(p.shape(), p.dtype(), p.device())?,
                ),
            };
            let hyper = AdamWStep {
                lr: c.lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                // Matrices decay; vectors (norm weights, biases) do not.
                weight_decay: if p.rank() >= 2 { c.weight_decay } else { 0.0 },
                step: self.step,
            };
            // In place when the optimizer holds the only handles (see adamw_update_in_place).
            p.adamw_update_in_place(g, &mut m, &mut v, &hyper)?;
            self.moments.insert(name.clone(), (m, v));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{AdamW, AdamWConfig};
    use std::collections::BTreeMap;
    use tensor::Tensor;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        let mut params = BTreeMap::from([(
            "w".to_string(),
            Tensor::from_vec(vec![1.0f64, -2.0], &[1, 2]).unwrap(),
        )]);
        let grads = BTreeMap::from([(
            "w".to_string(),
            Tensor::from_vec(vec![0.5f64, -3.0], &[1, 2]).unwrap(),
        )]);
        let mut opt = AdamW::new(AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            eps: 0.0,
            ..Default::default()
        });
        opt.step(&mut params, &grads).unwrap();
        // m̂/√v̂ = sign(g) on the first step; decay scales the weight by (1 - lr·wd) first.
        let expected = [1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1];
        for (p, e) in params["w"].to_vec_f64().iter().zip(expected) {
            assert!((p - e).abs() < 1e-12, "{p} vs {e}");
        }
    }

    #[test]
    fn parameters_and_moments_are_updated_in_their_own_memory() {
        let mut params = BTreeMap::from([(
            "w".to_string(),
            Tensor::from_vec(vec![1.0f32, -2.0, 0.5], &[3]).unwrap(),
        )]);
        let grads = BTreeMap::from([(
            "w".to_string(),
            Tensor::from_vec(vec![0.5f32, -3.0, 1.0], &[3]).unwrap(),
        )]);
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.step(&mut params, &grads).unwrap();
        let memory = |params: &BTreeMap<String, Tensor>, opt: &AdamW| {
            let (m, v) = &opt.moments()["w"];
            [&params["w"], m, v].map(|t| std::sync::Arc::as_ptr(t.storage()))
        };
        let before = memory(&params, &opt);
        let old = params["w"].to_vec_f64();
        opt.step(&mut params, &grads).unwrap();
        assert_eq!(memory(&params, &opt), before);
        assert_ne!(params["w"].to_vec_f64(), old);
    }
}
