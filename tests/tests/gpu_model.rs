//! The whole EMMA model on `cuda:0` against the same model on the CPU: every layer (vision
//! towers, projector, Mamba LM with its scans, fusion, pixel decoder with its Mamba-2 mixers and
//! cross-attention), the losses, every parameter's gradient, and cached generation. The model
//! is built from the same seeded parameters on both devices and fed the same random batch;
//! nothing in `nn` or `emma` knows which device it runs on.
//!
//! The error is the relative L2 error ‖gpu − cpu‖ / ‖cpu‖ of each tensor, in f32. Sums run in a
//! different order on the GPU, so gradients get 1e-4 and the losses 1e-5. NaN never passes.
//! Without a GPU every test prints one line `skipped: <reason>` and passes; with
//! `EMMA_REQUIRE_GPU=1` it fails instead.

use emma::config::EmmaConfig;
use emma::model::{Batch, Emma, IGNORE_INDEX};
use tensor::{seeded_rng, DType, Device, Tensor};
use tests::gpu::{gpu_ready, GPU};
use tests::{ids_tensor, random_ids, rel_error};

/// A random batch of `b` images and `t` text tokens with answer-only labels, on the host.
fn batch(cfg: &EmmaConfig, b: usize, t: usize, seed: u64) -> Batch {
    let mut rng = seeded_rng(seed);
    let s = cfg.vision.image_size;
    let ids = ids_tensor(&random_ids(b * t, cfg.lm.vocab, seed), &[b, t]);
    let mut labels = ids.to_vec::<u32>().unwrap();
    for (i, l) in labels.iter_mut().enumerate() {
        if i % t < t / 2 {
            *l = IGNORE_INDEX;
        }
    }
    Batch {
        siglip_pixels: Tensor::randn(&[b, 3, s, s], DType::F32, 0.0, 1.0, &mut rng).unwrap(),
        dinov2_pixels: Tensor::randn(&[b, 3, s, s], DType::F32, 0.0, 1.0, &mut rng).unwrap(),
        ids,
        labels: Tensor::from_vec(labels, &[b, t]).unwrap(),
    }
}

#[test]
fn losses_and_every_gradient_match_the_cpu() {
    if !gpu_ready() {
        return;
    }
    for lm in ["tiny", "tiny-mamba2"] {
        let mut cfg = EmmaConfig::preset("tiny").unwrap();
        if lm == "tiny-mamba2" {
            cfg.lm.kind = emma::config::LmKind::Mamba2;
        }
        // Train the towers too, so that their backward runs on the GPU as well.
        cfg.vision.frozen = false;
        let data = batch(&cfg, 3, 9, 11);
        let run = |device| {
            let model = Emma::random_on(&cfg, 5, DType::F32, true, device).unwrap();
            let losses = model.losses(&data).unwrap();
            losses.total.backward().unwrap();
            let pixel = losses.pixel.expect("the tiny preset has the pixel loss");
            (
                losses.text.value().clone(),
                pixel.value().clone(),
                model.store().grads(),
            )
        };
        let (text_cpu, pixel_cpu, grads_cpu) = run(Device::Cpu);
        let (text_gpu, pixel_gpu, grads_gpu) = run(GPU);
        assert_eq!(
            text_gpu.device(),
            GPU,
            "{lm}: the loss was not computed on the GPU"
        );
        for (what, gpu, cpu) in [("text", &text_gpu, &text_cpu), ("pixel", &pixel_gpu, &pixel_cpu)] {
            let err = rel_error(gpu, cpu);
            assert!(err < 1e-5, "{lm}: {what} loss relative error {err:e}");
        }
        assert_eq!(
            grads_gpu.keys().collect::<Vec<_>>(),
            grads_cpu.keys().collect::<Vec<_>>(),
            "{lm}: different parameters got gradients"
        );
        for (name, cpu) in &grads_cpu {
            let gpu = &grads_gpu[name].to_device(Device::Cpu).unwrap();
            // A key projection's bias adds the same q·b to every score of a row, which the
            // softmax removes: its gradient is zero up to rounding on both devices, so it is
            // measured against the scale of the key weight's gradient instead.
            let err = match key_bias_weight(name) {
                Some(weight) => diff_norm(gpu, cpu) / norm(&grads_cpu[&weight]),
                None => rel_error(gpu, cpu),
            };
            assert!(err < 1e-4, "{lm}: gradient of {name}: relative error {err:e}");
        }
    }
}

/// The name of the weight next to `name` when `name` is an attention key projection's bias.
fn key_bias_weight(name: &str) -> Option<String> {
    ["k_proj.bias", "attention.key.bias"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
        .then(|| format!("{}weight", name.trim_end_matches("bias")))
}

/// The L2 norm of a tensor, in f64.
fn norm(t: &Tensor) -> f64 {
    t.to_vec_f64().iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// The L2 norm of `a - b` (same shape), in f64.
fn diff_norm(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_vec_f64(), b.to_vec_f64());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn cached_decoding_matches_the_cpu() {
    if !gpu_ready() {
        return;
    }
    let cfg = EmmaConfig::preset("tiny").unwrap();
    let data = batch(&cfg, 2, 5, 3);
    let run = |device| {
        let model = Emma::random_on(&cfg, 9, DType::F32, false, device).unwrap();
        let lm = model.lm();
        let image = model
            .image_tokens(&data.siglip_pixels, &data.dinov2_pixels)
            .unwrap()
            .value()
            .clone();
        let text = lm
            .embed(&data.ids.to_device(device).unwrap())
            .unwrap()
            .value()
            .clone();
        let (hidden, mut cache) = lm.prefill(&Tensor::concat(&[&image, &text], 1).unwrap()).unwrap();
        // The prefill's last hidden states, then the logits of three cached steps.
        let mut outputs = vec![hidden];
        for t in 0..3 {
            let next = text
                .narrow(1, t, 1)
                .unwrap()
                .reshape(&[2, cfg.lm.hidden])
                .unwrap();
            outputs.push(lm.step(&next, &mut cache).unwrap());
        }
        outputs
    };
    let (cpu, gpu) = (run(Device::Cpu), run(GPU));
    for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        assert_eq!(g.device(), GPU);
        let err = rel_error(g, c);
        assert!(
            err < 1e-4,
            "output {i} (0: prefill, then steps): relative error {err:e}"
        );
    }
}
