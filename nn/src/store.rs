//! `ParamStore`: a model's parameters keyed by their Hugging Face names.

use crate::init::initial_value;
use crate::{NnError, Result};
use autograd::Var;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use tensor::{DType, Device, Rng, Tensor};

/// How a store creates the parameters it does not hold.
enum Init {
    /// Drawn by `initial_value` from this generator.
    Random(Box<Mutex<Rng>>),
    /// A zero-size placeholder with the right shape (a broadcast scalar): for counting
    /// parameters of models too large to allocate.
    Placeholder,
}

struct Shared {
    vars: Mutex<BTreeMap<String, Var>>,
    used: Mutex<BTreeSet<String>>,
    /// The names taken so far, in the order first taken.
    first_taken: Mutex<Vec<String>>,
    source_name: String,
    trainable: bool,
    /// Prefixes whose parameters are handed out as constants (frozen components).
    frozen: Mutex<Vec<String>>,
    /// The dtype of created parameters.
    dtype: DType,
    /// How a missing parameter is created (`None`: it is an error).
    init: Option<Init>,
    /// Where handed-out parameters live: each is moved there when first taken.
    device: Mutex<Device>,
}

/// Named parameters. Trainable stores hand out leaf vars that gather gradients; frozen stores
/// hand out constants, so a forward pass records no graph. Layers check every name and shape
/// they need when they are built, and [`ParamStore::check_all_used`] reports names nobody took.
/// [`ParamStore::scope`] gives a view under a name prefix (one component of a larger model).
#[derive(Clone)]
pub struct ParamStore {
    shared: Arc<Shared>,
    prefix: String,
}

impl ParamStore {
    /// A store over `tensors`; `source_name` (a file or directory) appears in every error.
    pub fn new(tensors: BTreeMap<String, Tensor>, trainable: bool, source_name: impl Into<String>) -> Self {
        let wrap = if trainable { Var::parameter } else { Var::constant };
        Self::build(
            tensors.into_iter().map(|(k, t)| (k, wrap(t))).collect(),
            trainable,
            source_name,
            None,
        )
    }

    /// An empty store that creates every parameter a layer asks for, in `dtype`, with the
    /// initialiser its name calls for (see [`crate::init`]), drawing from `rng`.
    pub fn random(rng: Rng, dtype: DType, trainable: bool, source_name: impl Into<String>) -> Self {
        let mut store = Self::build(
            BTreeMap::new(),
            trainable,
            source_name,
            Some(Init::Random(Box::new(Mutex::new(rng)))),
        );
        Arc::get_mut(&mut store.shared).expect("new store").dtype = dtype;
        store
    }

    /// An empty store whose parameters are shape-only placeholders (no memory, all zero): a
    /// model built on it reports its parameter names and shapes but cannot be trained.
    pub fn placeholders(source_name: impl Into<String>) -> Self {
        Self::build(BTreeMap::new(), false, source_name, Some(Init::Placeholder))
    }

    fn build(
        vars: BTreeMap<String, Var>,
        trainable: bool,
        source_name: impl Into<String>,
        init: Option<Init>,
    ) -> Self {
        ParamStore {
            shared: Arc::new(Shared {
                vars: Mutex::new(vars),
                used: Mutex::new(BTreeSet::new()),
                first_taken: Mutex::new(Vec::new()),
                source_name: source_name.into(),
                trainable,
                frozen: Mutex::new(Vec::new()),
                dtype: DType::F32,
                init,
                device: Mutex::new(Device::Cpu),
            }),
            prefix: String::new(),
        }
    }

    /// Puts the model on `device`: every parameter a layer takes from now on is moved there
    /// first (loaded and freshly drawn ones alike), so a model built after this call runs on
    /// `device` with inputs placed there. Call it before building the layers.
    pub fn set_device(&self, device: Device) {
        *self.shared.device.lock().expect("device lock") = device;
    }

    /// The device parameters are handed out on.
    pub fn device(&self) -> Device {
        *self.shared.device.lock().expect("device lock")
    }

    /// A view of the parameters under `prefix` (e.g. `"lm."`): names taken through it are
    /// prefixed, and its `check_all_used` looks only below the prefix.
    pub fn scope(&self, prefix: &str) -> ParamStore {
        ParamStore {
            shared: self.shared.clone(),
            prefix: format!("{}{prefix}", self.prefix),
        }
    }

    fn trainable(&self, full_name: &str) -> bool {
        self.shared.trainable
            && !self
                .shared
                .frozen
                .lock()
                .expect("frozen lock")
                .iter()
                .any(|p| full_name.starts_with(p))
    }

    /// Freezes every parameter below this view's prefix: they become constants (no gradient,
    /// no graph), now and when created later. Call it before building the layers that use them.
    pub fn freeze(&self) {
        self.shared
            .frozen
            .lock()
            .expect("frozen lock")
            .push(self.prefix.clone());
        let mut vars = self.shared.vars.lock().expect("store lock");
        for (_, v) in vars.iter_mut().filter(|(k, _)| k.starts_with(&self.prefix)) {
            *v = v.detach();
        }
    }

    /// Adds (or replaces) parameter `key` with `value`, trainable unless frozen.
    pub fn insert(&self, key: &str, value: Tensor) {
        let full = format!("{}{key}", self.prefix);
        let var = if self.trainable(&full) {
            Var::parameter(value)
        } else {
            Var::constant(value)
        };
        self.shared.vars.lock().expect("store lock").insert(full, var);
    }

    /// Where the parameters came from.
    pub fn source_name(&self) -> &str {
        &self.shared.source_name
    }

    /// Every name below this view's prefix (without the prefix), sorted.
    pub fn names(&self) -> Vec<String> {
        let vars = self.shared.vars.lock().expect("store lock");
        vars.keys()
            .filter_map(|k| k.strip_prefix(&self.prefix))
            .map(String::from)
            .collect()
    }

    /// The parameter `key`, which must have `shape`; marks it used. In a random or placeholder
    /// store a missing parameter is created.
    pub fn take(&self, key: &str, shape: &[usize]) -> Result<Var> {
        let full = format!("{}{key}", self.prefix);
        let mut vars = self.shared.vars.lock().expect("store lock");
        if !vars.contains_key(&full) {
            if let Some(init) = &self.shared.init {
                let dtype = self.shared.dtype;
                let value = match init {
                    Init::Random(rng) => {
                        initial_value(&full, shape, dtype, &mut rng.lock().expect("rng lock"))?
                    }
                    Init::Placeholder => Tensor::zeros(&[], dtype).broadcast_to(shape)?,
                };
                let var = if self.trainable(&full) {
                    Var::parameter(value)
                } else {
                    Var::constant(value)
                };
                vars.insert(full.clone(), var);
            }
        }
        let mut var = vars
            .get(&full)
            .ok_or_else(|| NnError::MissingKey {
                key: full.clone(),
                shape: shape.to_vec(),
                source_name: self.shared.source_name.clone(),
            })?
            .clone();
        if var.value().shape() != shape {
            return Err(NnError::ShapeMismatch {
                key: full,
                expected: shape.to_vec(),
                found: var.value().shape().to_vec(),
                source_name: self.shared.source_name.clone(),
            });
        }
        let device = self.device();
        if var.value().device() != device {
            let moved = var.value().to_device(device)?;
            var = if var.requires_grad() {
                Var::parameter(moved)
            } else {
                Var::constant(moved)
            };
            vars.insert(full.clone(), var.clone());
        }
        let mut first_taken = self.shared.first_taken.lock().expect("order lock");
        if self
            .shared
            .used
            .lock()
            .expect("used-set lock")
            .insert(full.clone())
        {
            first_taken.push(full);
        }
        Ok(var)
    }

    /// The parameters (all of them, whatever the prefix) in the order layers first took them:
    /// for a model built in the order its forward pass runs, the reverse of the order in which
    /// the backward pass finishes their gradients.
    pub fn first_taken(&self) -> Vec<String> {
        self.shared.first_taken.lock().expect("order lock").clone()
    }

    /// Whether `key` is present (without marking it used).
    pub fn contains(&self, key: &str) -> bool {
        self.shared
            .vars
            .lock()
            .expect("store lock")
            .contains_key(&format!("{}{key}", self.prefix))
    }

    /// Marks `key` as deliberately ignored (e.g. a pooling head the model skips).
    pub fn skip(&self, key: &str) {
        self.shared
            .used
            .lock()
            .expect("used-set lock")
            .insert(format!("{}{key}", self.prefix));
    }

    /// Fails naming every parameter below this view's prefix that no layer took or skipped.
    pub fn check_all_used(&self) -> Result<()> {
        let used = self.shared.used.lock().expect("used-set lock");
        let vars = self.shared.vars.lock().expect("store lock");
        let keys: Vec<String> = vars
            .keys()
            .filter(|k| k.starts_with(&self.prefix) && !used.contains(*k))
            .cloned()
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        Err(NnError::UnexpectedKeys {
            keys,
            source_name: self.shared.source_name.clone(),
        })
    }

    /// The gradient gathered by each parameter below the prefix that has one, by full name.
    pub fn grads(&self) -> BTreeMap<String, Tensor> {
        let vars = self.shared.vars.lock().expect("store lock");
        vars.iter()
            .filter(|(k, _)| k.starts_with(&self.prefix))
            .filter_map(|(k, v)| v.grad().map(|g| (k.clone(), g)))
            .collect()
    }

    /// The names of the parameters below the prefix that take a gradient, by their vars' ids
    /// (see [`Var::id`]).
    pub fn names_by_var_id(&self) -> HashMap<usize, String> {
        let vars = self.shared.vars.lock().expect("store lock");
        vars.iter()
            .filter(|(k, v)| k.starts_with(&self.prefix) && v.requires_grad())
            .map(|(k, v)| (v.id(), k.clone()))
            .collect()
    }

    /// Forgets the gradient of every parameter below the prefix (before another backward pass).
    pub fn zero_grads(&self) {
        let vars = self.shared.vars.lock().expect("store lock");
        for (_, v) in vars.iter().filter(|(k, _)| k.starts_with(&self.prefix)) {
            v.zero_grad();
        }
    }

    /// Number of parameter elements below the prefix.
    pub fn numel(&self) -> usize {
        let vars = self.shared.vars.lock().expect("store lock");
        vars.iter()
            .filter(|(k, _)| k.starts_with(&self.prefix))
            .map(|(_, v)| v.value().numel())
            .sum()
    }

    /// Every parameter's current value below the prefix, by full name.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let vars = self.shared.vars.lock().expect("store lock");
        vars.iter()
            .filter(|(k, _)| k.starts_with(&self.prefix))
            .map(|(k, v)| (k.clone(), v.value().clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::ParamStore;
    use std::collections::BTreeMap;
    use tensor::{DType, Tensor};

    #[test]
    fn first_taken_keeps_the_order_of_first_use_across_scopes() {
        let tensors: BTreeMap<String, Tensor> = ["a.w", "b.w", "c.w"]
            .into_iter()
            .map(|k| (k.to_owned(), Tensor::ones(&[2], DType::F32)))
            .collect();
        let store = ParamStore::new(tensors, true, "test");
        store.scope("c.").take("w", &[2]).unwrap();
        store.take("a.w", &[2]).unwrap();
        store.skip("b.w");
        store.take("c.w", &[2]).unwrap();
        assert_eq!(store.first_taken(), vec!["c.w".to_owned(), "a.w".to_owned()]);
    }
}
