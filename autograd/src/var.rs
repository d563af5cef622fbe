//! `Var`: a tensor in a differentiable graph, and the backward walk.

use crate::contribution::Contribution;
use crate::{AutogradError, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tensor::Tensor;

/// A backward rule: given d(loss)/d(output) and which inputs need a gradient, returns
/// d(loss)/d(input) for each input (`None` where none is needed).
pub(crate) type BackwardFn =
    Box<dyn FnOnce(&Tensor, &[bool]) -> tensor::Result<Vec<Option<Contribution>>> + Send>;

struct Node {
    inputs: Vec<Var>,
    backward: Mutex<Option<BackwardFn>>,
}

struct VarInner {
    id: usize,
    value: Tensor,
    requires_grad: bool,
    node: Option<Node>,
    grad: Mutex<Option<Tensor>>,
}

/// A tensor that may take part in a differentiable graph. Cloning shares the same var.
#[derive(Clone)]
pub struct Var(Arc<VarInner>);

impl std::fmt::Debug for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Var({:?}, requires_grad: {})",
            self.0.value, self.0.requires_grad
        )
    }
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

impl Var {
    fn new(value: Tensor, requires_grad: bool, node: Option<Node>) -> Self {
        Var(Arc::new(VarInner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            value,
            requires_grad,
            node,
            grad: Mutex::new(None),
        }))
    }

    /// A leaf that gathers a gradient (a parameter or a differentiated input).
    pub fn parameter(value: Tensor) -> Self {
        Self::new(value, true, None)
    }

    /// A leaf that needs no gradient (data, labels, frozen weights).
    pub fn constant(value: Tensor) -> Self {
        Self::new(value, false, None)
    }

    /// The value of this var.
    pub fn value(&self) -> &Tensor {
        &self.0.value
    }

    /// Whether a gradient flows to (or through) this var.
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }

    /// The same value cut from the graph.
    pub fn detach(&self) -> Var {
        Var::constant(self.0.value.clone())
    }

    /// The gradient accumulated into this leaf by `backward` calls so far.
    pub fn grad(&self) -> Option<Tensor> {
        self.0.grad.lock().expect("grad lock").clone()
    }

    /// Forgets the accumulated gradient.
    pub fn zero_grad(&self) {
        *self.0.grad.lock().expect("grad lock") = None;
    }

    /// Records the result of an op on `inputs`: a constant when no input requires a gradient,
    /// else a node holding `backward`, which must return one entry per input.
    pub(crate) fn record(
        value: Tensor,
        inputs: &[&Var],
        backward: impl FnOnce(&Tensor, &[bool]) -> tensor::Result<Vec<Option<Tensor>>> + Send + 'static,
    ) -> Var {
        Self::record_contributions(value, inputs, move |g, needs| {
            Ok(backward(g, needs)?
                .into_iter()
                .map(|grad| grad.map(Contribution::Whole))
                .collect())
        })
    }

    /// [`Var::record`] for a rule that may pass parts of gradients (see [`Contribution`]).
    pub(crate) fn record_contributions(
        value: Tensor,
        inputs: &[&Var],
        backward: impl FnOnce(&Tensor, &[bool]) -> tensor::Result<Vec<Option<Contribution>>> + Send + 'static,
    ) -> Var {
        if !inputs.iter().any(|v| v.requires_grad()) {
            return Var::constant(value);
        }
        let node = Node {
            inputs: inputs.iter().map(|v| (*v).clone()).collect(),
            backward: Mutex::new(Some(Box::new(backward))),
        };
        Var::new(value, true, Some(node))
    }

    /// Back-propagates from this one-element var: adds d(self)/d(leaf) into every leaf's gradient.
    /// Each node's saved tensors are freed once its rule has run, so a graph is walked once.
    pub fn backward(&self) -> Result<()> {
        self.backward_notifying(&mut |_| {})
    }

    /// Back-propagates `grad` = d(loss)/d(self) (same shape as the value).
    pub fn backward_with(&self, grad: Tensor) -> Result<()> {
        self.walk(grad, &mut |_| {})
    }

    /// [`Var::backward`], calling `on_ready(leaf)` for each leaf reached as soon as its gradient
    /// is final: once the rules of all its consumers have run, while the rest of the graph is
    /// still to be walked (so that work on the last layers' gradients can start early). Each
    /// leaf is announced once, in a deterministic order; a leaf whose consumers produced no
    /// gradient is announced all the same.
    pub fn backward_notifying(&self, on_ready: &mut dyn FnMut(&Var)) -> Result<()> {
        if self.value().numel() != 1 {
            return Err(AutogradError::NotScalar(self.value().shape().to_vec()));
        }
        if !self.requires_grad() {
            return Err(AutogradError::NoGradient);
        }
        let value = self.value();
        let seed = Tensor::ones_on(value.shape(), value.dtype(), value.device())?;
        self.walk(seed, on_ready)
    }

    /// The walk behind [`Var::backward_with`] and [`Var::backward_notifying`].
    fn walk(&self, grad: Tensor, on_ready: &mut dyn FnMut(&Var)) -> Result<()> {
        // Descending creation ids are a topological order (see `reachable`). `consumers`
        // counts, per var, the uses of it as an input of a reachable node.
        let order = self.reachable();
        let mut consumers: HashMap<usize, usize> = HashMap::new();
        for node in order.values().filter_map(|v| v.0.node.as_ref()) {
            for input in node.inputs.iter().filter(|i| i.requires_grad()) {
                *consumers.entry(input.0.id).or_default() += 1;
            }
        }
        let mut grads: BTreeMap<usize, Tensor> = BTreeMap::new();
        grads.insert(self.0.id, grad);
        for (id, var) in order.iter().rev() {
            let Some(node) = &var.0.node else {
                // Only a leaf nobody consumes is still here: the var back-propagated from.
                if let Some(g) = grads.remove(id) {
                    var.accumulate(g)?;
                    on_ready(var);
                }
                continue;
            };
            let needs: Vec<bool> = node.inputs.iter().map(Var::requires_grad).collect();
            // A node no gradient reached passes none on, but its inputs lose a consumer.
            let input_grads = match grads.remove(id) {
                Some(g) => {
                    let rule = node.backward.lock().expect("backward lock").take();
                    let rule = rule.ok_or(AutogradError::GraphConsumed)?;
                    rule(&g, &needs)?
                }
                None => needs.iter().map(|_| None).collect(),
            };
            debug_assert_eq!(input_grads.len(), node.inputs.len(), "one gradient per input");
            for ((input, ig), need) in node.inputs.iter().zip(input_grads).zip(needs) {
                if !need {
                    continue;
                }
                if let Some(ig) = ig {
                    let sum = ig.add_to(grads.remove(&input.0.id), input.value())?;
                    grads.insert(input.0.id, sum);
                }
                let left = consumers.get_mut(&input.0.id).expect("counted when reached");
                *left -= 1;
                if *left == 0 && input.0.node.is_none() {
                    if let Some(g) = grads.remove(&input.0.id) {
                        input.accumulate(g)?;
                    }
                    on_ready(input);
                }
            }
        }
        Ok(())
    }

    /// Adds `g` into this leaf's gradient.
    fn accumulate(&self, g: Tensor) -> Result<()> {
        let mut slot = self.0.grad.lock().expect("grad lock");
        *slot = Some(match slot.take() {
            Some(acc) => acc.add_into(&g)?,
            None => g.try_contiguous()?,
        });
        Ok(())
    }

    /// A number that identifies this var (shared by its clones) while it lives.
    pub fn id(&self) -> usize {
        self.0.id
    }

    /// The leaves that require a gradient and that this var's value depends on, in creation
    /// order.
    pub fn leaves(&self) -> Vec<Var> {
        self.reachable()
            .into_values()
            .filter(|v| v.0.node.is_none())
            .collect()
    }

    /// Every var reachable from this one through vars that require gradients, keyed by
    /// creation id: inputs are always created before their outputs, so descending ids are a
    /// topological order.
    fn reachable(&self) -> BTreeMap<usize, Var> {
        let mut found: BTreeMap<usize, Var> = BTreeMap::new();
        let mut stack = vec![self.clone()];
        while let Some(v) = stack.pop() {
            if !v.requires_grad() || found.contains_key(&v.0.id) {
                continue;
            }
            if let Some(node) = &v.0.node {
                stack.extend(node.inputs.iter().cloned());
            }
            found.insert(v.0.id, v);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::Var;
    use tensor::{DType, Tensor};

    #[test]
    fn ops_on_constants_record_no_graph() {
        let x = Var::constant(Tensor::ones(&[3], DType::F32));
        let y = x.exp().unwrap().sum_all().unwrap();
        assert!(!y.requires_grad() && y.0.node.is_none());
        assert!(matches!(y.backward(), Err(crate::AutogradError::NoGradient)));
    }

    #[test]
    fn each_leaf_is_announced_once_as_soon_as_its_gradient_is_final() {
        let mut rng = tensor::seeded_rng(3);
        let mut rand = |shape: &[usize]| Tensor::randn(shape, DType::F64, 0.0, 1.0, &mut rng).unwrap();
        let x = Var::constant(rand(&[3, 4]));
        let (w1, w2) = (Var::parameter(rand(&[4, 5])), Var::parameter(rand(&[5, 2])));
        let forward = || {
            let h = x.matmul(&w1).unwrap().tanh().unwrap();
            let y = h.matmul(&w2).unwrap().tanh().unwrap().sum_all().unwrap();
            // w1 is used again after w2: its gradient is final only after both uses.
            y.add(&w1.sqr().unwrap().sum_all().unwrap()).unwrap()
        };
        forward().backward().unwrap();
        let expected = [w2.grad().unwrap(), w1.grad().unwrap()].map(|g| g.to_vec::<f64>().unwrap());
        w1.zero_grad();
        w2.zero_grad();
        let mut announced = Vec::new();
        forward()
            .backward_notifying(&mut |leaf| {
                let other_done = [&w1, &w2].map(|w| w.grad().is_some());
                announced.push((
                    leaf.id(),
                    leaf.grad().unwrap().to_vec::<f64>().unwrap(),
                    other_done,
                ));
            })
            .unwrap();
        assert_eq!(announced.len(), 2);
        // w2 first, while w1 (whose rule runs later) has no gradient yet; each with its final value.
        assert_eq!(announced[0].0, w2.id());
        assert_eq!(announced[0].2, [false, true]);
        assert_eq!(announced[1].0, w1.id());
        assert_eq!(announced[0].1, expected[0]);
        assert_eq!(announced[1].1, expected[1]);
    }

    #[test]
    fn a_frozen_input_gets_no_gradient() {
        let w = Var::parameter(Tensor::ones(&[2, 2], DType::F64));
        let frozen = Var::constant(Tensor::ones(&[2, 2], DType::F64));
        w.matmul(&frozen).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(w.grad().is_some() && frozen.grad().is_none());
    }
}
