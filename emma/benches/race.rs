//! emma-rs's side of the CPU race against PyTorch (`scripts/race_pytorch.py` drives both sides).
//!
//! `race --work DIR --case NAME [--rounds N]` loads the model folder the script wrote
//! (`DIR/mamba1`, `DIR/mamba2`, `DIR/siglip`, `DIR/dinov2`) and the inputs
//! (`DIR/inputs.safetensors`), runs the case once to warm up, times `N` rounds, writes its output
//! to `DIR/out/NAME.ours.safetensors` and prints one JSON line: the best time in ms, the peak
//! resident memory of the process in MB, and the resident memory once the model was loaded.
//!
//! Cases: `{mamba1,mamba2}-forward[-backward]-{512,1024}` (token ids, batch 1; the backward is
//! the mean next-token cross-entropy, as transformers computes it from `labels`) and
//! `{siglip,dinov2}-forward[-backward]-b32` (pixels, batch 32; the backward is of
//! `sum(last_hidden_state * weights)`, the weights random and given as `<model>_weights`). A forward writes `out` (logits `[T, vocab]` or the last hidden
//! state); a backward writes `loss` and `grad`, the gradient of the first layer's input
//! projection.
//!
//! `tiny-emma-train-step-b32` is one training step of the `tiny` preset as `train` takes it
//! (the model built over the current weights, losses, backward, AdamW), on the weights and batch
//! in `DIR/tiny-emma` (written by the script's twin, `scripts/race_tiny_emma.py`). It writes the
//! first step's losses (`loss`, `text_loss`, `pixel_loss`) and two of its gradients (`grad`:
//! `projector.fc1.weight`; `grad_decoder`: the pixel decoder's first Mamba-2 input projection).

use anyhow::{bail, Context};
use autograd::Var;
use emma::config::EmmaConfig;
use emma::model::{Batch, Emma};
use nn::{AdamW, AdamWConfig, Dinov2, MambaLm, ParamStore, SiglipHead, SiglipVision};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tensor::{Device, Tensor};

/// What one case runs.
struct Case {
    model: String,
    backward: bool,
    input: String,
}

/// Parses a case name into its model folder, pass and input tensor name.
fn parse_case(name: &str) -> anyhow::Result<Case> {
    let (model, rest) = name
        .split_once('-')
        .with_context(|| format!("case '{name}' has no model prefix"))?;
    let (backward, size) = if let Some(size) = rest.strip_prefix("forward-backward-") {
        (true, size)
    } else if let Some(size) = rest.strip_prefix("forward-") {
        (false, size)
    } else {
        bail!("case '{name}': expected <model>-forward-<size> or <model>-forward-backward-<size>");
    };
    let input = match (model, size) {
        ("mamba1" | "mamba2", "512" | "1024") => format!("ids_{size}"),
        ("siglip" | "dinov2", "b32") => "pixels".to_string(),
        _ => bail!("unknown case '{name}' (models mamba1, mamba2 at 512 or 1024; siglip, dinov2 at b32)"),
    };
    Ok(Case {
        model: model.to_string(),
        backward,
        input,
    })
}

/// A field of `/proc/self/status` in MB (`VmHWM`: peak resident, `VmRSS`: current).
fn status_mb(field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("malformed {field} line"))?
        .parse()?;
    Ok(kb / 1024.0)
}

/// The model of a case, built once; `run` does one forward (or forward + backward).
enum Model {
    Lm(MambaLm),
    Siglip(SiglipVision),
    Dinov2(Dinov2),
}

impl Model {
    /// The output (`out`) of a forward, or the loss and the store's gradients after a backward.
    fn run(
        &self,
        x: &Tensor,
        weights: Option<&Tensor>,
        backward: bool,
        store: &ParamStore,
    ) -> anyhow::Result<Vec<(String, Tensor)>> {
        if backward {
            store.zero_grads();
        }
        let out = match self {
            Model::Lm(lm) => lm.forward(x)?,
            Model::Siglip(s) => s.forward(x)?.last_hidden_state,
            Model::Dinov2(d) => d.forward(x)?.last_hidden_state,
        };
        if !backward {
            let v = out.value();
            let v = if matches!(self, Model::Lm(_)) {
                v.reshape(&v.shape()[1..])?
            } else {
                v.clone()
            };
            return Ok(vec![("out".into(), v)]);
        }
        let loss = match self {
            Model::Lm(_) => {
                let (t, vocab) = (out.value().dim(1), out.value().dim(2));
                let targets = x.reshape(&[t])?.narrow(0, 1, t - 1)?.contiguous();
                out.reshape(&[t, vocab])?
                    .narrow(0, 0, t - 1)?
                    .cross_entropy(&targets, u32::MAX)?
            }
            _ => {
                let weights = weights.context("a tower's backward needs its <model>_weights input")?;
                out.mul(&Var::constant(weights.clone()))?.sum_all()?
            }
        };
        loss.backward()?;
        Ok(vec![("loss".into(), loss.value().clone())])
    }
}

/// The first layer's input projection, whose gradient both sides write (the end of its name:
/// a SigLIP checkpoint may or may not prefix it with `vision_model.`).
fn first_weight(model: &str) -> &'static str {
    match model {
        "siglip" => "encoder.layers.0.self_attn.q_proj.weight",
        "dinov2" => "encoder.layer.0.attention.attention.query.weight",
        _ => "backbone.layers.0.mixer.in_proj.weight",
    }
}

fn main() -> anyhow::Result<()> {
    tensor::host_memory::keep_freed_memory();
    let mut work: Option<PathBuf> = None;
    let (mut case, mut rounds) = (None, 3usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--work" => work = args.next().map(PathBuf::from),
            "--case" => case = args.next(),
            "--rounds" => rounds = args.next().context("--rounds needs a number")?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument '{other}' (race --work DIR --case NAME [--rounds N])"),
        }
    }
    let (Some(work), Some(name)) = (work, case) else {
        bail!("usage: race --work DIR --case NAME [--rounds N] (scripts/race_pytorch.py runs it)");
    };
    if name == TINY_EMMA_CASE {
        return tiny_emma_train_step(&work, rounds);
    }
    let case = parse_case(&name)?;
    let backward = case.backward;
    let (pre, store) = emma::commands::load(&work.join(&case.model), backward, Device::Cpu)?;
    let model = match case.model.as_str() {
        "siglip" => Model::Siglip(SiglipVision::new(&pre.config, &store, SiglipHead::Skip)?),
        "dinov2" => Model::Dinov2(Dinov2::new(&pre.config, &store)?),
        _ => Model::Lm(MambaLm::new(&pre.config, &store)?),
    };
    let inputs = tensor::safetensors::load(work.join("inputs.safetensors"))?;
    let x = inputs
        .get(&case.input)
        .with_context(|| format!("no '{}' in inputs.safetensors", case.input))?;
    let x = if case.input.starts_with("ids") {
        x.reshape(&[1, x.numel()])?
    } else {
        x.clone()
    };
    let weights = inputs.get(&format!("{}_weights", case.model));
    touch(store.tensors().values())?;
    let loaded_mb = status_mb("VmRSS:")?;

    let mut result = model.run(&x, weights, backward, &store)?;
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let start = Instant::now();
        result = model.run(&x, weights, backward, &store)?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    if backward {
        let key = first_weight(&case.model);
        let grad = store
            .grads()
            .into_iter()
            .find_map(|(k, g)| k.ends_with(key).then_some(g))
            .with_context(|| format!("no gradient for {key}"))?;
        result.push(("grad".into(), grad));
    }
    write_outputs(
        &work.join("out").join(format!("{name}.ours.safetensors")),
        &result,
    )?;
    println!(
        "{}",
        serde_json::json!({"ms": best * 1e3, "peak_mb": status_mb("VmHWM:")?, "loaded_mb": loaded_mb})
    );
    Ok(())
}

/// The tiny EMMA case's name.
const TINY_EMMA_CASE: &str = "tiny-emma-train-step-b32";

/// The gradients the tiny EMMA case writes: (output name, parameter).
const TINY_EMMA_GRADS: [(&str, &str); 2] = [
    ("grad", "projector.fc1.weight"),
    ("grad_decoder", "alignment.decoder.blocks.0.mixer.in_proj.weight"),
];

/// Times training steps of the tiny EMMA: the first step's losses and gradients are written (both
/// sides start from the same weights), the best of `rounds` further steps is reported.
fn tiny_emma_train_step(work: &Path, rounds: usize) -> anyhow::Result<()> {
    let dir = work.join("tiny-emma");
    let read = |file: &str| {
        let path = dir.join(file);
        tensor::safetensors::load(&path).with_context(|| format!("reading {}", path.display()))
    };
    let mut params = read("model.safetensors")?;
    touch(params.values())?;
    let inputs = read("inputs.safetensors")?;
    let input = |k: &str| {
        inputs
            .get(k)
            .cloned()
            .with_context(|| format!("no '{k}' in {}", dir.join("inputs.safetensors").display()))
    };
    let batch = Batch {
        siglip_pixels: input("emma_siglip_pixels")?,
        dinov2_pixels: input("emma_dinov2_pixels")?,
        ids: input("emma_ids")?,
        labels: input("emma_labels")?,
    };
    let cfg = EmmaConfig::named("tiny")?;
    let mut opt = AdamW::new(AdamWConfig::default());
    let loaded_mb = status_mb("VmRSS:")?;
    let mut step = |params: &mut BTreeMap<String, Tensor>| -> anyhow::Result<Vec<(String, Tensor)>> {
        let store = ParamStore::new(params.clone(), true, "tiny EMMA");
        let model = Emma::new(&cfg, store.clone())?;
        let losses = model.losses(&batch)?;
        losses.total.backward()?;
        let grads = store.grads();
        opt.step(params, &grads)?;
        let pixel = losses.pixel.context("the tiny preset has a pixel loss")?;
        let mut out = vec![
            ("loss".to_string(), losses.total.value().clone()),
            ("text_loss".to_string(), losses.text.value().clone()),
            ("pixel_loss".to_string(), pixel.value().clone()),
        ];
        for (name, key) in TINY_EMMA_GRADS {
            let g = grads.get(key).with_context(|| format!("no gradient for {key}"))?;
            out.push((name.to_string(), g.clone()));
        }
        Ok(out)
    };
    let first = step(&mut params)?;
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let start = Instant::now();
        step(&mut params)?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    write_outputs(
        &work
            .join("out")
            .join(format!("{TINY_EMMA_CASE}.ours.safetensors")),
        &first,
    )?;
    println!(
        "{}",
        serde_json::json!({"ms": best * 1e3, "peak_mb": status_mb("VmHWM:")?, "loaded_mb": loaded_mb})
    );
    Ok(())
}

/// Reads every tensor once: weights are memory-mapped, and this makes them count as loaded, not
/// as the work's memory.
fn touch<'a>(tensors: impl Iterator<Item = &'a Tensor>) -> anyhow::Result<()> {
    for t in tensors {
        t.sum_all()?;
    }
    Ok(())
}

/// Writes the named outputs as one safetensors file.
fn write_outputs(path: &Path, outputs: &[(String, Tensor)]) -> anyhow::Result<()> {
    let named: Vec<(&str, &Tensor)> = outputs.iter().map(|(k, t)| (k.as_str(), t)).collect();
    tensor::safetensors::save(path, &named, None).with_context(|| format!("writing {}", path.display()))
}
