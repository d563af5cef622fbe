//! The training loop, written for R data-parallel ranks.
//!
//! Each optimizer step takes the next `global batch` examples of the epoch's shuffled order; rank
//! r takes micro-batches `a * R + r` (a = 0 .. accumulation steps). Every term of the loss is
//! divided by the global batch's count (answer tokens for the text loss, images for the pixel
//! loss), so the summed gradient over ranks and micro-batches is the gradient of the global
//! batch's mean loss whatever R and the micro-batch size are. Gradients are summed across ranks,
//! clipped by their global norm, and applied by the sharded AdamW ([`crate::zero`]).
//!
//! Everything that decides a step (weights, optimizer moments, step count, data order seeded by
//! `(seed, epoch)`) is in the checkpoint, so a resumed run repeats the uninterrupted run's steps
//! exactly.

use crate::checkpoint::{self, TrainState};
use crate::collate::{collate, MicroBatch};
use crate::collective::{flatten, unflatten, Collective, ThreadGroup};
use crate::data::{Dataset, LlavaData, ShapesData, Skipped};
use crate::device_collective::{DeviceCollective, HostStaged};
use crate::easy_vqa::{self, EasyVqaData, Split};
use crate::error::{io_err, Result, TrainError};
use crate::eval::{evaluate, EvalReport};
use crate::metrics::Metrics;
use crate::options::TrainOptions;
use crate::overlapped_reduction::OverlappedReduction;
use crate::plan::BUCKET_BYTES;
use crate::process_group::ProcessGroup;
use crate::rendezvous::Peer;
use crate::replaced::Replaced;
use crate::schedule::learning_rate;
use crate::shapes::ShapesConfig;
use crate::vision_warmup::{warm_up_vision, ACCURACY_WINDOW, WARMUP_BATCH};
use crate::watchdog::Watchdog;
use crate::zero::{check_moments, load_moments, ShardedAdamW};
use autograd::Var;
use emma::checkpoint::{from_pretrained_parts, Pretrained, TOKENIZER_FILE};
use emma::config::EmmaConfig;
use emma::device::{resolve, DeviceChoice};
use emma::model::{Batch, Emma};
use emma::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};
use nn::{AdamWConfig, ParamStore};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tensor::nccl::NcclGroup;
use tensor::{DType, Device, Tensor};

/// The first example index of the held-out shapes split: far from the training indices, so
/// that its scenes come from other seeds.
pub const SHAPES_EVAL_FIRST: u64 = 1 << 40;

/// What a finished run reports.
pub struct Summary {
    /// This process's rank (0 unless it is one process of a multi-process run; only rank 0
    /// saves the final model and evaluates it).
    pub rank: usize,
    /// Steps of the whole run.
    pub steps: u64,
    /// The step this invocation started from (0, or the resumed checkpoint's).
    pub resumed_from: u64,
    /// The loss of the last step.
    pub final_loss: f64,
    /// The final model (a directory `emma generate` and `train eval` take).
    pub final_model: PathBuf,
    /// Training samples left out as bad.
    pub skipped: Vec<Skipped>,
    /// Held-out accuracy, when there is held-out data, and the JSON file it was written to.
    pub eval: Option<(EvalReport, PathBuf)>,
}

/// Everything the ranks share, read-only.
struct Run<'a> {
    opts: &'a TrainOptions,
    cfg: EmmaConfig,
    tok: Tokenizer,
    data: &'a dyn Dataset,
    /// The trainable parameters' names (sorted).
    trainable: Vec<String>,
    compute: DType,
    /// Rank 0's device; rank r runs on the r-th device after it (the local rank's, when the
    /// ranks are processes on several machines).
    device: Device,
    /// This process's rank among the ranks of its machine, when it is one process of a run.
    local_rank: Option<usize>,
    /// NCCL's unique id from the rendezvous, when the ranks are processes on real GPUs: the
    /// gradients and weights then travel by NCCL, not through the host.
    nccl_id: Option<Vec<u8>>,
    adamw: AdamWConfig,
    total: u64,
    /// The open questions in their (seeded) order, a whole number of global batches, trained
    /// on before the epochs (`--open-first`; empty without it).
    open_first: Vec<usize>,
    steps_per_epoch: u64,
    micro: usize,
    accum: usize,
    root: PathBuf,
    out: PathBuf,
    progress: ProgressBar,
    /// metrics.jsonl, open on rank 0 only.
    metrics: Option<Mutex<std::fs::File>>,
    /// An earlier run's outputs set aside by `--overwrite`, until the first checkpoint.
    replaced: Option<Replaced>,
    /// The validation questions answered at every checkpoint (easy-VQA, `--val-questions`).
    val_slice: Option<EasyVqaData>,
}

/// Trains as `opts` says (on the CPU or on GPUs, per `--device`) and evaluates on the held-out
/// data.
///
/// When `WORLD_SIZE` is set above 1 (by `train --nproc-per-node`, or by hand in torchrun's
/// convention), this process is one rank of a multi-process run: it meets the others at the
/// rendezvous and exchanges gradients with them over its connections; rank 0 prepares the run
/// (output folder, starting weights, vision warm-up) and hands the others the weights, and
/// writes the metrics, checkpoints' model files and the final model.
pub fn train(opts: &TrainOptions) -> Result<Summary> {
    opts.validate()?;
    let timeout = Duration::from_secs(opts.rank_timeout);
    let peer = Peer::from_vars(|k| std::env::var(k).ok(), timeout)?;
    let Some(peer) = peer.filter(|p| p.world > 1) else {
        return train_on(opts, None, None);
    };
    if opts.ranks != 1 {
        return Err(TrainError::Options(format!(
            "--ranks {} with WORLD_SIZE {}: each process of a multi-process run is one rank \
             (leave --ranks out)",
            opts.ranks, peer.world
        )));
    }
    let mut opts = opts.clone();
    opts.ranks = peer.world;
    // On real GPUs rank 0 makes NCCL's unique id for the rendezvous to hand out; elsewhere the
    // exchanges go through the rendezvous connections and need none.
    let id = if peer.rank == 0 && on_real_gpus(&opts)? {
        NcclGroup::unique_id()?
    } else {
        Vec::new()
    };
    let group = ProcessGroup::new(peer.join(move || id)?, timeout)?;
    train_on(&opts, Some(&group), Some(peer.local_rank))
}

/// Whether `--device` names CUDA devices that are real GPUs (not the emulated device).
fn on_real_gpus(opts: &TrainOptions) -> Result<bool> {
    let choice: DeviceChoice = opts.device.parse().map_err(TrainError::Options)?;
    match resolve(choice).map_err(|e| TrainError::Device(format!("{e:#}")))? {
        Device::Cuda(n) => Ok(!tensor::cuda_device(n)?.is_emulated()),
        _ => Ok(false),
    }
}

/// [`train`] as one rank of `group` (on the `local_rank`-th device from `--device`'s), or as
/// every rank (threads) of this process without one.
fn train_on(opts: &TrainOptions, group: Option<&ProcessGroup>, local_rank: Option<usize>) -> Result<Summary> {
    let rank = group.map_or(0, |g| g.rank());
    let lead = rank == 0;
    opts.check_out_holds_no_input()?;
    let cfg = opts.model_config()?;
    if lead && cfg.alignment.mff && !cfg.alignment.pixel_loss {
        eprintln!(
            "note: multi-scale feature fusion only feeds the pixel loss (as in the paper); with \
             --no-pixel-loss it does not change what the model learns"
        );
    }
    let choice: DeviceChoice = opts.device.parse().map_err(TrainError::Options)?;
    let device = resolve(choice).map_err(|e| TrainError::Device(format!("{e:#}")))?;
    let compute = opts.compute_dtype(device)?;
    let recipe = opts.recipe();
    let (micro, accum) = opts.batching()?;
    let tok = match &opts.tokenizer {
        Some(p) => Tokenizer::from_file(p)?,
        None => Tokenizer::train_builtin(cfg.lm.vocab)?,
    };
    tok.check_fits(cfg.lm.vocab)?;
    // Rank 0 first: it may fetch the data into the shared cache.
    let (train_data, eval_data, skipped) = rank_zero_first(group, || datasets(opts))?;
    let n = train_data.len() as u64;
    let global = recipe.global_batch as u64;
    if n < global {
        return Err(TrainError::Options(format!(
            "{} has {n} examples, fewer than one global batch ({global})",
            train_data.describe()
        )));
    }
    let steps_per_epoch = n / global;
    let open_first = if recipe.open_first {
        let kinds: Vec<&str> = opts.open_first_kinds.iter().map(String::as_str).collect();
        let mut open = train_data.open_questions(&kinds).ok_or_else(|| {
            TrainError::Options(format!(
                "--open-first: {} does not tell question types",
                train_data.describe()
            ))
        })?;
        open.shuffle(&mut rand::rngs::StdRng::seed_from_u64(opts.seed));
        open.truncate(open.len() / global as usize * global as usize);
        open
    } else {
        Vec::new()
    };
    let open_steps = (open_first.len() / global as usize) as u64;
    let total = opts
        .steps
        .unwrap_or_else(|| open_steps + ((recipe.epochs * n as f64) / global as f64).ceil().max(1.0) as u64);

    let out = opts.out_dir();
    let root = out.join("checkpoints");
    let prepared = if lead {
        prepare(opts, &cfg, train_data.as_ref(), device, &out, &root)
    } else {
        Ok((BTreeMap::new(), None, None))
    };
    let (params, state, replaced) = match group {
        Some(g) => {
            let prepared = agree(g, prepared)?;
            let (params, state, replaced) = prepared;
            (share_weights(g, &cfg, params)?, share_state(g, state)?, replaced)
        }
        None => {
            let (params, state, replaced) = prepared?;
            (params, state.map(|s| (s.step, s.loss)), replaced)
        }
    };
    let trainable: Vec<String> = params.keys().filter(|k| is_trainable(&cfg, k)).cloned().collect();
    let start = state.as_ref().map_or(0, |s| s.0);
    let metrics = if lead {
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        Some(Mutex::new(open_metrics(&out, start)?))
    } else {
        None
    };
    let progress = if lead {
        ProgressBar::new(total).with_position(start)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} (ETA {eta})")
            .map_err(|e| TrainError::Options(e.to_string()))?
            .progress_chars("=> "),
    );
    if lead {
        eprintln!(
            "training {} ({} trainable of {} parameters) on {}: {} of {} ({} x {accum} x {micro}{}), \
             {:?} on {device}{}",
            cfg.name,
            trainable.iter().map(|k| params[k].numel()).sum::<usize>(),
            params.values().map(Tensor::numel).sum::<usize>(),
            train_data.describe(),
            counted(total, "step"),
            counted(global, "example"),
            counted(opts.ranks as u64, "rank"),
            if group.is_some() { ", one process each" } else { "" },
            compute,
            if start > 0 {
                format!(", resuming at step {start}")
            } else {
                String::new()
            }
        );
    }
    if lead && group.is_some() && device != Device::Cpu {
        eprintln!(
            "note: the processes exchange gradients through host memory over their TCP \
             connections (NCCL collectives are not built yet): correct, but slower than NCCL"
        );
    }
    let run = Run {
        opts,
        cfg,
        tok,
        data: train_data.as_ref(),
        trainable,
        compute,
        device,
        local_rank,
        nccl_id: group.map(|g| g.id().to_vec()).filter(|id| !id.is_empty()),
        adamw: AdamWConfig {
            lr: recipe.lr,
            weight_decay: recipe.weight_decay,
            ..Default::default()
        },
        total,
        open_first,
        steps_per_epoch,
        micro,
        accum,
        root,
        out: out.clone(),
        progress,
        metrics,
        replaced,
        val_slice: if lead { validation_slice(opts)? } else { None },
    };
    let resume_dir = (start > 0).then(|| checkpoint::step_dir(&run.root, start));
    let start_loss = state.map_or(f64::NAN, |s| s.1);
    let (final_loss, params) = match group {
        Some(g) => {
            let (loss, params) = rank_loop(&run, g, params, start, start_loss, resume_dir.as_deref())?;
            run.progress.finish();
            (loss, params)
        }
        None => thread_ranks(&run, params, start, start_loss, resume_dir.as_deref())?,
    };
    let final_model = out.join("final");
    // Rank 0 saves and evaluates the model; the other processes are done.
    let eval = match (&eval_data, lead) {
        (_, false) => None,
        (data, true) => {
            let model = model_on_device(&run, params, "trained model")?;
            save_model(&model, &run.tok, &final_model)?;
            match data {
                Some(data) => Some(evaluate_and_save(&run, &model, data.as_ref())?),
                None => None,
            }
        }
    };
    Ok(Summary {
        rank,
        steps: total,
        resumed_from: start,
        final_loss,
        final_model,
        skipped,
        eval,
    })
}

/// The held-out report of the trained `model` on `data`, written to `eval.json` and
/// `answers.jsonl` in the run's folder; returns it and the JSON file.
fn evaluate_and_save(run: &Run, model: &Emma, data: &dyn Dataset) -> Result<(EvalReport, PathBuf)> {
    let bar = ProgressBar::new(data.len() as u64);
    bar.set_message("evaluating");
    let report = evaluate(model, &run.tok, data, run.opts.eval_max_new_tokens, Some(&bar))?;
    bar.finish_and_clear();
    let file = run.out.join("eval.json");
    report.save(&file)?;
    report.save_answers(&run.out.join("answers.jsonl"))?;
    Ok((report, file))
}

/// Runs `f` on rank 0 before the other ranks run it (everything at once without a group); a
/// failure on rank 0 stops every rank.
fn rank_zero_first<T>(group: Option<&ProcessGroup>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(g) = group else { return f() };
    if g.rank() == 0 {
        agree(g, f())
    } else {
        agree(g, Ok(()))?;
        f()
    }
}

/// Rank 0's weights on every rank: the others receive them in name order, shaped after the
/// model's parameters.
fn share_weights(
    g: &ProcessGroup,
    cfg: &EmmaConfig,
    params: BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut flat = if g.rank() == 0 {
        flatten(params.values())?
    } else {
        Vec::new()
    };
    g.broadcast(&mut flat)?;
    if g.rank() == 0 {
        return Ok(params);
    }
    let shapes = Emma::new(cfg, ParamStore::placeholders("the shapes of rank 0's weights"))?
        .store()
        .tensors();
    let shapes = shapes.iter().map(|(name, t)| (name, t.shape()));
    unflatten(&flat, shapes, Device::Cpu, "rank 0")
}

/// Rank 0's starting point on every rank: the step resumed from and its loss (none when
/// starting afresh).
fn share_state(g: &ProcessGroup, state: Option<TrainState>) -> Result<Option<(u64, f64)>> {
    let mine = match (&state, g.rank()) {
        (Some(s), 0) => [1.0, s.step as f64, s.loss],
        _ => [0.0, 0.0, 0.0],
    };
    // Only rank 0 adds anything: its values arrive exactly (the f64 sum is exact here).
    let sums = g.sum_f64(&mine)?;
    Ok((sums[0] > 0.0).then_some((sums[1] as u64, sums[2])))
}

/// The starting weights and state of rank 0 (see [`initial_state`]), after the vision warm-up
/// when the run starts afresh.
fn prepare(
    opts: &TrainOptions,
    cfg: &EmmaConfig,
    train_data: &dyn Dataset,
    device: Device,
    out: &Path,
    root: &Path,
) -> Result<Start> {
    let recipe = opts.recipe();
    let (mut params, state, replaced) = initial_state(opts, cfg, out, root)?;
    let warmup_steps = recipe.vision_warmup;
    if state.is_none() && warmup_steps > 0 {
        let names: Vec<&str> = opts.vision_warmup_labels.iter().map(String::as_str).collect();
        let images = train_data
            .labelled_images()
            .ok_or_else(|| format!("{} has no image labels", train_data.describe()))
            .and_then(|images| images.select(&names))
            .map_err(|e| TrainError::Options(format!("--vision-warmup: {e}")))?;
        let timer = Instant::now();
        let (warmed, summary) = warm_up_vision(
            cfg,
            params,
            &images,
            warmup_steps,
            (recipe.vision_warmup_lr, recipe.weight_decay),
            opts.seed,
            device,
        )?;
        params = warmed;
        let accuracy: Vec<String> = summary
            .accuracy
            .iter()
            .map(|(task, a)| format!("{task} {:.1}%", 100.0 * a))
            .collect();
        eprintln!(
            "vision warm-up: {} of {WARMUP_BATCH} images ({} labelled), read-out loss {:.3}, \
             accuracy over the last {ACCURACY_WINDOW} steps {}, {:.1} s",
            counted(summary.steps as u64, "step"),
            images.images.len(),
            summary.last_loss,
            accuracy.join(", "),
            timer.elapsed().as_secs_f64()
        );
    }
    Ok((params, state, replaced))
}

/// Every rank of the run as a thread of this process; returns rank 0's last loss and weights.
fn thread_ranks(
    run: &Run,
    params: BTreeMap<String, Tensor>,
    start: u64,
    start_loss: f64,
    resume_dir: Option<&Path>,
) -> Result<(f64, BTreeMap<String, Tensor>)> {
    let group = ThreadGroup::new(run.opts.ranks);
    let results: Vec<Result<(f64, BTreeMap<String, Tensor>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .map(|coll| {
                let params = params.clone();
                s.spawn(move || rank_loop(run, coll, params, start, start_loss, resume_dir))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(TrainError::PeerFailed(usize::MAX)))
            })
            .collect()
    });
    run.progress.finish();
    let mut first_err = None;
    let mut rank0 = None;
    for r in results {
        match r {
            Ok(v) => rank0 = rank0.or(Some(v)),
            Err(TrainError::PeerFailed(_)) => {}
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    rank0.ok_or(TrainError::PeerFailed(usize::MAX))
}

/// Writes a model directory with its tokenizer.
fn save_model(model: &Emma, tok: &Tokenizer, dir: &Path) -> Result<()> {
    emma::checkpoint::save(model, dir).map_err(|e| TrainError::Checkpoint {
        path: dir.to_owned(),
        detail: format!("{e:#}"),
    })?;
    tok.save(dir.join(TOKENIZER_FILE))?;
    Ok(())
}

type Datasets = (Box<dyn Dataset>, Option<Box<dyn Dataset>>, Vec<Skipped>);

/// The validation questions answered at each checkpoint: `--val-questions` of easy-VQA's
/// validation split, spread evenly over it (none for other data, or with 0).
fn validation_slice(opts: &TrainOptions) -> Result<Option<EasyVqaData>> {
    if opts.data != "easy-vqa" || opts.val_images == 0 || opts.val_questions == 0 {
        return Ok(None);
    }
    let val = open_easy_vqa(
        opts.data_dir.as_deref(),
        Split::Validation,
        opts.val_images,
        opts.skip_bad_samples,
    )?;
    Ok(Some(val.spread(opts.val_questions)))
}

/// The run's model with the weights `params` (called `what` in errors), frozen, on rank 0's
/// device.
fn model_on_device(run: &Run, params: BTreeMap<String, Tensor>, what: &str) -> Result<Emma> {
    let store = ParamStore::new(params, false, what);
    store.set_device(run.device);
    Ok(Emma::new(&run.cfg, store)?)
}

/// Accuracy of the weights `params` on the validation slice.
fn validation_accuracy(run: &Run, slice: &EasyVqaData, params: &BTreeMap<String, Tensor>) -> Result<f64> {
    let model = model_on_device(run, params.clone(), "validation")?;
    let report = evaluate(&model, &run.tok, slice, run.opts.eval_max_new_tokens, None)?;
    Ok(report.accuracy())
}

/// Redraws `loss.png` in the run folder; a failure to draw is reported, not fatal to training.
fn redraw_loss_png(out: &Path) {
    if let Err(e) = crate::loss_plot::draw_loss_png(out) {
        eprintln!("warning: loss.png not drawn: {e}");
    }
}

/// The training data, the held-out data and the training samples skipped as bad.
fn datasets(opts: &TrainOptions) -> Result<Datasets> {
    if opts.data == "easy-vqa" {
        let split = opts.eval_split().map_err(TrainError::Options)?;
        let load = |split| {
            open_easy_vqa(
                opts.data_dir.as_deref(),
                split,
                opts.val_images,
                opts.skip_bad_samples,
            )
        };
        let (train, eval) = (load(Split::Train)?, load(split)?);
        let skipped = train.skipped.clone();
        return Ok((Box::new(train), Some(Box::new(eval)), skipped));
    }
    if opts.data == "shapes" {
        let config = ShapesConfig {
            image_size: 32,
            seed: opts.seed,
        };
        let train = ShapesData {
            config: config.clone(),
            first: 0,
            count: opts.shapes_train as usize,
        };
        let eval = ShapesData {
            config,
            first: SHAPES_EVAL_FIRST,
            count: opts.shapes_eval as usize,
        };
        let eval: Option<Box<dyn Dataset>> = (eval.count > 0).then(|| Box::new(eval) as Box<dyn Dataset>);
        return Ok((Box::new(train), eval, Vec::new()));
    }
    let folder = opts.image_folder.as_deref();
    let images = (folder, opts.images_anywhere);
    let train = open_llava(Path::new(&opts.data), images, opts.skip_bad_samples)?;
    let skipped = train.skipped.clone();
    let eval = match &opts.eval_data {
        Some(path) => {
            Some(Box::new(open_llava(Path::new(path), images, opts.skip_bad_samples)?) as Box<dyn Dataset>)
        }
        None => None,
    };
    Ok((Box::new(train), eval, skipped))
}

/// Loads `split` of easy-VQA (from `data_dir`, else the cached download, fetched if missing),
/// holding out `val_images` training images, printing each question skipped as bad.
pub fn open_easy_vqa(
    data_dir: Option<&Path>,
    split: Split,
    val_images: usize,
    skip_bad_samples: bool,
) -> Result<EasyVqaData> {
    let dir = easy_vqa::locate(data_dir)?;
    let data = EasyVqaData::load(&dir, split, val_images, skip_bad_samples)?;
    for s in &data.skipped {
        eprintln!("skipped: {}", s.reason);
    }
    Ok(data)
}

/// Loads a LLaVA file whose images are relative to `image_folder` (default: the file's folder)
/// and inside it unless `images_anywhere`, printing each record skipped as bad.
pub fn open_llava(
    json: &Path,
    (image_folder, images_anywhere): (Option<&Path>, bool),
    skip_bad_samples: bool,
) -> Result<LlavaData> {
    let folder = image_folder.map_or_else(
        || json.parent().map(Path::to_path_buf).unwrap_or_default(),
        Path::to_path_buf,
    );
    let data = LlavaData::load(json, &folder, skip_bad_samples, images_anywhere)?;
    for s in &data.skipped {
        eprintln!("skipped: {}", s.reason);
    }
    for note in data.notes.iter().take(3) {
        eprintln!("note: {note}");
    }
    if data.notes.len() > 3 {
        eprintln!("note: ... {} more records like these", data.notes.len() - 3);
    }
    Ok(data)
}

/// Where a run starts: the weights; when resuming, the checkpoint's state; with `--overwrite`,
/// the earlier run's outputs, set aside.
type Start = (BTreeMap<String, Tensor>, Option<TrainState>, Option<Replaced>);

/// Where the run starts (see [`Start`]).
fn initial_state(opts: &TrainOptions, cfg: &EmmaConfig, out: &Path, root: &Path) -> Result<Start> {
    checkpoint::remove_partials(root)?;
    let existing = checkpoint::list(root)?;
    if opts.resume && !existing.is_empty() {
        return resume_from_newest_good(opts, cfg, root, &existing).map(|(t, s)| (t, Some(s), None));
    }
    let mut replaced = None;
    if let Some((step, _)) = existing.last() {
        if !opts.overwrite {
            return Err(TrainError::Options(format!(
                "{} holds checkpoints of an earlier run (up to step {step}): pass --resume to continue \
                 it, --overwrite to start over, or another --out",
                root.display()
            )));
        }
        let dirs: Vec<PathBuf> = existing.iter().map(|(_, dir)| dir.clone()).collect();
        replaced = Some(Replaced::move_aside(out, &dirs)?);
    } else if opts.resume {
        eprintln!("note: no checkpoint in {}; starting from step 0", root.display());
    }
    let parts = Pretrained {
        siglip: opts.siglip.as_deref(),
        dinov2: opts.dinov2.as_deref(),
        lm: opts.lm.as_deref(),
    };
    let model = from_pretrained_parts(cfg, &parts, opts.seed, true)
        .map_err(|e| TrainError::Options(format!("{e:#}")))?;
    Ok((model.store().tensors(), None, replaced))
}

/// Whether parameter `name` of a model of `cfg` is trained (the vision towers only when not
/// frozen).
pub fn is_trainable(cfg: &EmmaConfig, name: &str) -> bool {
    !(cfg.vision.frozen && name.starts_with("vision."))
}

/// `n` and `noun`, plural unless `n` is 1: "1 step", "2 steps".
fn counted(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Why a checkpoint cannot be resumed from.
enum Unusable {
    /// It is damaged or inconsistent: the next older one may be used.
    Damaged(TrainError),
    /// This run's options differ from the checkpoint's: an error, whatever older ones hold.
    OtherOptions(TrainError),
}

/// The newest checkpoint that passes [`check_checkpoint`]. Damaged newer ones are reported with a
/// one-line notice each and set aside as `.step-N.rejected` (so that checkpoint rotation never
/// counts them); none good is an error listing what was found.
fn resume_from_newest_good(
    opts: &TrainOptions,
    cfg: &EmmaConfig,
    root: &Path,
    existing: &[(u64, PathBuf)],
) -> Result<(BTreeMap<String, Tensor>, TrainState)> {
    let mut rejected: Vec<(PathBuf, u64, String)> = Vec::new();
    for (step, dir) in existing.iter().rev() {
        match check_checkpoint(opts, cfg, *step, dir) {
            Ok(found) => {
                for (dir, step, why) in &rejected {
                    let aside = root.join(format!(".step-{step:08}.rejected"));
                    std::fs::rename(dir, &aside).map_err(io_err(&aside))?;
                    eprintln!(
                        "note: checkpoint {} is unusable ({why}); set aside as {}",
                        dir.display(),
                        aside.display()
                    );
                }
                if !rejected.is_empty() {
                    eprintln!(
                        "note: resuming from the newest good checkpoint, {}",
                        dir.display()
                    );
                }
                return Ok(found);
            }
            Err(Unusable::OtherOptions(e)) => return Err(e),
            Err(Unusable::Damaged(e)) => rejected.push((dir.clone(), *step, e.to_string())),
        }
    }
    let found: Vec<String> = rejected.iter().map(|(_, _, why)| why.clone()).collect();
    Err(TrainError::Checkpoint {
        path: root.to_owned(),
        detail: format!("no usable checkpoint to resume from: {}", found.join("; ")),
    })
}

/// Checks checkpoint `dir` of `step` as a whole before it is trusted: `state.json` parses and
/// names the folder's step, the run's options match, the model loads with this run's config,
/// the tokenizer parses, and the optimizer shards of every rank that wrote it hold both moments
/// of every trainable parameter with its shape. Returns the weights and the state.
fn check_checkpoint(
    opts: &TrainOptions,
    cfg: &EmmaConfig,
    step: u64,
    dir: &Path,
) -> std::result::Result<(BTreeMap<String, Tensor>, TrainState), Unusable> {
    let damaged = |detail: String| {
        Unusable::Damaged(TrainError::Checkpoint {
            path: dir.to_owned(),
            detail,
        })
    };
    let state = checkpoint::read_state(dir).map_err(Unusable::Damaged)?;
    if state.step != step {
        return Err(damaged(format!(
            "{} says step {}, the folder is step {step}",
            checkpoint::STATE_FILE,
            state.step
        )));
    }
    let identity: Vec<(String, String)> = opts
        .run_identity()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let changed: Vec<String> = identity
        .iter()
        .filter(|kv| !state.identity.contains(kv))
        .map(|(k, v)| {
            let was = state
                .identity
                .iter()
                .find(|(sk, _)| sk == k)
                .map_or("unset", |(_, sv)| sv);
            format!("--{k} {v} (the run used {was})")
        })
        .collect();
    if !changed.is_empty() {
        return Err(Unusable::OtherOptions(TrainError::Checkpoint {
            path: dir.to_owned(),
            detail: format!("cannot resume with other options: {}", changed.join(", ")),
        }));
    }
    let model = emma::checkpoint::load(dir, true, Device::Cpu).map_err(|e| damaged(format!("{e:#}")))?;
    if model.config() != cfg {
        return Err(damaged("its model config differs from this run's".to_owned()));
    }
    Tokenizer::from_file(dir.join(TOKENIZER_FILE)).map_err(|e| damaged(format!("{e:#}")))?;
    for rank in 0..state.ranks {
        let shard = dir.join(format!("optimizer-rank{rank}.safetensors"));
        if !shard.is_file() {
            return Err(damaged(format!("{} of rank {rank} is missing", shard.display())));
        }
    }
    let tensors = model.store().tensors();
    let trainable: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| is_trainable(cfg, k))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    check_moments(dir, &trainable).map_err(|e| damaged(e.to_string()))?;
    Ok((tensors, state))
}

/// The metrics file, holding the lines of steps up to `start` (a resumed run rewrites the
/// steps after its checkpoint).
fn open_metrics(out: &Path, start: u64) -> Result<std::fs::File> {
    let path = out.join("metrics.jsonl");
    let kept: String = match std::fs::read_to_string(&path) {
        Ok(text) if start > 0 => text
            .lines()
            .filter(|l| serde_json::from_str::<Metrics>(l).is_ok_and(|m| m.step <= start))
            .map(|l| format!("{l}\n"))
            .collect(),
        _ => String::new(),
    };
    tensor::atomic_file::write_atomic(&path, |w| w.write_all(kept.as_bytes())).map_err(io_err(&path))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io_err(&path))
}

/// Turns this rank's outcome into one every rank agrees on: if any rank failed, every rank
/// stops (the failing one with its own error).
fn agree<T>(coll: &dyn Collective, local: Result<T>) -> Result<T> {
    let mut flags = vec![0.0; coll.world()];
    flags[coll.rank()] = f64::from(u8::from(local.is_err()));
    let failed = coll.sum_f64(&flags)?;
    match local {
        Err(e) => Err(e),
        Ok(v) => match failed.iter().position(|&f| f > 0.0) {
            Some(r) => Err(TrainError::PeerFailed(r)),
            None => Ok(v),
        },
    }
}

/// One rank's training from step `start` (whose loss was `start_loss`); returns the last loss
/// and the final weights.
fn rank_loop(
    run: &Run,
    coll: &dyn Collective,
    params: BTreeMap<String, Tensor>,
    start: u64,
    start_loss: f64,
    resume_dir: Option<&Path>,
) -> Result<(f64, BTreeMap<String, Tensor>)> {
    let (rank, world) = (coll.rank(), coll.world());
    let trainable_map: BTreeMap<String, Tensor> = run
        .trainable
        .iter()
        .map(|k| (k.clone(), params[k].clone()))
        .collect();
    let moments = match resume_dir {
        Some(dir) => load_moments(dir, &trainable_map, rank, world),
        None => Ok(BTreeMap::new()),
    };
    let moments = agree(coll, moments)?;
    // On a GPU the training state lives on the device from here on: every parameter's compute
    // weights, and this rank's shard of f32 master weights and moments, which the optimizer
    // updates there and casts the compute weights from.
    let device = rank_device(run.device, run.local_rank.unwrap_or(rank));
    let weights = params
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(device)?.to_dtype(run.compute)?)))
        .collect::<Result<BTreeMap<_, _>>>();
    let mut weights = agree(coll, weights)?;
    // The frozen parameters' f32 values, for the model files rank 0 writes.
    let frozen: BTreeMap<String, Tensor> = if rank == 0 {
        params
            .into_iter()
            .filter(|(k, _)| run.trainable.binary_search(k).is_err())
            .collect()
    } else {
        drop(params);
        BTreeMap::new()
    };
    let ready = agree(coll, gradient_ready_order(run, device, &weights))?;
    let opt = ShardedAdamW::new(
        trainable_map,
        &ready,
        device,
        rank,
        world,
        run.adamw,
        start,
        moments,
    );
    let mut opt = agree(coll, opt)?;
    let nccl = match &run.nccl_id {
        Some(id) if world > 1 => Some(Arc::new(agree(
            coll,
            NcclGroup::new(device, id, rank, world).map_err(Into::into),
        )?)),
        _ => None,
    };
    let staged = HostStaged(coll);
    let exchange: &dyn DeviceCollective = match &nccl {
        Some(group) => group.as_ref(),
        None => &staged,
    };
    let watchdog = nccl
        .as_ref()
        .map(|group| nccl_watchdog(group.clone(), rank, run.opts.rank_timeout));
    let global = run.micro * run.accum * world;
    let mut order: Option<(u64, Vec<usize>)> = None;
    let mut last_loss = start_loss;
    let mut last_checkpoint = resume_dir.map(Path::to_path_buf);
    let open_steps = (run.open_first.len() / global) as u64;
    for step in start..run.total {
        if let Some(dog) = &watchdog {
            dog.arm(format!("step {}", step + 1));
        }
        let timer = Instant::now();
        let (step_order, first) = match step.checked_sub(open_steps) {
            None => (run.open_first.as_slice(), step as usize * global),
            Some(epoch_step) => {
                let epoch = epoch_step / run.steps_per_epoch;
                if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    order = Some((epoch, shuffled(run.data.len(), run.opts.seed, epoch)));
                }
                let epoch_order = order.as_ref().map_or(&[][..], |(_, o)| o.as_slice());
                (epoch_order, (epoch_step % run.steps_per_epoch) as usize * global)
            }
        };
        let mine: Vec<usize> = (0..run.accum)
            .flat_map(|a| {
                let at = first + (a * world + rank) * run.micro;
                step_order[at..at + run.micro].iter().copied()
            })
            .collect();
        let batches = agree(coll, load_micro_batches(run, &mine))?;
        let counts = coll.sum_f64(&[
            batches
                .iter()
                .map(|b| (b.answer_tokens[0] + b.answer_tokens[1]) as f64)
                .sum(),
            batches.iter().map(|b| b.images as f64).sum(),
            batches.iter().map(|b| b.positions as f64).sum(),
        ])?;
        // The gradients are exchanged while the backward pass runs; every rank finishes the
        // exchange, whatever failed, before the ranks agree on how the step went.
        let (local, reduced) = std::thread::scope(|s| {
            let mut reduction =
                OverlappedReduction::start(s, opt.layout(), exchange, rank, device, BUCKET_BYTES);
            let local = accumulate(
                run,
                device,
                &weights,
                &batches,
                counts[0],
                counts[1],
                &mut reduction,
            );
            (local, reduction.finish())
        });
        let (text, pixel) = agree(coll, local)?;
        let (grads, squares) = agree(coll, reduced)?;
        // One exchange for the squares and the losses: [squares, text, pixel] over the ranks.
        let sums = coll.sum_f64(&[squares, text, pixel])?;
        let grad_norm = sums[0].sqrt();
        let losses = &sums[1..];
        let loss = losses[0] + losses[1];
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                step: step + 1,
                loss,
                grad_norm,
                checkpoint: last_checkpoint,
            });
        }
        let max = run.opts.max_grad_norm;
        let grads = if max > 0.0 && grad_norm > max {
            let scale = f64::from((max / grad_norm) as f32);
            grads
                .into_iter()
                .map(|(k, g)| Ok((k, g.affine(scale, 0.0)?)))
                .collect::<Result<_>>()?
        } else {
            grads
        };
        let lr = learning_rate(step, run.total, run.adamw.lr, run.opts.recipe().warmup_ratio);
        opt.step(exchange, &mut weights, &grads, lr, run.compute)?;
        last_loss = loss;
        let done = step + 1;
        let checkpoint_due = done.is_multiple_of(run.opts.checkpoint_every.max(1)) || done == run.total;
        if rank == 0 {
            let val_accuracy = match (&run.val_slice, checkpoint_due) {
                (Some(slice), true) => Some(validation_accuracy(run, slice, &weights)?),
                _ => None,
            };
            let line = Metrics {
                step: done,
                loss,
                text_loss: losses[0],
                pixel_loss: losses[1],
                lr,
                grad_norm,
                val_accuracy,
            };
            record(run, &line, counts[2] / timer.elapsed().as_secs_f64())?;
        }
        if checkpoint_due {
            let state = TrainState {
                step: done,
                total_steps: run.total,
                epoch: done.saturating_sub(open_steps) / run.steps_per_epoch,
                position: (done.saturating_sub(open_steps) % run.steps_per_epoch) * global as u64,
                data_seed: run.opts.seed,
                ranks: world,
                loss,
                identity: run
                    .opts
                    .run_identity()
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
            };
            last_checkpoint = Some(save_checkpoint(run, coll, exchange, &opt, &frozen, &state)?);
            if rank == 0 {
                redraw_loss_png(&run.out);
            }
        }
    }
    // The trained model in f32 for rank 0 (the others hand back nothing).
    if let Some(dog) = &watchdog {
        dog.arm("gathering the trained model");
    }
    let into = (rank == 0).then_some(Device::Cpu);
    let mut trained = opt.gather(exchange, DType::F32, into)?;
    drop(watchdog);
    trained.extend(frozen);
    Ok((last_loss, trained))
}

/// The watchdog of a rank exchanging through NCCL: armed for each step (its checkpoint
/// included), it aborts the communicator and ends the process with an error when the step has
/// not finished after `timeout_s` seconds (a rank the collectives wait for has died or stalled,
/// and NCCL would wait forever).
fn nccl_watchdog(group: Arc<NcclGroup>, rank: usize, timeout_s: u64) -> Watchdog {
    Watchdog::start(Duration::from_secs(timeout_s), move |what| {
        let aborted = match group.abort() {
            Ok(()) => "NCCL aborted".to_owned(),
            Err(e) => format!("aborting NCCL failed too: {e}"),
        };
        eprintln!(
            "error: rank {rank}: {what} did not finish within {timeout_s} s (--rank-timeout): a rank \
             it exchanges with has died or stalled; {aborted}; resume from the last checkpoint"
        );
        std::process::exit(1);
    })
}

/// The examples' order in `epoch`: a shuffle seeded by `(seed, epoch)` only.
fn shuffled(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mix = seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mix));
    order
}

/// Reads and collates this rank's micro-batches of a step.
fn load_micro_batches(run: &Run, indices: &[usize]) -> Result<Vec<MicroBatch>> {
    indices
        .chunks(run.micro)
        .map(|chunk| {
            let examples = chunk
                .iter()
                .map(|&i| run.data.get(i))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            collate(
                &examples,
                &run.tok,
                run.cfg.vision.image_size,
                run.cfg.vision.tokens(),
                run.opts.recipe().max_len,
            )
        })
        .collect()
}

/// The device of `rank`: the CPU for every rank on the CPU, else the rank-th device from rank 0's.
fn rank_device(first: Device, rank: usize) -> Device {
    match first {
        Device::Cuda(n) => Device::Cuda(n + rank),
        other => other,
    }
}

/// The trainable parameters in the order the backward pass finishes their gradients: the
/// reverse of the order the model takes them in, which is the order its forward pass runs.
fn gradient_ready_order(
    run: &Run,
    device: Device,
    weights: &BTreeMap<String, Tensor>,
) -> Result<Vec<String>> {
    let mut order = training_model(run, device, weights)?.store().first_taken();
    order.retain(|k| run.trainable.binary_search(k).is_ok());
    order.reverse();
    Ok(order)
}

/// The run's model over the compute `weights` (on `device`), taking gradients, recomputing
/// its blocks in the backward pass when the run says so.
fn training_model(run: &Run, device: Device, weights: &BTreeMap<String, Tensor>) -> Result<Emma> {
    let store = ParamStore::new(weights.clone(), true, "training weights");
    store.set_device(device);
    let mut model = Emma::new(&run.cfg, store)?;
    model.set_recompute(run.opts.recipe().recompute);
    Ok(model)
}

/// Forward and backward over this rank's micro-batches with the compute `weights` (already on
/// `device`, in the compute precision), the gradients going to `reduction` (the last
/// micro-batch's as soon as each is final); returns this rank's shares of the text and pixel
/// losses.
fn accumulate(
    run: &Run,
    device: Device,
    weights: &BTreeMap<String, Tensor>,
    batches: &[MicroBatch],
    global_tokens: f64,
    global_images: f64,
    reduction: &mut OverlappedReduction,
) -> Result<(f64, f64)> {
    let (mut text, mut pixel) = (0.0, 0.0);
    for (i, mb) in batches.iter().enumerate() {
        let model = training_model(run, device, weights)?;
        // (term, whether it is a pixel-loss term)
        let mut terms: Vec<(Var, bool)> = Vec::new();
        if let Some(batch) = &mb.with_images {
            let l = model.losses(&Batch {
                siglip_pixels: batch.siglip_pixels.to_dtype(run.compute)?,
                dinov2_pixels: batch.dinov2_pixels.to_dtype(run.compute)?,
                ids: batch.ids.clone(),
                labels: batch.labels.clone(),
            })?;
            if mb.answer_tokens[0] > 0 {
                terms.push((
                    l.text.affine(mb.answer_tokens[0] as f64 / global_tokens, 0.0)?,
                    false,
                ));
            }
            if let Some(p) = l.pixel {
                terms.push((p.affine(1.0 / global_images, 0.0)?, true));
            }
        }
        if let Some((ids, labels)) = &mb.text_only {
            if mb.answer_tokens[1] > 0 {
                let l = model.text_only_losses(ids, labels)?;
                terms.push((
                    l.text.affine(mb.answer_tokens[1] as f64 / global_tokens, 0.0)?,
                    false,
                ));
            }
        }
        let Some(((first, _), rest)) = terms.split_first() else {
            continue;
        };
        let mut objective = first.clone();
        for (t, _) in rest {
            objective = objective.add(t)?;
        }
        for (t, is_pixel) in &terms {
            let v = t.value().to_scalar_f64()?;
            if *is_pixel {
                pixel += v;
            } else {
                text += v;
            }
        }
        if i + 1 < batches.len() {
            objective.backward()?;
            for (k, g) in model.store().grads() {
                reduction.add(&k, &g);
            }
            continue;
        }
        let names = model.store().names_by_var_id();
        objective.backward_notifying(&mut |leaf| {
            let Some(name) = names.get(&leaf.id()) else { return };
            if let Some(g) = leaf.grad() {
                reduction.add(name, &g);
            }
            reduction.ready(name);
        })?;
    }
    Ok((text, pixel))
}

/// Appends a metrics line and updates the progress bar (rank 0).
fn record(run: &Run, m: &Metrics, positions_per_s: f64) -> Result<()> {
    let line = serde_json::to_string(m).map_err(|e| TrainError::Options(e.to_string()))?;
    let path = run.out.join("metrics.jsonl");
    if let Some(metrics) = &run.metrics {
        let mut file = metrics.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(file, "{line}").map_err(io_err(&path))?;
    }
    run.progress.set_message(format!(
        "loss {:.4} pixel {:.4} lr {:.2e} {:.0} tok/s",
        m.text_loss, m.pixel_loss, m.lr, positions_per_s
    ));
    run.progress.set_position(m.step);
    if run.progress.is_hidden() && (m.step.is_multiple_of(50) || m.step == run.total) {
        eprintln!(
            "step {}/{}: loss {:.4} (text {:.4}, pixel {:.4}), lr {:.2e}, grad norm {:.3}, {:.0} tok/s",
            m.step, run.total, m.loss, m.text_loss, m.pixel_loss, m.lr, m.grad_norm, positions_per_s
        );
    }
    if let Some(a) = m.val_accuracy {
        let line = format!("step {}: validation-slice accuracy {:.1}%", m.step, 100.0 * a);
        if run.progress.is_hidden() {
            eprintln!("{line}");
        } else {
            run.progress.println(line);
        }
    }
    Ok(())
}

/// Writes a checkpoint: every rank its optimizer shard, rank 0 the model and the state; returns
/// the checkpoint's directory.
fn save_checkpoint(
    run: &Run,
    coll: &dyn Collective,
    exchange: &dyn DeviceCollective,
    opt: &ShardedAdamW,
    frozen: &BTreeMap<String, Tensor>,
    state: &TrainState,
) -> Result<PathBuf> {
    let partial = checkpoint::partial_dir(&run.root, state.step);
    let created = if coll.rank() == 0 {
        std::fs::create_dir_all(&partial).map_err(io_err(&partial))
    } else {
        Ok(())
    };
    agree(coll, created)?;
    let shard = partial.join(format!("optimizer-rank{}.safetensors", coll.rank()));
    agree(coll, opt.save(&shard))?;
    // Every rank's master weights reach rank 0's host memory for the model file.
    let into = (coll.rank() == 0).then_some(Device::Cpu);
    let mut params = agree(coll, opt.gather(exchange, DType::F32, into))?;
    let finished = if coll.rank() == 0 {
        params.extend(frozen.iter().map(|(k, t)| (k.clone(), t.clone())));
        Emma::new(&run.cfg, ParamStore::new(params, false, "checkpoint"))
            .map_err(TrainError::from)
            .and_then(|model| save_model(&model, &run.tok, &partial))
            .and_then(|()| checkpoint::finish(&run.root, state, run.opts.keep))
            .and_then(|dir| {
                // The new run has a checkpoint: the one it replaces may go.
                run.replaced.as_ref().map_or(Ok(()), Replaced::commit)?;
                Ok(dir)
            })
    } else {
        Ok(PathBuf::new())
    };
    agree(coll, finished)?;
    Ok(checkpoint::step_dir(&run.root, state.step))
}
