//! The work behind each `emma` subcommand, as functions that tests can call directly.

use anyhow::{bail, Context};
use nn::{load_pretrained, Dinov2, MambaLm, ParamStore, Pretrained, SiglipHead, SiglipVision};
use std::collections::BTreeMap;
use std::path::Path;
use tensor::{DType, Tensor};

fn load(dir: &Path, trainable: bool) -> anyhow::Result<(Pretrained, ParamStore)> {
    let mut pre = load_pretrained(dir).with_context(|| format!("loading model {}", dir.display()))?;
    let tensors = std::mem::take(&mut pre.tensors)
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<tensor::Result<BTreeMap<_, _>>>()?;
    let store = ParamStore::new(tensors, trainable, dir.display().to_string());
    Ok((pre, store))
}

fn ids_tensor(ids: &[u32]) -> anyhow::Result<Tensor> {
    if ids.is_empty() {
        bail!("--ids is empty");
    }
    Ok(Tensor::from_slice(ids, &[1, ids.len()])?)
}

/// Logits `[T, vocab]` (f32) of a Mamba/Mamba-2 LM over one sequence of token ids.
pub fn logits(model_dir: &Path, ids: &[u32]) -> anyhow::Result<Tensor> {
    let (pre, store) = load(model_dir, false)?;
    let lm = MambaLm::new(&pre.config, &store)?;
    let logits = lm.forward(&ids_tensor(ids)?)?;
    let v = logits.value();
    Ok(v.reshape(&v.shape()[1..])?)
}

/// Mean next-token cross-entropy over the sequence (position t predicts ids[t+1]) and the
/// gradient of every parameter by its Hugging Face name (f32).
pub fn grads(model_dir: &Path, ids: &[u32]) -> anyhow::Result<(f64, BTreeMap<String, Tensor>)> {
    if ids.len() < 2 {
        bail!("--ids needs at least two tokens to predict one from the other");
    }
    let (pre, store) = load(model_dir, true)?;
    let lm = MambaLm::new(&pre.config, &store)?;
    let logits = lm.forward(&ids_tensor(ids)?)?;
    let t = ids.len();
    let vocab = logits.value().dim(2);
    let inputs = logits.reshape(&[t, vocab])?.narrow(0, 0, t - 1)?;
    let targets = Tensor::from_slice(&ids[1..], &[t - 1])?;
    let loss = inputs.cross_entropy(&targets, u32::MAX)?;
    loss.backward()?;
    Ok((loss.value().to_scalar_f64()?, store.grads()))
}

/// `last_hidden_state` and `penultimate_hidden_state` of a SigLIP or DINOv2 encoder.
pub fn vision(model_dir: &Path, pixels: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
    let (pre, store) = load(model_dir, false)?;
    let pixels = pixels.to_dtype(DType::F32)?;
    let out = match pre.config.model_type()? {
        "siglip" | "siglip_vision_model" => SiglipVision::new(&pre.config, &store, SiglipHead::Skip)?.forward(&pixels)?,
        "dinov2" | "dinov2_with_registers" => Dinov2::new(&pre.config, &store)?.forward(&pixels)?,
        other => bail!(
            "{}: model_type '{other}' is not a vision encoder (siglip, siglip_vision_model, dinov2, dinov2_with_registers)",
            pre.config.path().display()
        ),
    };
    Ok((
        out.last_hidden_state.value().clone(),
        out.penultimate().value().clone(),
    ))
}

/// Reads tensor `name` from a safetensors file.
pub fn read_tensor(path: &Path, name: &str) -> anyhow::Result<Tensor> {
    Ok(tensor::safetensors::SafetensorsFile::open(path)?.get(name)?)
}

/// Writes named tensors to a safetensors file atomically.
pub fn write_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> anyhow::Result<()> {
    tensor::safetensors::save(path, tensors, None)?;
    Ok(())
}
