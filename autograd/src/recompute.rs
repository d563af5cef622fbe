//! Activation recomputation: a part of the graph whose inside is not kept for the backward pass
//! but computed again when the backward pass reaches it (gradient checkpointing).

use crate::{AutogradError, Var};
use tensor::TensorError;

impl Var {
    /// `f(self)`, keeping only the input and the output: `f`'s intermediate tensors are freed
    /// when this returns, and the backward pass runs `f` again on the saved input to
    /// differentiate it. The gradients of the parameters `f` uses go straight into their leaves
    /// during that second run; `self` gets its gradient as usual. `f` must compute the same
    /// thing both times (every op here is deterministic).
    ///
    /// When `self` needs no gradient, `f` runs as usual and keeps its graph: the parameters
    /// inside still get their gradients, only without the memory saving.
    pub fn recomputed<E, F>(&self, f: F) -> std::result::Result<Var, E>
    where
        E: From<AutogradError> + std::fmt::Display,
        F: Fn(&Var) -> std::result::Result<Var, E> + Send + 'static,
    {
        if !self.requires_grad() {
            return f(self);
        }
        let input = self.value().clone();
        // Run once on a constant: the parameters inside still record a graph, which is dropped
        // with `first` at the end of this call.
        let first = f(&Var::constant(input.clone()))?;
        let value = first.value().clone();
        // The parameters inside are recorded as inputs too (they get no gradient through this
        // node, their own backward pass fills them): so a walk announcing finished leaves knows
        // they are done once this node's rule has run.
        let inner = first.leaves();
        drop(first);
        let mut inputs = vec![self];
        inputs.extend(&inner);
        let slots = inputs.len();
        Ok(Var::record(value, &inputs, move |g, _| {
            let failed = |detail: String| TensorError::Recompute {
                op: "recomputed block",
                detail,
            };
            let x = Var::parameter(input);
            let y = f(&x).map_err(|e| failed(e.to_string()))?;
            y.backward_with(g.clone()).map_err(|e| match e {
                AutogradError::Tensor(t) => t,
                other => failed(other.to_string()),
            })?;
            let mut grads = vec![x.grad()];
            grads.resize(slots, None);
            Ok(grads)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::Var;
    use tensor::{DType, Tensor};

    /// A two-layer block with a residual, on random inputs.
    fn block(x: &Var, w1: &Var, w2: &Var) -> crate::Result<Var> {
        let h = x.matmul(w1)?.silu()?;
        x.add(&h.matmul(w2)?.tanh()?)
    }

    #[test]
    fn recomputed_gradients_equal_the_kept_graph_s() {
        let mut rng = tensor::seeded_rng(1);
        let mut rand = |shape: &[usize]| Tensor::randn(shape, DType::F64, 0.0, 1.0, &mut rng).unwrap();
        let x0 = rand(&[3, 4]);
        let (w1, w2) = (Var::parameter(rand(&[4, 5])), Var::parameter(rand(&[5, 4])));
        let run = |recompute: bool| {
            w1.zero_grad();
            w2.zero_grad();
            let x = Var::parameter(x0.clone());
            let y = if recompute {
                let (a, b) = (w1.clone(), w2.clone());
                let (c, d) = (w1.clone(), w2.clone());
                x.recomputed(move |x| block(x, &a, &b))
                    .unwrap()
                    .recomputed(move |x| block(x, &c, &d))
                    .unwrap()
            } else {
                block(&block(&x, &w1, &w2).unwrap(), &w1, &w2).unwrap()
            };
            y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let grads = [x.grad(), w1.grad(), w2.grad()].map(|g| g.unwrap().to_vec::<f64>().unwrap());
            (y.value().to_vec::<f64>().unwrap(), grads)
        };
        let (y_kept, g_kept) = run(false);
        let (y_re, g_re) = run(true);
        assert_eq!(y_kept, y_re);
        for (a, b) in g_kept.iter().zip(&g_re) {
            let scale = a.iter().map(|v| v.abs()).fold(0.0, f64::max);
            assert!(scale > 0.0);
            for (u, v) in a.iter().zip(b) {
                assert!((u - v).abs() <= 1e-12 * scale, "{u} vs {v}");
            }
        }
    }

    #[test]
    fn parameters_inside_a_recomputed_block_are_announced_when_it_has_run() {
        let mut rng = tensor::seeded_rng(4);
        let mut rand =
            |shape: &[usize]| Var::parameter(Tensor::randn(shape, DType::F64, 0.0, 1.0, &mut rng).unwrap());
        let x = rand(&[3, 4]);
        let (a1, b1, a2, b2) = (rand(&[4, 5]), rand(&[5, 4]), rand(&[4, 5]), rand(&[5, 4]));
        let (p, q, r, s) = (a1.clone(), b1.clone(), a2.clone(), b2.clone());
        let y = x
            .recomputed(move |x| block(x, &p, &q))
            .unwrap()
            .recomputed(move |x| block(x, &r, &s))
            .unwrap();
        let mut announced = Vec::new();
        y.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward_notifying(&mut |leaf| announced.push((leaf.id(), a1.grad().is_some())))
            .unwrap();
        let ids: Vec<usize> = announced.iter().map(|(id, _)| *id).collect();
        // The second block's parameters come first, before the first block has run again.
        assert_eq!(ids, vec![a2.id(), b2.id(), x.id(), a1.id(), b1.id()]);
        assert_eq!(
            announced
                .iter()
                .map(|(_, first_done)| *first_done)
                .collect::<Vec<_>>(),
            vec![false, false, true, true, true]
        );
    }

    #[test]
    fn a_constant_input_still_trains_the_parameters_inside() {
        let mut rng = tensor::seeded_rng(2);
        let w = Var::parameter(Tensor::randn(&[2, 2], DType::F64, 0.0, 1.0, &mut rng).unwrap());
        let x = Var::constant(Tensor::randn(&[3, 2], DType::F64, 0.0, 1.0, &mut rng).unwrap());
        let inner = w.clone();
        let y = x.recomputed(move |x| x.matmul(&inner)).unwrap();
        y.sum_all().unwrap().backward().unwrap();
        assert!(w.grad().is_some());
    }
}
