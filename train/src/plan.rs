//! `train --plan`: the bytes one GPU needs for a training setup (preset, precision, ranks,
//! micro-batch, sequence length, recomputation), worked out from the configuration alone, and
//! whether they fit a given memory.
//!
//! The plan assumes the device-resident data-parallel trainer: every rank holds all weights in
//! the compute precision and the trainable parameters' f32 gradients (accumulated over
//! micro-batches and reduced in buckets); the f32 master weights (when the compute precision is
//! not f32) and the two AdamW moments are sharded across ranks as [`crate::zero::partition`]
//! assigns them. Activations are every tensor the backward pass keeps alive: each differentiable
//! op's output (views share their input's memory and cost nothing), counted layer by layer from
//! the code of the layers (see the `*_per_token` functions). With recomputation a Mamba block
//! keeps only its output and recomputes its inside during the backward pass.

use crate::error::Result;
use crate::options::TrainOptions;
use crate::trainer::is_trainable;
use crate::zero::partition;
use emma::config::{EmmaConfig, LmConfig, LmKind, PixelTarget, VitConfig};
use nn::ParamStore;
use std::collections::BTreeMap;
use std::fmt;
use tensor::Device;

/// f32 bytes.
const F32: usize = 4;
/// Bytes of one bucket of the sharded exchanges (the plan counts two: the reduction that
/// overlaps the backward pass holds one being exchanged while the next is packed, no more).
pub const BUCKET_BYTES: usize = 25 << 20;
/// cuBLAS's workspace on Hopper.
const CUBLAS_WORKSPACE: usize = 32 << 20;
/// Memory the verdict leaves free for what the plan does not count: the CUDA context and
/// NCCL's buffers (about 0.5 GiB each on an H100) and the caching allocator's rounding.
pub const RESERVE: usize = 2 << 30;

/// A training setup to plan for.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The model, with the run's switches applied (fusion, pixel loss, frozen towers).
    pub cfg: EmmaConfig,
    /// Bytes per element of the compute precision (2 for bf16, 4 for f32).
    pub compute_bytes: usize,
    /// Data-parallel ranks (one GPU each).
    pub ranks: usize,
    /// Examples per forward pass on each rank.
    pub micro_batch: usize,
    /// Micro-batches accumulated per optimizer step.
    pub accumulation: usize,
    /// Text tokens per example (the longest text the collator keeps).
    pub text_tokens: usize,
    /// Whether each language-model block recomputes its activations in the backward pass.
    pub recompute: bool,
}

impl Setup {
    /// The setup `opts` describe, on GPUs: `--precision auto` computes in bf16 there.
    pub fn from_options(opts: &TrainOptions) -> Result<Setup> {
        // The plan is for GPUs.
        let compute_bytes = opts.compute_dtype(Device::Cuda(0))?.size_in_bytes();
        let (micro_batch, accumulation) = opts.batching()?;
        Ok(Setup {
            cfg: opts.model_config()?,
            compute_bytes,
            ranks: opts.ranks,
            micro_batch,
            accumulation,
            text_tokens: opts.recipe().max_len,
            recompute: opts.recipe().recompute,
        })
    }

    /// One line naming the setup.
    pub fn describe(&self) -> String {
        format!(
            "{} in {}, {} rank(s) x {} micro-batch(es) of {} = {} examples per step, sequences of \
             {} image + {} text tokens, {}",
            self.cfg.name,
            if self.compute_bytes == F32 { "f32" } else { "bf16" },
            self.ranks,
            self.accumulation,
            self.micro_batch,
            self.ranks * self.accumulation * self.micro_batch,
            self.cfg.vision.tokens(),
            self.text_tokens,
            if self.recompute {
                "blocks recomputed"
            } else {
                "all activations kept"
            },
        )
    }
}

/// `train --plan`: the plan of the setup `opts` describe, and whether it fits `--gpu-memory`,
/// as text.
pub fn report(opts: &TrainOptions) -> Result<String> {
    let setup = Setup::from_options(opts)?;
    let plan = MemoryPlan::of(&setup)?;
    let limit = ((opts.gpu_memory * (1u64 << 30) as f64) as usize).saturating_sub(RESERVE);
    let verdict = if plan.total() <= limit {
        format!(
            "fits {} GiB per GPU ({} to spare beyond {} kept for the CUDA context, NCCL and \
             allocator rounding)",
            opts.gpu_memory,
            gib(limit - plan.total()),
            gib(RESERVE)
        )
    } else {
        let hint = if setup.recompute {
            "a smaller --micro-batch or more --ranks"
        } else {
            "--recompute, a smaller --micro-batch or more --ranks"
        };
        format!(
            "does NOT fit {} GiB per GPU: {} short (with {} kept for the CUDA context, NCCL \
             and allocator rounding); try {hint}",
            opts.gpu_memory,
            gib(plan.total() - limit),
            gib(RESERVE)
        )
    };
    Ok(format!("{}\n{plan}\n{verdict}", setup.describe()))
}

/// The bytes per GPU of a [`Setup`], by kind.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Every parameter.
    pub parameters: usize,
    /// The trained parameters.
    pub trainable: usize,
    /// Trained parameters owned by the busiest rank (its share of master weights and moments).
    pub owned: usize,
    /// All weights in the compute precision.
    pub weights: usize,
    /// f32 gradients of the trained parameters.
    pub gradients: usize,
    /// f32 master weights of this rank's share (none when computing in f32: the weights are
    /// the master copy).
    pub master_weights: usize,
    /// The two f32 AdamW moments of this rank's share.
    pub moments: usize,
    /// What one micro-batch's forward pass keeps for the backward pass.
    pub activations: usize,
    /// The largest transient during the backward pass: the logits' gradient and the loss's
    /// f32 temporaries, and with recomputation one block's activations.
    pub transient: usize,
}

impl MemoryPlan {
    /// The plan of `setup`.
    pub fn of(setup: &Setup) -> Result<MemoryPlan> {
        let cfg = &setup.cfg;
        let sizes = parameter_sizes(cfg)?;
        let trained: BTreeMap<String, usize> = sizes
            .iter()
            .filter(|(k, _)| is_trainable(cfg, k))
            .map(|(k, &n)| (k.clone(), n))
            .collect();
        let owner = partition(&trained, setup.ranks);
        let owned = (0..setup.ranks)
            .map(|r| {
                trained
                    .iter()
                    .filter(|(k, _)| owner[*k] == r)
                    .map(|(_, n)| n)
                    .sum()
            })
            .max()
            .unwrap_or(0);
        let parameters: usize = sizes.values().sum();
        let trainable: usize = trained.values().sum();
        let b = setup.compute_bytes;
        let acts = Activations::of(setup);
        Ok(MemoryPlan {
            parameters,
            trainable,
            owned,
            weights: parameters * b,
            gradients: trainable * F32,
            master_weights: if b == F32 { 0 } else { owned * F32 },
            moments: 2 * owned * F32,
            activations: acts.kept,
            transient: acts.transient,
        })
    }

    /// The transient, two gradient buckets and cuBLAS's workspace.
    pub fn workspace(&self) -> usize {
        self.transient + 2 * BUCKET_BYTES + CUBLAS_WORKSPACE
    }

    /// The sum of every kind.
    pub fn total(&self) -> usize {
        self.weights
            + self.gradients
            + self.master_weights
            + self.moments
            + self.activations
            + self.workspace()
    }

    /// The rows of the table: what, bytes.
    pub fn rows(&self) -> [(&'static str, usize); 6] {
        [
            ("weights (compute precision)", self.weights),
            ("gradients (f32)", self.gradients),
            ("master weights (f32, this rank's share)", self.master_weights),
            ("AdamW moments (f32, this rank's share)", self.moments),
            ("activations (one micro-batch)", self.activations),
            ("workspace", self.workspace()),
        ]
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "parameters: {} ({} trained, {} on the busiest rank's optimizer shard)",
            self.parameters, self.trainable, self.owned
        )?;
        for (what, bytes) in self.rows() {
            writeln!(f, "  {what:<42} {:>10}", gib(bytes))?;
        }
        write!(f, "  {:<42} {:>10}", "total per GPU", gib(self.total()))
    }
}

/// `bytes` in GiB, two decimals.
pub fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Every parameter of `cfg` with its element count, from the model built over shape-only
/// placeholders (no memory).
pub fn parameter_sizes(cfg: &EmmaConfig) -> Result<BTreeMap<String, usize>> {
    let store = ParamStore::placeholders(format!("preset {}", cfg.name));
    let model = emma::model::Emma::new(cfg, store)?;
    Ok(model
        .store()
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, t.numel()))
        .collect())
}

/// Activation bytes of one micro-batch: what the forward pass keeps, and the largest
/// transient on top of it during the backward pass.
struct Activations {
    kept: usize,
    transient: usize,
}

impl Activations {
    fn of(s: &Setup) -> Activations {
        let cfg = &s.cfg;
        let (b, batch) = (s.compute_bytes, s.micro_batch);
        let (n, t) = (cfg.vision.tokens(), s.text_tokens);
        let seq = n + t;
        let lm = &cfg.lm;
        let h = lm.hidden;
        // Per example, in elements of the compute precision unless said otherwise.
        let mut kept = 0;
        // The u32 ids and labels (the embedding and the loss keep them; the pixels are not kept,
        // only the patches cut from them, counted with the layers that cut them).
        kept += 2 * t * F32 / b;
        kept += vision_per_example(cfg, b);
        kept += projector_per_token(cfg) * n;
        // The text embeddings, their concatenation after the image tokens, the final norm.
        kept += t * h + seq * h + seq * h;
        let block = lm_block_per_token(lm);
        kept += if s.recompute { h } else { block } * seq * lm.layers;
        // exp(A_log) and its negation, per layer (independent of the batch; counted per
        // example as a bound).
        kept += 2 * lm_a_elements(lm) * lm.layers;
        // The logits of the text positions.
        kept += t * lm.vocab;
        if cfg.alignment.pixel_loss {
            kept += alignment_per_example(cfg, b);
        }
        // The backward pass of the loss: the logits' gradient, and the cross-entropy's f32
        // probabilities; with recomputation, one block's activations on top.
        let mut transient = t * lm.vocab * (b + F32);
        if s.recompute {
            transient += block * seq * b;
        }
        // The Mamba-1 scan backward's f32 partial sums of dB and dC, per group of channels.
        let scan_partials = match lm.kind {
            LmKind::Mamba1 => {
                let groups = cuda::kernels::scan_backward_groups(batch, 2 * h);
                2 * groups * batch * lm.state * seq * F32
            }
            LmKind::Mamba2 => 0,
        };
        Activations {
            kept: kept * b * batch,
            transient: transient * batch + scan_partials,
        }
    }
}

/// A bias-carrying linear layer keeps its product and the sum with the bias.
fn linear(out: usize, bias: bool) -> usize {
    out * (1 + usize::from(bias))
}

/// Elements one language-model block keeps per token: the norm, the mixer's tensors and the
/// residual sum.
fn lm_block_per_token(lm: &LmConfig) -> usize {
    let h = lm.hidden;
    let inner = 2 * h;
    let mixer = match lm.kind {
        // in_proj, conv, SiLU, x_proj, dt_proj (with bias), the scan, out_proj.
        LmKind::Mamba1 => {
            linear(2 * inner, false)
                + inner
                + inner
                + linear(lm.dt_rank + 2 * lm.state, false)
                + linear(inner, true)
                + inner
                + h
        }
        LmKind::Mamba2 => mamba2_per_token(h, inner / lm.head_dim, lm.groups, lm.state),
    };
    h + mixer + h
}

/// Elements a Mamba-2 mixer keeps per token: in_proj, conv, SiLU, the copies of x, B and C out
/// of the transposed convolution, the scan, the gated norm, out_proj.
fn mamba2_per_token(h: usize, heads: usize, groups: usize, state: usize) -> usize {
    let inner = 2 * h;
    let conv = inner + 2 * groups * state;
    linear(inner + conv + heads, false) + conv + conv + conv + inner + inner + h
}

/// Elements of `-exp(A_log)` of one language-model layer.
fn lm_a_elements(lm: &LmConfig) -> usize {
    match lm.kind {
        LmKind::Mamba1 => 2 * lm.hidden * lm.state,
        LmKind::Mamba2 => 2 * lm.hidden / lm.head_dim,
    }
}

/// Elements the projector keeps per image token: its input features, then
/// fc1, GELU, fc2, GELU, fc3 (each linear with a bias).
fn projector_per_token(cfg: &EmmaConfig) -> usize {
    let (ph, h) = (cfg.projector_hidden, cfg.lm.hidden);
    cfg.vision.feature_dim() + linear(ph, true) + ph + linear(h, true) + h + linear(h, true)
}

/// Elements a self- or cross-attention block keeps per query token (queries and keys
/// alike): q, k and v (with biases), the attention output, its copy back to `[tokens, width]`,
/// the output projection; plus the f32 log-sum-exp per head.
fn attention_per_token(dim: usize, heads: usize, b: usize) -> usize {
    3 * linear(dim, true) + dim + dim + linear(dim, true) + heads * F32 / b
}

/// Elements the trained vision towers keep per example (none when frozen: they run without a
/// graph). The last block feeds only the unused final norm, so its tensors are not kept.
fn vision_per_example(cfg: &EmmaConfig, b: usize) -> usize {
    if cfg.vision.frozen {
        return 0;
    }
    let v = &cfg.vision;
    let n = v.tokens();
    let patch = 3 * v.patch * v.patch;
    let tower = |vit: &VitConfig, scaled: bool| {
        let tokens = n + if scaled { 1 + vit.registers } else { 0 };
        // norm, attention, (layer scale), residual, norm, fc1, GELU, fc2, (layer scale), residual
        let per_token = vit.dim
            + attention_per_token(vit.dim, vit.heads, b)
            + usize::from(scaled) * vit.dim
            + vit.dim
            + vit.dim
            + linear(vit.mlp, true)
            + vit.mlp
            + linear(vit.dim, true)
            + usize::from(scaled) * vit.dim
            + vit.dim;
        // The patches (a copy of the pixels), their embedding and the position sum; DINOv2
        // also concatenates its CLS and register tokens.
        let embed = n * (patch + linear(vit.dim, true) + vit.dim) + usize::from(scaled) * tokens * vit.dim;
        embed + vit.layers.saturating_sub(1) * tokens * per_token
    };
    tower(&v.siglip, false) + tower(&v.dinov2, true)
}

/// Elements the alignment (fusion and pixel decoder) keeps per example.
fn alignment_per_example(cfg: &EmmaConfig, b: usize) -> usize {
    let a = &cfg.alignment;
    let (n, d) = (cfg.vision.tokens(), cfg.lm.hidden);
    let scales = a.layers.len() + 1;
    // A feature norm per scale, then their concatenation and the fusion layer.
    let mut per_token = scales * d;
    if a.mff {
        per_token += scales * d + linear(scales * d, true);
    }
    let heads = 2 * d / a.mamba_head_dim;
    let block =
        d + d + attention_per_token(d, a.heads, b) + d + d + mamba2_per_token(d, heads, 1, a.state) + d;
    per_token += scales * block;
    // The output norm and head, then the target (a patch embedding of the pixels, or the
    // pixels), its normalisation, the error and its square.
    let target = match a.target {
        PixelTarget::PatchEmbedding => cfg.vision.siglip.dim,
        PixelTarget::Pixels => 3 * cfg.vision.patch * cfg.vision.patch,
    };
    per_token += d + linear(target, true);
    if a.target == PixelTarget::PatchEmbedding {
        per_token += 3 * cfg.vision.patch * cfg.vision.patch + linear(target, true);
    }
    per_token += 3 * target;
    // The learned query plus the position embeddings (shared by the batch; counted per
    // example as a bound).
    per_token * n + n * d
}
