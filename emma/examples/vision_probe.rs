//! Can the tiny preset's vision towers learn easy-VQA's shapes (or colours) on their own? Trains
//! the towers and the projector with a linear read-out of the image tokens (all tokens
//! flattened, or their mean with `--pool`) on the image's shape or colour, bypassing the LM,
//! and prints the accuracy on the validation images (the training split's ids >= 3500, as the
//! trainer holds them out). It separates what the vision side can learn from what reaches the
//! answer through the LM:
//!
//! `cargo run --release -p emma --example vision_probe -- --steps 1000 [--task colour]
//!  [--image-size 64 --patch 16] [--pool] [--lr 1e-3]`

use autograd::Var;
use clap::Parser;
use emma::config::EmmaConfig;
use emma::image::{load_image, pixels_for_both};
use emma::model::Emma;
use nn::{AdamW, AdamWConfig, Linear, ParamStore};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tensor::{DType, Tensor};

/// Options of the probe.
#[derive(Parser)]
struct Args {
    /// The easy-VQA data folder (with `train/questions.json` and `train/images/`).
    #[arg(long, default_value_os_t = default_data())]
    data: PathBuf,
    /// What to predict from the image: `shape` or `colour`.
    #[arg(long, default_value = "shape")]
    task: String,
    /// Optimizer steps of 32 images.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// AdamW learning rate (constant).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Image side the towers see (the tiny preset: 32).
    #[arg(long)]
    image_size: Option<usize>,
    /// Patch side (the tiny preset: 8).
    #[arg(long)]
    patch: Option<usize>,
    /// Read out the mean of the image tokens instead of all of them.
    #[arg(long)]
    pool: bool,
}

/// The trainer's cached download.
fn default_data() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cache/emma-rs/easy-vqa-1.0/data")
}

/// One image: id, class, SigLIP and DINOv2 pixels `[1, 3, S, S]`.
type Sample = (u64, u32, Tensor, Tensor);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let classes: &[&str] = match args.task.as_str() {
        "shape" => &["circle", "rectangle", "triangle"],
        "colour" => &["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"],
        other => anyhow::bail!("--task must be shape or colour, not {other:?}"),
    };
    let mut cfg = EmmaConfig::named("tiny")?;
    cfg.vision.image_size = args.image_size.unwrap_or(cfg.vision.image_size);
    cfg.vision.patch = args.patch.unwrap_or(cfg.vision.patch);
    let (size, tokens) = (cfg.vision.image_size, cfg.vision.grid() * cfg.vision.grid());
    let train_dir = args.data.join("train");
    let questions = train_dir.join("questions.json");
    let text =
        std::fs::read_to_string(&questions).map_err(|e| anyhow::anyhow!("{}: {e}", questions.display()))?;
    let raw: Vec<(String, String, u64)> = serde_json::from_str(&text)?;
    // Every image has one shape and one colour; an answer naming a class labels its image.
    let labels: BTreeMap<u64, u32> = raw
        .iter()
        .filter_map(|(_, a, id)| classes.iter().position(|c| c == a).map(|i| (*id, i as u32)))
        .collect();
    let samples: Vec<Sample> = labels
        .iter()
        .map(|(&id, &class)| {
            let img = load_image(train_dir.join("images").join(format!("{id}.png")))?;
            let (s, d) = pixels_for_both(&img, size)?;
            Ok((id, class, s.unsqueeze(0)?, d.unsqueeze(0)?))
        })
        .collect::<anyhow::Result<_>>()?;
    let (train, val): (Vec<&Sample>, Vec<&Sample>) = samples.iter().partition(|s| s.0 < 3500);

    let features = if args.pool {
        cfg.lm.hidden
    } else {
        tokens * cfg.lm.hidden
    };
    let mut params = Emma::random(&cfg, 0, DType::F32, true)?.store().tensors();
    let head_store = ParamStore::random(tensor::seeded_rng(1), DType::F32, true, "read-out");
    Linear::new(&head_store, "head", features, classes.len(), true)?;
    params.extend(head_store.tensors());
    // Logits of a batch, with the stores whose gradients the backward pass fills.
    let forward =
        |params: &BTreeMap<String, Tensor>, batch: &[&Sample]| -> anyhow::Result<(Var, [ParamStore; 2])> {
            let (head, model): (BTreeMap<_, _>, BTreeMap<_, _>) = params
                .clone()
                .into_iter()
                .partition(|(k, _)| k.starts_with("head."));
            let (model, head) = (
                ParamStore::new(model, true, "model"),
                ParamStore::new(head, true, "read-out"),
            );
            let emma = Emma::new(&cfg, model.clone())?;
            let readout = Linear::new(&head, "head", features, classes.len(), true)?;
            let pixels = |pick: fn(&Sample) -> &Tensor| {
                Tensor::concat(&batch.iter().map(|s| pick(s)).collect::<Vec<_>>(), 0)
            };
            let image = emma.image_tokens(&pixels(|s| &s.2)?, &pixels(|s| &s.3)?)?;
            let x = if args.pool {
                image.mean(&[1], false)?
            } else {
                image.reshape(&[batch.len(), features])?
            };
            Ok((readout.forward(&x)?, [model, head]))
        };

    let mut opt = AdamW::new(AdamWConfig {
        lr: args.lr,
        weight_decay: 0.01,
        ..AdamWConfig::default()
    });
    let mut rng = tensor::seeded_rng(2);
    for step in 1..=args.steps {
        let picks = Tensor::rand_uniform(&[32], DType::F64, 0.0, train.len() as f64, &mut rng)?.to_vec_f64();
        let batch: Vec<&Sample> = picks
            .iter()
            .map(|&u| train[(u as usize).min(train.len() - 1)])
            .collect();
        let (logits, stores) = forward(&params, &batch)?;
        let y = Tensor::from_vec(batch.iter().map(|s| s.1).collect::<Vec<u32>>(), &[batch.len()])?;
        let loss = logits.cross_entropy(&y, u32::MAX)?;
        loss.backward()?;
        let grads: BTreeMap<String, Tensor> = stores.iter().flat_map(|s| s.grads()).collect();
        opt.step(&mut params, &grads)?;
        if step % 100 == 0 || step == args.steps {
            println!("step {step}: loss {:.4}", loss.value().to_scalar_f64()?);
        }
    }
    let mut correct = 0;
    for chunk in val.chunks(64) {
        let (logits, _) = forward(&params, chunk)?;
        let v = logits.value().to_vec_f64();
        for (row, s) in v.chunks(classes.len()).zip(chunk) {
            let best = (0..classes.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap_or(0);
            correct += usize::from(best as u32 == s.1);
        }
    }
    println!(
        "{} read-out of {} images ({size}x{size}, {}x{} patches, {} tokens{}), {} steps: {correct}/{} = {:.1}%",
        args.task,
        train.len(),
        cfg.vision.patch,
        cfg.vision.patch,
        tokens,
        if args.pool { ", mean-pooled" } else { "" },
        args.steps,
        val.len(),
        100.0 * correct as f64 / val.len() as f64
    );
    Ok(())
}
