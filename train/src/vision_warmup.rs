//! The vision warm-up (`--vision-warmup N`; the tiny preset's default on easy-VQA): before the
//! LM sees an image, the two towers are trained as an image classifier on the training images'
//! own labels (easy-VQA: colour and shape, read from their questions). The projector maps each
//! patch to a token, and a linear read-out per label set sees the mean of the tokens. Afterwards
//! the towers keep what they learned (and are frozen for the run, unless `--train-vision`); the
//! read-outs are thrown away and the projector starts again from its initial weights, as it
//! does on the paper's pretrained towers.
//!
//! A stand-in for the paper's *pretrained* towers for the tiny preset, whose towers start
//! random: through a random Mamba LM the answer's gradient teaches them shape only over
//! thousands of steps. What it does to the whole model is in the README (easy-VQA).

use crate::data::LabelledImages;
use crate::error::{Result, TrainError};
use emma::config::EmmaConfig;
use emma::image::pixels_for_both;
use emma::model::Emma;
use indicatif::{ProgressBar, ProgressStyle};
use nn::{AdamW, AdamWConfig, Linear, ParamStore};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::collections::BTreeMap;
use tensor::{DType, Device, Tensor};

/// Images per warm-up step.
pub const WARMUP_BATCH: usize = 32;

/// What the warm-up did, for the log.
pub struct WarmupSummary {
    /// Optimizer steps taken.
    pub steps: usize,
    /// The summed read-out loss of the last step.
    pub last_loss: f64,
    /// Per label set, the read-out's accuracy on the training images of the last
    /// [`ACCURACY_WINDOW`] steps (before each step's update).
    pub accuracy: Vec<(String, f64)>,
}

/// Steps over which [`WarmupSummary::accuracy`] is counted.
pub const ACCURACY_WINDOW: usize = 100;

/// Whether the warm-up's result is kept for a parameter: the vision towers'.
pub fn warms_up(name: &str) -> bool {
    name.starts_with("vision.")
}

/// Whether a parameter is trained during the warm-up: the towers' and the projector's.
fn trained_in_warmup(name: &str) -> bool {
    warms_up(name) || name.starts_with("projector.")
}

/// Trains the vision towers in `params` for `steps` steps of [`WARMUP_BATCH`] images drawn
/// (seeded by `seed`) from `images`, at the constant learning rate `lr` with AdamW, on `device`.
/// Returns `params` with the towers replaced; every other tensor is untouched.
pub fn warm_up_vision(
    cfg: &EmmaConfig,
    mut params: BTreeMap<String, Tensor>,
    images: &LabelledImages,
    steps: usize,
    (lr, weight_decay): (f64, f64),
    seed: u64,
    device: Device,
) -> Result<(BTreeMap<String, Tensor>, WarmupSummary)> {
    if images.images.is_empty() {
        return Err(TrainError::Options(
            "--vision-warmup: the training data has no labelled images".into(),
        ));
    }
    let pixels: Vec<(Tensor, Tensor)> = images
        .images
        .par_iter()
        .map(|(img, _)| {
            let (s, d) = pixels_for_both(img, cfg.vision.image_size)?;
            Ok((s.unsqueeze(0)?, d.unsqueeze(0)?))
        })
        .collect::<Result<_>>()?;
    // The warm-up is the towers' pre-training: they learn here even when the run after it
    // freezes them (`--freeze-vision`: frozen warmed-up towers, as the paper's pretrained ones).
    let mut warmup_cfg = cfg.clone();
    warmup_cfg.vision.frozen = false;
    let heads_init = ParamStore::random(tensor::seeded_rng(seed ^ 0x5eed), DType::F32, true, "read-outs");
    for (task, classes) in &images.tasks {
        Linear::new(&heads_init, task, cfg.lm.hidden, classes.len(), true)?;
    }
    let mut trained: BTreeMap<String, Tensor> = params
        .iter()
        .filter(|(k, _)| trained_in_warmup(k))
        .map(|(k, t)| (k.clone(), t.clone()))
        .chain(
            heads_init
                .tensors()
                .into_iter()
                .map(|(k, t)| (format!("readout.{k}"), t)),
        )
        .collect();
    let frozen: BTreeMap<String, Tensor> = params
        .iter()
        .filter(|(k, _)| !trained_in_warmup(k))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    let mut opt = AdamW::new(AdamWConfig {
        lr,
        weight_decay,
        ..AdamWConfig::default()
    });
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] vision warm-up {pos}/{len} {msg}")
            .map_err(|e| TrainError::Options(e.to_string()))?
            .progress_chars("=> "),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut last_loss = f64::NAN;
    let mut counts = vec![(0usize, 0usize); images.tasks.len()];
    for step in 1..=steps {
        let picks: Vec<usize> = (0..WARMUP_BATCH)
            .map(|_| rng.gen_range(0..images.images.len()))
            .collect();
        let (model_part, readouts): (BTreeMap<_, _>, BTreeMap<_, _>) = trained
            .clone()
            .into_iter()
            .partition(|(k, _)| !k.starts_with("readout."));
        let weights: BTreeMap<String, Tensor> = frozen
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .chain(model_part)
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect::<Result<_>>()?;
        let model_store = ParamStore::new(weights, true, "warm-up");
        model_store.set_device(device);
        let head_store = ParamStore::new(
            readouts
                .into_iter()
                .map(|(k, t)| Ok((k["readout.".len()..].to_string(), t.to_device(device)?)))
                .collect::<Result<_>>()?,
            true,
            "read-outs",
        );
        let model = Emma::new(&warmup_cfg, model_store.clone())?;
        let cat = |pick: fn(&(Tensor, Tensor)) -> &Tensor| {
            Tensor::concat(&picks.iter().map(|&i| pick(&pixels[i])).collect::<Vec<_>>(), 0)
        };
        let tokens = model.image_tokens(&cat(|p| &p.0)?, &cat(|p| &p.1)?)?;
        let pooled = tokens.mean(&[1], false)?;
        let mut loss: Option<autograd::Var> = None;
        for (t, (task, classes)) in images.tasks.iter().enumerate() {
            let labels: Vec<u32> = picks
                .iter()
                .map(|&i| images.images[i].1[t].map_or(u32::MAX, |c| c as u32))
                .collect();
            if labels.iter().all(|&l| l == u32::MAX) {
                continue;
            }
            let head = Linear::new(&head_store, task, cfg.lm.hidden, classes.len(), true)?;
            let y = Tensor::from_vec(labels.clone(), &[picks.len()])?.to_device(device)?;
            let logits = head.forward(&pooled)?;
            if step + ACCURACY_WINDOW > steps {
                let rows = logits.value().to_vec_f64();
                for (row, &label) in rows.chunks(classes.len()).zip(&labels) {
                    if label != u32::MAX {
                        let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]));
                        counts[t].0 += usize::from(best == Some(label as usize));
                        counts[t].1 += 1;
                    }
                }
            }
            let term = logits.cross_entropy(&y, u32::MAX)?;
            loss = Some(match loss {
                Some(l) => l.add(&term)?,
                None => term,
            });
        }
        let Some(loss) = loss else { continue };
        last_loss = loss.value().to_scalar_f64()?;
        if !last_loss.is_finite() {
            return Err(TrainError::Options(format!(
                "vision warm-up step {step}: the read-out loss is {last_loss}; lower --lr"
            )));
        }
        loss.backward()?;
        let grads: BTreeMap<String, Tensor> = model_store
            .grads()
            .into_iter()
            .filter(|(k, _)| trained_in_warmup(k))
            .chain(
                head_store
                    .grads()
                    .into_iter()
                    .map(|(k, g)| (format!("readout.{k}"), g)),
            )
            .map(|(k, g)| Ok((k, g.to_device(Device::Cpu)?)))
            .collect::<Result<_>>()?;
        opt.step(&mut trained, &grads)?;
        bar.set_position(step as u64);
        bar.set_message(format!("loss {last_loss:.3}"));
    }
    bar.finish_and_clear();
    for (k, t) in trained {
        if warms_up(&k) {
            params.insert(k, t);
        }
    }
    let accuracy = images
        .tasks
        .iter()
        .zip(counts)
        .map(|((task, _), (right, all))| (task.clone(), right as f64 / all.max(1) as f64))
        .collect();
    Ok((
        params,
        WarmupSummary {
            steps,
            last_loss,
            accuracy,
        },
    ))
}
