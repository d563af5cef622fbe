//! Saving and loading whole EMMA models: `config.json` (the `EmmaConfig`) and
//! `model.safetensors` with every parameter under its component prefix and Hugging Face name
//! (`vision.siglip.`, `vision.dinov2.`, `projector.`, `lm.`, `alignment.`). Pretrained towers and
//! LMs can also be taken from their own Hugging Face directories.

use crate::config::EmmaConfig;
use crate::model::Emma;
use anyhow::Context;
use nn::ParamStore;
use std::collections::BTreeMap;
use std::path::Path;
use tensor::{DType, Device, Tensor};

/// The file name of the tokenizer saved beside a model (by the trainer), which `emma generate`
/// picks up.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Writes `model` to `dir` (created if needed): both files atomically (temporary file, fsync,
/// rename), the tensors in f32.
pub fn save(model: &Emma, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tensors = model
        .store()
        .tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<tensor::Result<BTreeMap<_, _>>>()?;
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    tensor::safetensors::save(dir.join("model.safetensors"), &named, None)?;
    let json = serde_json::to_string_pretty(model.config())?;
    Ok(crate::fsutil::write_atomic(
        &dir.join("config.json"),
        json.as_bytes(),
    )?)
}

/// Reads the `EmmaConfig` of a saved model directory.
pub fn load_config(dir: &Path) -> anyhow::Result<EmmaConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not an EMMA config", path.display()))
}

/// Loads a model saved by [`save`] onto `device`; every parameter must be present with its
/// shape and none may be left over.
pub fn load(dir: &Path, trainable: bool, device: Device) -> anyhow::Result<Emma> {
    let cfg = load_config(dir)?;
    let file = dir.join("model.safetensors");
    let tensors = tensor::safetensors::load(&file)?;
    let store = ParamStore::new(tensors, trainable, file.display().to_string());
    store.set_device(device);
    Emma::new(&cfg, store).with_context(|| format!("building EMMA from {}", dir.display()))
}

/// Where pretrained components come from: Hugging Face `save_pretrained` directories.
#[derive(Default)]
pub struct Pretrained<'a> {
    /// A `siglip_vision_model` (or `siglip`) directory.
    pub siglip: Option<&'a Path>,
    /// A `dinov2` / `dinov2_with_registers` directory.
    pub dinov2: Option<&'a Path>,
    /// A `mamba` / `mamba2` directory.
    pub lm: Option<&'a Path>,
}

/// A model of `cfg` whose towers and LM come from Hugging Face directories where given; every
/// other parameter is freshly initialised from `seed`.
pub fn from_pretrained_parts(
    cfg: &EmmaConfig,
    parts: &Pretrained,
    seed: u64,
    trainable: bool,
) -> anyhow::Result<Emma> {
    let store = ParamStore::random(
        tensor::seeded_rng(seed),
        DType::F32,
        trainable,
        format!("EMMA {}", cfg.name),
    );
    for (prefix, dir) in [
        ("vision.siglip.", parts.siglip),
        ("vision.dinov2.", parts.dinov2),
        ("lm.", parts.lm),
    ] {
        let Some(dir) = dir else { continue };
        let pre = nn::load_pretrained(dir)?;
        let scoped = store.scope(prefix);
        for (name, t) in pre.tensors {
            scoped.insert(&name, t.to_dtype(DType::F32)?);
        }
    }
    Ok(Emma::new(cfg, store)?)
}
