//! `train --plan` against independent counts: the language model's and projector's parameters
//! against the Hugging Face Mamba and LLaVA projector formulas written out here, the optimizer
//! shards against the parameters they cover, and the activations against what the emulated
//! GPU's allocator measures holding after a real forward pass (`EMMA_GPU=emulate`; skipped with
//! one line when the emulator has no C++ compiler).

use emma::config::{EmmaConfig, LmConfig, LmKind, PRESETS};
use emma::model::{Batch, Emma, IGNORE_INDEX};
use tensor::{seeded_rng, DType, Device, Tensor};
use train::plan::{parameter_sizes, MemoryPlan, Setup};

/// The parameters of a Hugging Face `MambaForCausalLM` / `Mamba2ForCausalLM` with tied
/// embeddings, from the published layer shapes.
fn hf_lm_parameters(lm: &LmConfig) -> usize {
    let (h, i, n, k) = (lm.hidden, 2 * lm.hidden, lm.state, 4);
    let per_layer = match lm.kind {
        LmKind::Mamba1 => {
            // in_proj, conv1d (+bias), x_proj, dt_proj (+bias), A_log, D, out_proj, norm
            h * 2 * i + i * k + i + i * (lm.dt_rank + 2 * n) + lm.dt_rank * i + i + i * n + i + i * h + h
        }
        LmKind::Mamba2 => {
            let heads = i / lm.head_dim;
            let conv = i + 2 * lm.groups * n;
            // in_proj (z, xBC, dt), conv1d (+bias), dt_bias, A_log, D, gated norm, out_proj, norm
            h * (i + conv + heads) + conv * k + conv + 3 * heads + i + i * h + h
        }
    };
    lm.vocab * h + lm.layers * per_layer + h
}

#[test]
fn parameter_counts_match_the_published_layer_shapes() {
    for name in PRESETS {
        let cfg = EmmaConfig::preset(name).unwrap();
        let sizes = parameter_sizes(&cfg).unwrap();
        let under = |prefix: &str| -> usize {
            sizes
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(_, n)| n)
                .sum()
        };
        assert_eq!(under("lm."), hf_lm_parameters(&cfg.lm), "{name}: language model");
        let (f, ph, h) = (cfg.vision.feature_dim(), cfg.projector_hidden, cfg.lm.hidden);
        assert_eq!(
            under("projector."),
            f * ph + ph + ph * h + h + h * h + h,
            "{name}: projector"
        );
        for ranks in [1, 3, 8] {
            let setup = Setup {
                cfg: cfg.clone(),
                compute_bytes: 2,
                ranks,
                micro_batch: 1,
                accumulation: 1,
                text_tokens: 16,
                recompute: false,
            };
            let plan = MemoryPlan::of(&setup).unwrap();
            let frozen = if cfg.vision.frozen { under("vision.") } else { 0 };
            assert_eq!(plan.parameters, sizes.values().sum::<usize>());
            assert_eq!(plan.trainable, plan.parameters - frozen, "{name}");
            assert_eq!(plan.weights, 2 * plan.parameters);
            assert_eq!(plan.gradients, 4 * plan.trainable);
            assert_eq!(plan.moments, 8 * plan.owned);
            // The busiest shard holds at least an even share and at most an even share plus
            // the largest tensor.
            let largest = sizes.values().max().copied().unwrap();
            assert!(plan.owned * ranks >= plan.trainable, "{name}, {ranks} ranks");
            assert!(
                plan.owned <= plan.trainable / ranks + largest,
                "{name}, {ranks} ranks"
            );
        }
    }
}

/// A random batch of `b` examples of `t` text tokens, half of them answer tokens.
fn batch(cfg: &EmmaConfig, b: usize, t: usize) -> Batch {
    let mut rng = seeded_rng(3);
    let s = cfg.vision.image_size;
    let ids: Vec<u32> = (0..b * t)
        .map(|i| (i * 7 + 3) as u32 % cfg.lm.vocab as u32)
        .collect();
    let labels: Vec<u32> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| if i % t < t / 2 { IGNORE_INDEX } else { id })
        .collect();
    let pixels = |rng: &mut tensor::Rng| {
        Tensor::randn(&[b, 3, s, s], DType::F32, 0.0, 1.0, rng)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    };
    Batch {
        siglip_pixels: pixels(&mut rng),
        dinov2_pixels: pixels(&mut rng),
        ids: Tensor::from_vec(ids, &[b, t]).unwrap(),
        labels: Tensor::from_vec(labels, &[b, t]).unwrap(),
    }
}

/// Bytes the emulated GPU holds after the forward pass of a bf16 model of `cfg` on a batch
/// (beyond the weights), and its peak during forward and backward.
fn measure(cfg: &EmmaConfig, b: usize, t: usize, recompute: bool) -> (usize, usize) {
    let dev = tensor::cuda_device(0).unwrap();
    let mut model = Emma::random_on(cfg, 5, DType::BF16, true, Device::Cuda(0)).unwrap();
    model.set_recompute(recompute);
    let data = batch(cfg, b, t);
    let weights = dev.memory_stats().in_use;
    dev.reset_peak_memory();
    let losses = model.losses(&data).unwrap();
    let kept = dev.memory_stats().in_use - weights;
    losses.total.backward().unwrap();
    drop(losses);
    let peak = dev.memory_stats().peak_in_use - weights;
    (kept, peak)
}

#[test]
fn activations_match_what_the_emulated_gpu_holds() {
    if let Err(e) = tensor::cuda_device(0) {
        if std::env::var("EMMA_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("EMMA_REQUIRE_GPU=1 but no usable GPU: {e}");
        }
        println!("skipped: {e}");
        return;
    }
    let mut tiny = EmmaConfig::preset("tiny").unwrap();
    tiny.vision.frozen = false;
    let mut frozen_mamba2 = EmmaConfig::preset("tiny").unwrap();
    frozen_mamba2.vision.frozen = true;
    frozen_mamba2.lm.kind = LmKind::Mamba2;
    for (cfg, what) in [
        (&tiny, "tiny, towers trained"),
        (&frozen_mamba2, "tiny Mamba-2, towers frozen"),
    ] {
        for (b, t, recompute) in [(2, 24, false), (4, 40, false), (4, 40, true)] {
            let setup = Setup {
                cfg: cfg.clone(),
                compute_bytes: 2,
                ranks: 1,
                micro_batch: b,
                accumulation: 1,
                text_tokens: t,
                recompute,
            };
            let plan = MemoryPlan::of(&setup).unwrap();
            let (kept, peak) = measure(cfg, b, t, recompute);
            let error = (plan.activations as f64 - kept as f64) / kept as f64;
            // The emulated device allocates no gradient buckets and no cuBLAS workspace.
            let bound = plan.activations + plan.gradients + plan.transient;
            println!(
                "{what}, batch {b}, {t} text tokens, recompute {recompute}: planned {} B, held \
                 {kept} B ({:+.1}%); step peak {peak} B, planned {bound} B",
                plan.activations,
                100.0 * error,
            );
            assert!(
                error.abs() < 0.1,
                "{what}: activations off by {:.1}%",
                100.0 * error
            );
            assert!(
                peak <= bound,
                "{what}: the step peaked at {peak} B, above the plan's {bound} B"
            );
        }
    }
}

/// `train --plan ARGS`' output, which must succeed.
fn plan(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("--plan")
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "train --plan {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn the_paper_presets_defaults_fit_the_paper_s_gpus_and_one_80_gb_gpu() {
    for preset in ["emma-v1-2.8b", "emma-v2-2.7b"] {
        // The paper: 8 x 40 GB A100s, global batch 128, 729 image + 2048 text tokens.
        let paper = plan(&["--preset", preset, "--ranks", "8", "--gpu-memory", "40"]);
        assert!(paper.contains("729 image + 2048 text tokens"), "{paper}");
        assert!(paper.contains("128 examples per step"), "{paper}");
        assert!(paper.contains("\nfits 40 GiB"), "{paper}");
        let one = plan(&["--preset", preset, "--ranks", "1", "--gpu-memory", "80"]);
        assert!(one.contains("1 rank(s) x 32 micro-batch(es)"), "{one}");
        assert!(one.contains("\nfits 80 GiB"), "{one}");
        // Keeping every activation does not fit the paper's GPUs, even one example at a time.
        let kept = plan(&[
            "--preset",
            preset,
            "--ranks",
            "8",
            "--gpu-memory",
            "40",
            "--no-recompute",
            "--micro-batch",
            "1",
        ]);
        assert!(kept.contains("does NOT fit 40 GiB"), "{kept}");
    }
}
