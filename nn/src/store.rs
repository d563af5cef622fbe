//! `ParamStore`: a model's parameters keyed by their Hugging Face names.

use crate::{NnError, Result};
use autograd::Var;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use tensor::Tensor;

/// Named parameters. Trainable stores hand out leaf vars that gather gradients; frozen stores
/// hand out constants, so a forward pass records no graph. Layers check every name and shape
/// they need when they are built, and [`ParamStore::check_all_used`] reports names nobody took.
pub struct ParamStore {
    vars: BTreeMap<String, Var>,
    source_name: String,
    used: Mutex<BTreeSet<String>>,
}

impl ParamStore {
    /// A store over `tensors`; `source_name` (a file or directory) appears in every error.
    pub fn new(tensors: BTreeMap<String, Tensor>, trainable: bool, source_name: impl Into<String>) -> Self {
        let wrap = if trainable { Var::parameter } else { Var::constant };
        ParamStore {
            vars: tensors.into_iter().map(|(k, t)| (k, wrap(t))).collect(),
            source_name: source_name.into(),
            used: Mutex::new(BTreeSet::new()),
        }
    }

    /// Where the parameters came from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Every name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.keys().map(String::as_str)
    }

    /// The parameter `key`, which must have `shape`; marks it used.
    pub fn take(&self, key: &str, shape: &[usize]) -> Result<Var> {
        let var = self.vars.get(key).ok_or_else(|| NnError::MissingKey {
            key: key.to_string(),
            shape: shape.to_vec(),
            source_name: self.source_name.clone(),
        })?;
        if var.value().shape() != shape {
            return Err(NnError::ShapeMismatch {
                key: key.to_string(),
                expected: shape.to_vec(),
                found: var.value().shape().to_vec(),
                source_name: self.source_name.clone(),
            });
        }
        self.used.lock().expect("used-set lock").insert(key.to_string());
        Ok(var.clone())
    }

    /// Whether `key` is present (without marking it used).
    pub fn contains(&self, key: &str) -> bool {
        self.vars.contains_key(key)
    }

    /// Marks `key` as deliberately ignored (e.g. a pooling head the model skips).
    pub fn skip(&self, key: &str) {
        self.used.lock().expect("used-set lock").insert(key.to_string());
    }

    /// Fails naming every parameter that no layer took or skipped.
    pub fn check_all_used(&self) -> Result<()> {
        let used = self.used.lock().expect("used-set lock");
        let keys: Vec<String> = self.vars.keys().filter(|k| !used.contains(*k)).cloned().collect();
        if keys.is_empty() {
            return Ok(());
        }
        Err(NnError::UnexpectedKeys {
            keys,
            source_name: self.source_name.clone(),
        })
    }

    /// The gradient gathered by each parameter that has one, by name.
    pub fn grads(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .filter_map(|(k, v)| v.grad().map(|g| (k.clone(), g)))
            .collect()
    }

    /// Every parameter's current value, by name.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.value().clone()))
            .collect()
    }
}
