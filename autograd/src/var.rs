//! `Var`: a tensor in a differentiable graph, and the backward walk.

use crate::{AutogradError, Result};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tensor::Tensor;

/// A backward rule: given d(loss)/d(output) and which inputs need a gradient, returns
/// d(loss)/d(input) for each input (`None` where none is needed).
pub(crate) type BackwardFn = Box<dyn FnOnce(&Tensor, &[bool]) -> tensor::Result<Vec<Option<Tensor>>> + Send>;

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
        if self.value().numel() != 1 {
            return Err(AutogradError::NotScalar(self.value().shape().to_vec()));
        }
        if !self.requires_grad() {
            return Err(AutogradError::NoGradient);
        }
        let value = self.value();
        let seed = Tensor::ones_on(value.shape(), value.dtype(), value.device())?;
        self.backward_with(seed)
    }

    /// Back-propagates `grad` = d(loss)/d(self) (same shape as the value).
    pub fn backward_with(&self, grad: Tensor) -> Result<()> {
        // Every var reachable through vars that require gradients, keyed by creation id:
        // inputs are always created before their outputs, so descending ids are a topological order.
        let mut order: BTreeMap<usize, Var> = BTreeMap::new();
        let mut stack = vec![self.clone()];
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !v.requires_grad() || !seen.insert(v.0.id) {
                continue;
            }
            if let Some(node) = &v.0.node {
                stack.extend(node.inputs.iter().cloned());
            }
            order.insert(v.0.id, v);
        }
        let mut grads: BTreeMap<usize, Tensor> = BTreeMap::new();
        grads.insert(self.0.id, grad);
        for (id, var) in order.iter().rev() {
            let Some(g) = grads.remove(id) else { continue };
            let Some(node) = &var.0.node else {
                let mut slot = var.0.grad.lock().expect("grad lock");
                *slot = Some(match slot.take() {
                    Some(acc) => acc.add(&g)?,
                    None => g.try_contiguous()?,
                });
                continue;
            };
            let rule = node.backward.lock().expect("backward lock").take();
            let rule = rule.ok_or(AutogradError::GraphConsumed)?;
            let needs: Vec<bool> = node.inputs.iter().map(Var::requires_grad).collect();
            let input_grads = rule(&g, &needs)?;
            debug_assert_eq!(input_grads.len(), node.inputs.len(), "one gradient per input");
            for ((input, ig), need) in node.inputs.iter().zip(input_grads).zip(needs) {
                let Some(ig) = ig.filter(|_| need) else { continue };
                let entry = match grads.remove(&input.0.id) {
                    Some(acc) => acc.add(&ig)?,
                    None => ig,
                };
                grads.insert(input.0.id, entry);
            }
        }
        Ok(())
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
    fn a_frozen_input_gets_no_gradient() {
        let w = Var::parameter(Tensor::ones(&[2, 2], DType::F64));
        let frozen = Var::constant(Tensor::ones(&[2, 2], DType::F64));
        w.matmul(&frozen).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(w.grad().is_some() && frozen.grad().is_none());
    }
}
