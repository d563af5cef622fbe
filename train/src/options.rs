//! Every training option, as command-line flags (clap) and as keys of a `--config` file (TOML or
//! JSON, keys spelled like the flags, `-` or `_`). Flags given on the command line override the
//! file. Options left unset take the defaults of the preset ([`Recipe`]).

use crate::easy_vqa::{Split, DEFAULT_VAL_IMAGES};
use crate::error::{Result, TrainError};
use emma::config::EmmaConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tensor::{DType, Device};

/// Default of `--val-questions`.
pub const DEFAULT_VAL_QUESTIONS: usize = 256;

/// How `train` trains.
#[derive(clap::Args, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainOptions {
    /// Model preset: tiny, small, emma-v1-2.8b or emma-v2-2.7b.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Training data: `easy-vqa` (fetched on first use), `shapes` (built in) or a LLaVA-format
    /// JSON file.
    #[arg(long, default_value = "easy-vqa")]
    pub data: String,
    /// An existing easy-VQA data folder (`answers.txt`, `train/`, `test/`) instead of the cached
    /// download.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// easy-VQA training images held out as the validation split (the last image ids).
    #[arg(long, default_value_t = DEFAULT_VAL_IMAGES)]
    pub val_images: usize,
    /// easy-VQA validation questions answered at every checkpoint, spread over the validation
    /// split (their accuracy goes into metrics.jsonl and loss.png; 0: none).
    #[arg(long, default_value_t = DEFAULT_VAL_QUESTIONS)]
    pub val_questions: usize,
    /// The easy-VQA split evaluated at the end: `validation` (for choosing settings) or `test`
    /// (the final report).
    #[arg(long, default_value = "test")]
    pub eval_split: String,
    /// Folder the LLaVA records' image paths are relative to (default: the JSON file's folder).
    #[arg(long)]
    pub image_folder: Option<PathBuf>,
    /// Let LLaVA image paths be absolute or lead outside the image folder (refused by default).
    #[arg(long)]
    pub images_anywhere: bool,
    /// Held-out LLaVA JSON file evaluated at the end (shapes: a held-out split is built in).
    #[arg(long)]
    pub eval_data: Option<String>,
    /// Number of shapes training examples.
    #[arg(long, default_value_t = 20_000)]
    pub shapes_train: u64,
    /// Number of held-out shapes examples (drawn from their own seeds).
    #[arg(long, default_value_t = 500)]
    pub shapes_eval: u64,
    /// Count and skip malformed records and missing or unreadable images instead of failing.
    #[arg(long)]
    pub skip_bad_samples: bool,
    /// A tokenizer.json (default: the built-in byte-level BPE for the preset's vocabulary).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A SigLIP `save_pretrained` directory to start the SigLIP tower from.
    #[arg(long)]
    pub siglip: Option<PathBuf>,
    /// A DINOv2 `save_pretrained` directory to start the DINOv2 tower from.
    #[arg(long)]
    pub dinov2: Option<PathBuf>,
    /// A Mamba / Mamba-2 `save_pretrained` directory to start the LM from.
    #[arg(long)]
    pub lm: Option<PathBuf>,
    /// Where checkpoints, metrics and the final model go (default: runs/PRESET-DATA).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Delete the checkpoints of an earlier run in --out and start over.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Optimizer steps (default: --epochs over the training data).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Passes over the training data (default: the preset's recipe).
    #[arg(long, allow_hyphen_values = true)]
    pub epochs: Option<f64>,
    /// Peak learning rate (default: the preset's recipe).
    #[arg(long, allow_hyphen_values = true)]
    pub lr: Option<f64>,
    /// Fraction of the steps spent warming up linearly.
    #[arg(long, allow_hyphen_values = true)]
    pub warmup_ratio: Option<f64>,
    /// Decoupled weight decay (not on 1-D parameters: norms and biases).
    #[arg(long, allow_hyphen_values = true)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub max_grad_norm: f64,
    /// Examples per optimizer step, over all ranks and accumulation steps.
    #[arg(long)]
    pub global_batch: Option<usize>,
    /// Examples per forward pass on each rank (default: global batch / ranks; the paper
    /// presets at most 4).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Data-parallel ranks (threads on CPU, one GPU each on CUDA).
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// f32, bf16 (weights and activations in bf16 for the passes; f32 master weights), or auto:
    /// bf16 on a GPU, f32 on the CPU.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// Text tokens kept per example.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Seed of the initial weights and of the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 250)]
    pub checkpoint_every: u64,
    /// Checkpoints kept (the newest).
    #[arg(long, default_value_t = 2)]
    pub keep: usize,
    /// Leave out multi-scale feature fusion.
    #[arg(long)]
    pub no_mff: bool,
    /// Leave out the pixel loss and its decoder (with --no-mff: the Cobra baseline).
    #[arg(long)]
    pub no_pixel_loss: bool,
    /// Weight of the pixel loss (default: the preset's).
    #[arg(long, allow_hyphen_values = true)]
    pub pixel_weight: Option<f64>,
    /// Train the vision towers (the tiny preset's default without a vision warm-up: its towers
    /// start random).
    #[arg(long)]
    pub train_vision: bool,
    /// Freeze the vision towers (the paper presets' default, as in the paper, and the default
    /// after a vision warm-up).
    #[arg(long, conflicts_with = "train_vision")]
    pub freeze_vision: bool,
    /// Begin with one pass over the open questions (colour, shape) before the epochs over all
    /// questions (easy-VQA; the tiny preset's default there).
    #[arg(long)]
    pub open_first: bool,
    /// Train on all questions from the first step.
    #[arg(long, conflicts_with = "open_first")]
    pub no_open_first: bool,
    /// The question types of the open-question pass, comma-separated (`colour`, `shape`)
    #[arg(long, default_value = "shape", value_delimiter = ',')]
    pub open_first_kinds: Vec<String>,
    /// Steps of a vision warm-up before training: the vision towers learn labels of the training
    /// images with a read-out, then stay frozen unless --train-vision (easy-VQA only; default:
    /// the preset's, tiny 2500, others 0: none)
    #[arg(long)]
    pub vision_warmup: Option<usize>,
    /// Learning rate of the vision warm-up (constant; default: the preset's, tiny 2e-3)
    #[arg(long, allow_hyphen_values = true)]
    pub vision_warmup_lr: Option<f64>,
    /// The label sets the vision warm-up learns, comma-separated (easy-VQA: colour, shape)
    #[arg(long, default_value = "colour,shape", value_delimiter = ',')]
    pub vision_warmup_labels: Vec<String>,
    /// Most tokens generated per held-out answer.
    #[arg(long, default_value_t = 16)]
    pub eval_max_new_tokens: usize,
    /// cpu, cuda[:N] (rank r on the r-th GPU from N) or auto (cuda:0 when usable, else the CPU
    /// with a notice).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Recompute each language-model block's activations in the backward pass instead of
    /// keeping them: a block keeps only its output (far less memory for long sequences, about
    /// a third more compute in the blocks; the paper presets' default)
    #[arg(long)]
    pub recompute: bool,
    /// Keep every activation (the paper presets recompute by default).
    #[arg(long, conflicts_with = "recompute")]
    pub no_recompute: bool,
    /// Print the memory plan of this setup (bytes per GPU of weights, gradients, optimizer
    /// state, activations and workspace) and whether it fits --gpu-memory, then exit.
    #[arg(long)]
    pub plan: bool,
    /// Seconds a rank of a multi-process run (`--nproc-per-node`, or RANK and WORLD_SIZE set)
    /// waits for the others, at the rendezvous and at each exchange, before it names the
    /// missing rank and stops (rank 0's vision warm-up and validation run in that time).
    #[arg(long, default_value_t = 1800)]
    pub rank_timeout: u64,
    /// The GPU memory in GiB that --plan checks the setup against.
    #[arg(long, default_value_t = 80.0)]
    pub gpu_memory: f64,
}

/// The defaults a preset trains with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recipe {
    /// Peak learning rate.
    pub lr: f64,
    /// Examples per optimizer step.
    pub global_batch: usize,
    /// Warm-up fraction.
    pub warmup_ratio: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Passes over the data.
    pub epochs: f64,
    /// Text tokens kept per example.
    pub max_len: usize,
    /// On easy-VQA, begin with one pass over the open questions (`--open-first`).
    pub open_first: bool,
    /// On easy-VQA, steps of the vision warm-up before training (`--vision-warmup`; 0: none).
    pub vision_warmup: usize,
    /// The vision warm-up's constant learning rate.
    pub vision_warmup_lr: f64,
    /// The most examples per forward pass on a rank (0: all of the rank's share of a step).
    pub max_micro_batch: usize,
    /// Recompute each language-model block in the backward pass (`--recompute`).
    pub recompute: bool,
}

impl Recipe {
    /// The recipe of `preset`: the paper's Table 5 for the paper's models (lr 2e-5, batch 128,
    /// warm-up 0.03, weight decay 0.1, 2 epochs); a faster one for the small presets, which
    /// start from random weights.
    pub fn of(preset: &str) -> Recipe {
        match preset {
            "tiny" => Recipe {
                lr: 1e-3,
                global_batch: 32,
                warmup_ratio: 0.03,
                weight_decay: 0.01,
                epochs: 2.0,
                max_len: 64,
                open_first: true,
                vision_warmup: 2500,
                vision_warmup_lr: 2e-3,
                max_micro_batch: 0,
                recompute: false,
            },
            "small" => Recipe {
                lr: 1e-3,
                global_batch: 64,
                warmup_ratio: 0.03,
                weight_decay: 0.05,
                epochs: 2.0,
                max_len: 256,
                open_first: false,
                vision_warmup: 0,
                vision_warmup_lr: 1e-3,
                max_micro_batch: 0,
                recompute: false,
            },
            _ => Recipe {
                lr: 2e-5,
                global_batch: 128,
                warmup_ratio: 0.03,
                weight_decay: 0.1,
                epochs: 2.0,
                max_len: 2048,
                open_first: false,
                vision_warmup: 0,
                vision_warmup_lr: 2e-5,
                // Chosen with `train --plan`: with recomputation, micro-batches of 4 fit the
                // paper's 8 x 40 GB and one 80 GB GPU (README, "Memory").
                max_micro_batch: 4,
                recompute: true,
            },
        }
    }
}

impl TrainOptions {
    /// The options with every unset recipe value filled from the preset.
    pub fn recipe(&self) -> Recipe {
        let d = Recipe::of(&self.preset);
        let easy_vqa = self.data == "easy-vqa";
        Recipe {
            lr: self.lr.unwrap_or(d.lr),
            global_batch: self.global_batch.unwrap_or(d.global_batch),
            warmup_ratio: self.warmup_ratio.unwrap_or(d.warmup_ratio),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            epochs: self.epochs.unwrap_or(d.epochs),
            max_len: self.max_len.unwrap_or(d.max_len),
            open_first: self.open_first || (!self.no_open_first && d.open_first && easy_vqa),
            vision_warmup: self
                .vision_warmup
                .unwrap_or(if easy_vqa { d.vision_warmup } else { 0 }),
            vision_warmup_lr: self.vision_warmup_lr.unwrap_or(d.vision_warmup_lr),
            max_micro_batch: d.max_micro_batch,
            recompute: self.recompute || (d.recompute && !self.no_recompute),
        }
    }

    /// Checks every setting before any work starts: each numeric flag finite and in its range,
    /// and no option given that cannot apply. The error names the flag and the allowed range.
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, value: String, range: &str| {
            Err(TrainError::Options(format!("--{flag} {value}: must be {range}")))
        };
        let floats = [
            ("lr", self.lr, 0.0, 10.0, false, "in (0, 10]"),
            ("warmup-ratio", self.warmup_ratio, 0.0, 1.0, true, "in [0, 1)"),
            ("weight-decay", self.weight_decay, 0.0, 1.0, true, "in [0, 1]"),
            ("epochs", self.epochs, 0.0, 1e6, false, "in (0, 1e6]"),
            ("pixel-weight", self.pixel_weight, 0.0, 1e6, true, "in [0, 1e6]"),
            (
                "gpu-memory",
                Some(self.gpu_memory),
                0.0,
                1e6,
                false,
                "in (0, 1e6]",
            ),
            (
                "vision-warmup-lr",
                self.vision_warmup_lr,
                0.0,
                10.0,
                false,
                "in (0, 10]",
            ),
            (
                "max-grad-norm",
                Some(self.max_grad_norm),
                0.0,
                1e6,
                true,
                "in [0, 1e6] (0: no clipping)",
            ),
        ];
        for (flag, value, lo, hi, zero_ok, range) in floats {
            let Some(v) = value else { continue };
            let above_lo = if zero_ok { v >= lo } else { v > lo };
            let below_hi = if flag == "warmup-ratio" { v < hi } else { v <= hi };
            if !(v.is_finite() && above_lo && below_hi) {
                return bad(flag, v.to_string(), range);
            }
        }
        let counts = [
            ("steps", self.steps.map(|v| v as usize)),
            ("max-len", self.max_len),
            ("global-batch", self.global_batch),
            ("micro-batch", self.micro_batch),
            ("ranks", Some(self.ranks)),
            ("checkpoint-every", Some(self.checkpoint_every as usize)),
            ("keep", Some(self.keep)),
            ("rank-timeout", Some(self.rank_timeout as usize)),
            ("eval-max-new-tokens", Some(self.eval_max_new_tokens)),
        ];
        for (flag, value) in counts {
            if value == Some(0) {
                return bad(flag, "0".into(), "a positive count");
            }
        }
        if let Some(kind) = self
            .open_first_kinds
            .iter()
            .find(|k| !["colour", "shape"].contains(&k.as_str()))
        {
            return bad(
                "open-first-kinds",
                format!("{kind:?}"),
                "a comma-separated list of colour and shape",
            );
        }
        if self.data != "easy-vqa" {
            refuse_given(
                &[
                    ("data-dir", self.data_dir.is_some()),
                    ("val-images", self.val_images != DEFAULT_VAL_IMAGES),
                    ("val-questions", self.val_questions != DEFAULT_VAL_QUESTIONS),
                    ("eval-split", self.eval_split != "test"),
                    ("open-first", self.open_first),
                    ("vision-warmup", self.vision_warmup.is_some_and(|n| n > 0)),
                    ("vision-warmup-lr", self.vision_warmup_lr.is_some()),
                ],
                &format!("easy-VQA (--data easy-vqa), not --data {}", self.data),
            )?;
        } else {
            self.eval_split().map_err(TrainError::Options)?;
            if self.val_images == 0 && self.eval_split() == Ok(Split::Validation) {
                return bad(
                    "val-images",
                    "0".into(),
                    "positive to evaluate the validation split",
                );
            }
            refuse_given(
                &[
                    ("eval-data", self.eval_data.is_some()),
                    ("image-folder", self.image_folder.is_some()),
                    ("images-anywhere", self.images_anywhere),
                ],
                "LLaVA data, not easy-VQA (--data easy-vqa)",
            )?;
        }
        if self.data == "shapes" {
            if self.shapes_train == 0 {
                return bad("shapes-train", "0".into(), "a positive count");
            }
            refuse_given(
                &[
                    ("eval-data", self.eval_data.is_some()),
                    ("image-folder", self.image_folder.is_some()),
                    ("images-anywhere", self.images_anywhere),
                    ("skip-bad-samples", self.skip_bad_samples),
                ],
                "LLaVA data, not the built-in shapes set (--data shapes)",
            )?;
        }
        Ok(())
    }

    /// Refuses an --out whose outputs (`final/`, `checkpoints/`, `metrics.jsonl`) are or hold one
    /// of the run's inputs (data, image folder, tokenizer, pretrained directories): the run
    /// would replace them.
    pub fn check_out_holds_no_input(&self) -> Result<()> {
        let out = self.out_dir();
        let outputs = [
            out.join("final"),
            out.join("checkpoints"),
            out.join("metrics.jsonl"),
        ];
        let data = (!matches!(self.data.as_str(), "shapes" | "easy-vqa")).then(|| PathBuf::from(&self.data));
        let inputs = [
            data,
            self.data_dir.clone(),
            self.eval_data.as_ref().map(PathBuf::from),
            self.image_folder.clone(),
            self.tokenizer.clone(),
            self.siglip.clone(),
            self.dinov2.clone(),
            self.lm.clone(),
        ];
        for input in inputs.iter().flatten() {
            let Ok(real_in) = input.canonicalize() else {
                continue;
            };
            for output in &outputs {
                if output
                    .canonicalize()
                    .is_ok_and(|real_out| real_in.starts_with(real_out))
                {
                    return Err(TrainError::Options(format!(
                        "--out {}: the run writes {}, which holds the input {}; choose another --out",
                        out.display(),
                        output.display(),
                        input.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The easy-VQA split evaluated at the end.
    pub fn eval_split(&self) -> std::result::Result<Split, String> {
        match self.eval_split.parse() {
            Ok(Split::Train) => Err("--eval-split train: use validation or test".to_owned()),
            Ok(split) => Ok(split),
            Err(e) => Err(format!("--eval-split: {e}")),
        }
    }

    /// Whether the vision towers are frozen: as the flags say, else frozen when the preset has
    /// them frozen or a vision warm-up pre-trains them.
    pub fn vision_frozen(&self, preset_frozen: bool) -> bool {
        !self.train_vision && (self.freeze_vision || preset_frozen || self.recipe().vision_warmup > 0)
    }

    /// The precision the model computes in on `device`: `--precision auto` is bf16 on a GPU
    /// and f32 on the CPU.
    pub fn compute_dtype(&self, device: Device) -> Result<DType> {
        match self.precision.as_str() {
            "auto" if device != Device::Cpu => Ok(DType::BF16),
            "auto" | "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            other => Err(TrainError::Options(format!(
                "--precision {other}: use f32, bf16 or auto"
            ))),
        }
    }

    /// The model to train: the preset with the switches of the flags applied (fusion, pixel
    /// loss and its weight, frozen towers).
    pub fn model_config(&self) -> Result<EmmaConfig> {
        let mut cfg = EmmaConfig::named(&self.preset)?;
        cfg.alignment.mff &= !self.no_mff;
        cfg.alignment.pixel_loss &= !self.no_pixel_loss;
        if let Some(w) = self.pixel_weight {
            cfg.alignment.weight = w;
        }
        cfg.vision.frozen = self.vision_frozen(cfg.vision.frozen);
        Ok(cfg)
    }

    /// The output directory.
    pub fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            let data = Path::new(&self.data)
                .file_stem()
                .map_or_else(|| "data".to_owned(), |s| s.to_string_lossy().into_owned());
            PathBuf::from("runs").join(format!("{}-{data}", self.preset))
        })
    }

    /// Per-rank micro-batch and accumulation steps: `ranks * micro * accum == global batch`.
    pub fn batching(&self) -> Result<(usize, usize)> {
        let global = self.recipe().global_batch;
        if self.ranks == 0 || global == 0 {
            return Err(TrainError::Options(
                "--ranks and --global-batch must be positive".to_owned(),
            ));
        }
        if !global.is_multiple_of(self.ranks) {
            return Err(TrainError::Options(format!(
                "--global-batch {global} is not a multiple of --ranks {}",
                self.ranks
            )));
        }
        let per_rank = global / self.ranks;
        let micro = self.micro_batch.unwrap_or_else(|| {
            // The largest divisor of the rank's share within the preset's limit.
            let limit = self.recipe().max_micro_batch;
            (1..=per_rank)
                .rev()
                .find(|&m| per_rank.is_multiple_of(m) && (limit == 0 || m <= limit))
                .unwrap_or(1)
        });
        if micro == 0 || !per_rank.is_multiple_of(micro) {
            return Err(TrainError::Options(format!(
                "--micro-batch {micro} must divide the {per_rank} examples each rank takes per step \
                 (--global-batch {global} / --ranks {})",
                self.ranks
            )));
        }
        Ok((micro, per_rank / micro))
    }

    /// The options that must not change when a run is resumed, as `(name, value)`: what shapes
    /// the model, the data and its order, and the optimization. Ranks, micro-batch, device,
    /// checkpoint cadence and the like may change.
    pub fn run_identity(&self) -> Vec<(&'static str, String)> {
        let r = self.recipe();
        vec![
            ("preset", self.preset.clone()),
            ("data", self.data.clone()),
            ("shapes-train", self.shapes_train.to_string()),
            ("seed", self.seed.to_string()),
            ("steps", format!("{:?}", self.steps)),
            ("epochs", r.epochs.to_string()),
            ("lr", r.lr.to_string()),
            ("warmup-ratio", r.warmup_ratio.to_string()),
            ("weight-decay", r.weight_decay.to_string()),
            ("max-grad-norm", self.max_grad_norm.to_string()),
            ("global-batch", r.global_batch.to_string()),
            ("max-len", r.max_len.to_string()),
            ("no-mff", self.no_mff.to_string()),
            ("no-pixel-loss", self.no_pixel_loss.to_string()),
            ("pixel-weight", format!("{:?}", self.pixel_weight)),
            ("train-vision", self.train_vision.to_string()),
            ("freeze-vision", self.freeze_vision.to_string()),
            ("val-images", self.val_images.to_string()),
            ("open-first", r.open_first.to_string()),
            ("open-first-kinds", self.open_first_kinds.join(",")),
            ("vision-warmup", r.vision_warmup.to_string()),
            ("vision-warmup-labels", self.vision_warmup_labels.join(",")),
            ("vision-warmup-lr", r.vision_warmup_lr.to_string()),
            ("precision", self.precision.clone()),
        ]
    }
}

/// Refuses the first of `flags` that was given (`(name, given)`): it applies to `applies_to` only.
fn refuse_given(flags: &[(&str, bool)], applies_to: &str) -> Result<()> {
    match flags.iter().find(|(_, given)| *given) {
        Some((flag, _)) => Err(TrainError::Options(format!("--{flag} applies to {applies_to}"))),
        None => Ok(()),
    }
}

/// Command-line arguments with a `--config FILE` expanded in place: the file's keys become
/// flags placed before the command line's own, so that flags given on the command line win.
/// `known` lists the long flag names the file may set.
pub fn expand_config_file(args: Vec<String>, known: &[String]) -> Result<Vec<String>> {
    let is_config = |a: &String| a == "--config" || a.starts_with("--config=");
    let Some(pos) = args.iter().position(is_config) else {
        return Ok(args);
    };
    if args.iter().filter(|a| is_config(a)).count() > 1 {
        return Err(TrainError::Options(
            "--config is given more than once; give one file".to_owned(),
        ));
    }
    let (path, consumed) = match args[pos].strip_prefix("--config=") {
        Some(p) => (PathBuf::from(p), 1),
        None => match args.get(pos + 1) {
            Some(p) => (PathBuf::from(p), 2),
            None => return Err(TrainError::Options("--config needs a file".to_owned())),
        },
    };
    let text = std::fs::read_to_string(&path).map_err(crate::error::io_err(&path))?;
    let bad = |detail: String| TrainError::Options(format!("config file {}: {detail}", path.display()));
    let table: serde_json::Map<String, serde_json::Value> = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
    } else {
        let value: toml::Value = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        match serde_json::to_value(value).map_err(|e| bad(e.to_string()))? {
            serde_json::Value::Object(m) => m,
            _ => return Err(bad("not a table".to_owned())),
        }
    };
    let mut from_file = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        if !known.contains(&flag) || flag == "config" {
            return Err(bad(format!("unknown option '{key}'")));
        }
        match value {
            serde_json::Value::Bool(true) => from_file.push(format!("--{flag}")),
            serde_json::Value::Bool(false) | serde_json::Value::Null => {}
            serde_json::Value::String(s) => from_file.push(format!("--{flag}={s}")),
            serde_json::Value::Number(n) => from_file.push(format!("--{flag}={n}")),
            other => {
                return Err(bad(format!(
                    "option '{key}' must be a string, number or boolean, got {other}"
                )))
            }
        }
    }
    let mut out = args[..pos].to_vec();
    // The program name stays first; the file's flags come before the command line's.
    let insert_at = out.len().min(1);
    for (i, f) in from_file.into_iter().enumerate() {
        out.insert(insert_at + i, f);
    }
    out.extend(args[pos + consumed..].iter().cloned());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::expand_config_file;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn config_file_keys_become_flags_that_the_command_line_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let known = args(&["lr", "steps", "resume", "no-mff", "data", "config"]);
        let toml = dir.path().join("run.toml");
        std::fs::write(
            &toml,
            "lr = 0.5\nsteps = 7\nresume = true\nno_mff = false\ndata = \"x.json\"\n",
        )
        .unwrap();
        let out = expand_config_file(
            args(&["train", "--config", toml.to_str().unwrap(), "--lr", "0.1"]),
            &known,
        )
        .unwrap();
        assert_eq!(
            out,
            args(&[
                "train",
                "--data=x.json",
                "--lr=0.5",
                "--resume",
                "--steps=7",
                "--lr",
                "0.1"
            ])
        );
        let json = dir.path().join("run.json");
        std::fs::write(&json, r#"{"steps": 3}"#).unwrap();
        let out =
            expand_config_file(args(&["train", &format!("--config={}", json.display())]), &known).unwrap();
        assert_eq!(out, args(&["train", "--steps=3"]));
    }

    #[test]
    fn unknown_keys_and_unreadable_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "learning_rate = 1\n").unwrap();
        let known = args(&["lr"]);
        let twice = expand_config_file(args(&["train", "--config", "a.toml", "--config=b.toml"]), &known);
        assert!(twice.unwrap_err().to_string().contains("more than once"));
        let err = expand_config_file(args(&["train", "--config", bad.to_str().unwrap()]), &known)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.toml") && err.contains("learning_rate"), "{err}");
        let err = expand_config_file(args(&["train", "--config", "/nonexistent.toml"]), &known)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent.toml"), "{err}");
    }
}
