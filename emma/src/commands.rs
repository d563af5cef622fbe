//! The work behind each `emma` subcommand, as functions that tests can call directly.

use anyhow::{bail, Context};
use nn::{load_pretrained, Dinov2, MambaLm, ParamStore, Pretrained, SiglipHead, SiglipVision};
use std::collections::BTreeMap;
use std::path::Path;
use tensor::{DType, Device, Tensor};

use crate::config::EmmaConfig;
use crate::generate::{generate, GenerateOptions};
use crate::model::Emma;
use crate::prompt::Conversation;
use crate::sampling::Sampling;
use crate::tokenizer::Tokenizer;

/// A Hugging Face model directory's config and its parameters (f32) in a store on `device`.
pub fn load(dir: &Path, trainable: bool, device: Device) -> anyhow::Result<(Pretrained, ParamStore)> {
    let mut pre = load_pretrained(dir).with_context(|| format!("loading model {}", dir.display()))?;
    let tensors = std::mem::take(&mut pre.tensors)
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<tensor::Result<BTreeMap<_, _>>>()?;
    let store = ParamStore::new(tensors, trainable, dir.display().to_string());
    store.set_device(device);
    Ok((pre, store))
}

/// The ids as a `[1, T]` tensor on `device`.
fn ids_tensor(ids: &[u32], device: Device) -> anyhow::Result<Tensor> {
    if ids.is_empty() {
        bail!("--ids is empty");
    }
    Ok(Tensor::from_slice(ids, &[1, ids.len()])?.to_device(device)?)
}

/// Logits `[T, vocab]` (f32, on `device`) of a Mamba/Mamba-2 LM run on `device` over one
/// sequence of token ids.
pub fn logits(model_dir: &Path, ids: &[u32], device: Device) -> anyhow::Result<Tensor> {
    let (pre, store) = load(model_dir, false, device)?;
    let lm = MambaLm::new(&pre.config, &store)?;
    let logits = lm.forward(&ids_tensor(ids, device)?)?;
    let v = logits.value();
    Ok(v.reshape(&v.shape()[1..])?)
}

/// Mean next-token cross-entropy over the sequence (position t predicts ids[t+1]) and the
/// gradient of every parameter by its Hugging Face name (f32, on `device`, where it ran).
pub fn grads(
    model_dir: &Path,
    ids: &[u32],
    device: Device,
) -> anyhow::Result<(f64, BTreeMap<String, Tensor>)> {
    if ids.len() < 2 {
        bail!("--ids needs at least two tokens to predict one from the other");
    }
    let (pre, store) = load(model_dir, true, device)?;
    let lm = MambaLm::new(&pre.config, &store)?;
    let logits = lm.forward(&ids_tensor(ids, device)?)?;
    let t = ids.len();
    let vocab = logits.value().dim(2);
    let inputs = logits.reshape(&[t, vocab])?.narrow(0, 0, t - 1)?;
    let targets = Tensor::from_slice(&ids[1..], &[t - 1])?.to_device(device)?;
    let loss = inputs.cross_entropy(&targets, u32::MAX)?;
    loss.backward()?;
    Ok((loss.value().to_scalar_f64()?, store.grads()))
}

/// `last_hidden_state` and `penultimate_hidden_state` of a SigLIP or DINOv2 encoder run on
/// `device` (the outputs stay there).
pub fn vision(model_dir: &Path, pixels: &Tensor, device: Device) -> anyhow::Result<(Tensor, Tensor)> {
    let (pre, store) = load(model_dir, false, device)?;
    if !pixels.dtype().is_float() {
        bail!(
            "pixel_values is {:?}; pixels must be a float tensor",
            pixels.dtype()
        );
    }
    let shape = pixels.shape().to_vec();
    if shape.len() != 4 || shape[1] != 3 {
        bail!("pixel_values has shape {shape:?}; expected [batch, 3, height, width]");
    }
    let patch = pre.config.usize("patch_size")?;
    let (h, w) = (shape[2], shape[3]);
    if h < patch || w < patch {
        bail!("pixel_values is {h}x{w}, smaller than one {patch}x{patch} patch");
    }
    if h % patch != 0 || w % patch != 0 {
        eprintln!(
            "note: pixel_values is {h}x{w}, not a multiple of the {patch}-pixel patches: the last {} \
             rows and {} columns are not seen",
            h % patch,
            w % patch
        );
    }
    let pixels = pixels.to_dtype(DType::F32)?.to_device(device)?;
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

/// Refuses an output path that would overwrite one of the inputs: an input file itself, or an
/// existing file inside an input directory (a model's own `model.safetensors`, say). Links are
/// followed; an output that does not exist yet outside the inputs is fine.
pub fn check_output(out: &Path, inputs: &[&Path]) -> anyhow::Result<()> {
    // An output that does not exist yet cannot be an existing input.
    let Ok(resolved) = out.canonicalize() else {
        return Ok(());
    };
    for input in inputs {
        let Ok(real) = input.canonicalize() else {
            continue;
        };
        if real == resolved {
            bail!(
                "--out {} is the input {}; refusing to overwrite it",
                out.display(),
                input.display()
            );
        }
        if real.is_dir() && resolved.starts_with(&real) {
            bail!(
                "--out {} is a file of the input directory {}; refusing to overwrite it",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// Writes named tensors to a safetensors file atomically.
pub fn write_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> anyhow::Result<()> {
    tensor::safetensors::save(path, tensors, None)?;
    Ok(())
}

/// Where `emma generate` takes its model from.
pub enum ModelSource<'a> {
    /// A directory written by [`crate::checkpoint::save`] (or by the trainer).
    Dir(&'a Path),
    /// A preset with random weights drawn from `seed`.
    Preset {
        /// The preset's name (see [`crate::config::PRESETS`]).
        name: &'a str,
        /// The seed of the random weights.
        seed: u64,
    },
}

/// The model of `source` on `device`, frozen (inference builds no graph).
pub fn load_model(source: &ModelSource, device: Device) -> anyhow::Result<Emma> {
    match *source {
        ModelSource::Dir(dir) => crate::checkpoint::load(dir, false, device),
        ModelSource::Preset { name, seed } => {
            let cfg = EmmaConfig::named(name)?;
            Ok(Emma::random_on(&cfg, seed, DType::F32, false, device)?)
        }
    }
}

/// The tokenizer of a model: `explicit` when given, else the `tokenizer.json` saved beside a
/// model directory, else the built-in tokenizer trained for `vocab` tokens. The second value says
/// which, for the user.
pub fn tokenizer_for(
    source: &ModelSource,
    explicit: Option<&Path>,
    vocab: usize,
) -> anyhow::Result<(Tokenizer, String)> {
    let saved = match *source {
        ModelSource::Dir(dir) => Some(dir.join(crate::checkpoint::TOKENIZER_FILE)).filter(|p| p.exists()),
        ModelSource::Preset { .. } => None,
    };
    if let Some(path) = explicit.map(Path::to_path_buf).or(saved) {
        let tok = Tokenizer::from_file(&path)?;
        return Ok((tok, format!("tokenizer {}", path.display())));
    }
    let tok = Tokenizer::train_builtin(vocab)?;
    let note = format!(
        "built-in tokenizer ({} tokens); pass --tokenizer for a model trained with another",
        tok.vocab_size()
    );
    Ok((tok, note))
}

/// Layers drawn by default: all of a `depth`-layer LM up to 8, else 8 spread evenly over it
/// with the last included.
pub fn default_layers(depth: usize) -> Vec<usize> {
    let n = depth.min(8);
    (0..n)
        .map(|i| {
            if n == 1 {
                depth - 1
            } else {
                i * (depth - 1) / (n - 1)
            }
        })
        .collect()
}

/// One model's row of `emma visualize`: loads the model in `dir`, answers `prompt` about
/// `image` greedily, and measures its image tokens' norms after `layers` (default:
/// [`default_layers`]). Errors name the model directory.
pub fn visualize_row(
    dir: &Path,
    image: &image::RgbImage,
    prompt: &str,
    layers: Option<&[usize]>,
    max_new_tokens: usize,
    tokenizer: Option<&Path>,
    device: Device,
) -> anyhow::Result<crate::visualize::ModelMaps> {
    let source = ModelSource::Dir(dir);
    let model = load_model(&source, device).with_context(|| format!("model {}", dir.display()))?;
    let (tok, _) = tokenizer_for(&source, tokenizer, model.config().lm.vocab)?;
    let conversation = Conversation::single(prompt.to_owned(), None);
    let opts = GenerateOptions {
        max_new_tokens,
        sampling: Sampling::Greedy,
        seed: 0,
    };
    let answer = generate(&model, &tok, Some(image), &conversation, &opts)?.text;
    let layers = layers.map_or_else(|| default_layers(model.config().lm.layers), <[usize]>::to_vec);
    let ids = conversation.encode_prompt(&tok)?;
    let norms = crate::visualize::image_token_norms(&model, image, &ids, &layers)
        .with_context(|| format!("model {}", dir.display()))?;
    let name = match dir.file_name().and_then(|n| n.to_str()) {
        Some("final") | None => dir
            .canonicalize()
            .ok()
            .and_then(|d| {
                d.parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| dir.display().to_string()),
        Some(n) => n.to_owned(),
    };
    let grid = model.config().vision.image_size / model.config().vision.patch;
    Ok(crate::visualize::ModelMaps {
        name,
        answer: answer.trim().to_owned(),
        layers,
        norms,
        grid,
    })
}

#[cfg(test)]
mod tests {
    use super::check_output;

    #[test]
    fn an_output_onto_an_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("model.safetensors"), b"weights").unwrap();
        let pixels = dir.path().join("pixels.safetensors");
        std::fs::write(&pixels, b"pixels").unwrap();
        let inputs = [model.as_path(), pixels.as_path()];
        let onto_model = check_output(&model.join("model.safetensors"), &inputs).unwrap_err();
        assert!(onto_model.to_string().contains("input directory"), "{onto_model}");
        let onto_pixels = check_output(&pixels, &inputs).unwrap_err();
        assert!(onto_pixels.to_string().contains("is the input"), "{onto_pixels}");
        let via_dots = model.join("..").join("pixels.safetensors");
        assert!(check_output(&via_dots, &inputs).is_err());
        assert!(check_output(&dir.path().join("logits.safetensors"), &inputs).is_ok());
        assert!(check_output(&model.join("new.safetensors"), &inputs).is_ok());
    }
}
