//! Reading a Hugging Face `save_pretrained` directory: `config.json` plus `model.safetensors`
//! or a sharded `model.safetensors.index.json`.

use crate::{NnError, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tensor::Tensor;

/// A parsed `config.json`, with typed accessors whose errors name the file and the key.
#[derive(Clone, Debug)]
pub struct HfConfig {
    path: PathBuf,
    value: serde_json::Value,
}

impl HfConfig {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| NnError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| NnError::Config {
            path: path.to_path_buf(),
            detail: format!("invalid JSON: {e}"),
        })?;
        if !value.is_object() {
            return Err(NnError::Config {
                path: path.to_path_buf(),
                detail: "the top level is not a JSON object".into(),
            });
        }
        Ok(HfConfig {
            path: path.to_path_buf(),
            value,
        })
    }

    /// A config from a JSON value (for models built in code); `path` names it in errors.
    pub fn from_value(path: impl Into<PathBuf>, value: serde_json::Value) -> Self {
        HfConfig {
            path: path.into(),
            value,
        }
    }

    /// The file this config came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An error about this config.
    pub fn error(&self, detail: impl Into<String>) -> NnError {
        NnError::Config {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    fn field(&self, key: &str) -> Option<&serde_json::Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.error(format!("missing integer '{key}'")))
    }

    /// An optional non-negative integer.
    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        self.field(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| self.error(format!("'{key}' is not a non-negative integer: {v}")))
            })
            .transpose()
    }

    /// An integer with a default.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    /// A number with a default.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        self.field(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.error(format!("'{key}' is not a number: {v}")))
            })
            .transpose()
            .map(|v| v.unwrap_or(default))
    }

    /// A boolean with a default.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        self.field(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.error(format!("'{key}' is not a boolean: {v}")))
            })
            .transpose()
            .map(|v| v.unwrap_or(default))
    }

    /// A string, if present.
    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.field(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.error(format!("'{key}' is not a string: {v}")))
            })
            .transpose()
    }

    /// The raw JSON value of `key`, if present.
    pub fn raw(&self, key: &str) -> Option<&serde_json::Value> {
        self.field(key)
    }

    /// `model_type`, required.
    pub fn model_type(&self) -> Result<&str> {
        self.str_opt("model_type")?
            .ok_or_else(|| self.error("missing 'model_type'"))
    }
}

/// A `save_pretrained` directory's config and tensors.
pub struct Pretrained {
    /// The directory.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: HfConfig,
    /// Every tensor of its safetensors file(s), by name.
    pub tensors: BTreeMap<String, Tensor>,
}

/// Loads `dir/config.json` and `dir/model.safetensors`, or the shards listed by
/// `dir/model.safetensors.index.json`.
pub fn load_pretrained(dir: &Path) -> Result<Pretrained> {
    if !dir.is_dir() {
        return Err(NnError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a model directory"),
        });
    }
    let config = HfConfig::read(&dir.join("config.json"))?;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let tensors = if single.is_file() {
        tensor::safetensors::load(&single)?
    } else if index.is_file() {
        load_sharded(dir, &index)?
    } else {
        return Err(NnError::Io {
            path: single,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors or model.safetensors.index.json in the directory",
            ),
        });
    };
    Ok(Pretrained {
        dir: dir.to_path_buf(),
        config,
        tensors,
    })
}

/// Reads every shard named by an index's `weight_map` and checks each listed tensor is in its shard.
fn load_sharded(dir: &Path, index: &Path) -> Result<BTreeMap<String, Tensor>> {
    let cfg = HfConfig::read(index)?;
    let map = cfg
        .raw("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| cfg.error("missing object 'weight_map'"))?;
    let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| cfg.error(format!("shard of '{name}' is not a string")))?;
        by_shard.entry(shard).or_default().push(name);
    }
    let mut tensors = BTreeMap::new();
    for (shard, names) in by_shard {
        let path = crate::paths::inside(dir, shard)
            .map_err(|reason| cfg.error(format!("shard of '{}': {reason}", names[0])))?;
        let file = tensor::safetensors::SafetensorsFile::open(&path)?;
        for name in names {
            tensors.insert(name.to_string(), file.get(name)?);
        }
    }
    Ok(tensors)
}
