//! The assembled EMMA model on the tiny preset: gradients of the full loss against finite
//! differences for parameters of every component, and the Cobra baseline when the alignment
//! switches are off.

use emma::config::EmmaConfig;
use emma::model::{Batch, Emma, IGNORE_INDEX};
use nn::ParamStore;
use std::collections::BTreeMap;
use tensor::{seeded_rng, DType, Device, Tensor};

fn batch(cfg: &EmmaConfig, dtype: DType, seed: u64) -> Batch {
    let mut rng = seeded_rng(seed);
    let (b, t, s) = (2, 6, cfg.vision.image_size);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| ((i * 37 + 11) % cfg.lm.vocab) as u32)
        .collect();
    let labels: Vec<u32> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| if i % t < 3 { IGNORE_INDEX } else { id })
        .collect();
    Batch {
        siglip_pixels: Tensor::randn(&[b, 3, s, s], dtype, 0.0, 1.0, &mut rng).unwrap(),
        dinov2_pixels: Tensor::randn(&[b, 3, s, s], dtype, 0.0, 1.0, &mut rng).unwrap(),
        ids: Tensor::from_vec(ids, &[b, t]).unwrap(),
        labels: Tensor::from_vec(labels, &[b, t]).unwrap(),
    }
}

fn total_loss(cfg: &EmmaConfig, params: &BTreeMap<String, Tensor>, batch: &Batch) -> f64 {
    let model = Emma::new(cfg, ParamStore::new(params.clone(), false, "test")).unwrap();
    model
        .losses(batch)
        .unwrap()
        .total
        .value()
        .to_scalar_f64()
        .unwrap()
}

#[test]
fn full_loss_gradients_match_finite_differences() {
    let mut cfg = EmmaConfig::preset("tiny").unwrap();
    // A pixel loss of order one: large enough to matter, small enough that the loss value does
    // not swamp the differences in rounding.
    cfg.alignment.weight = 1e-3;
    // Frozen towers, as the paper presets have them (the tiny preset trains its own).
    cfg.vision.frozen = true;
    let model = Emma::random(&cfg, 7, DType::F64, true).unwrap();
    let batch = batch(&cfg, DType::F64, 8);
    let losses = model.losses(&batch).unwrap();
    assert!(losses.pixel.is_some());
    losses.total.backward().unwrap();
    let grads = model.store().grads();
    let params = model.store().tensors();
    assert!(
        !grads.keys().any(|k| k.starts_with("vision.")),
        "frozen towers got gradients"
    );
    let sampled = [
        "projector.fc1.weight",
        "projector.fc3.bias",
        "lm.backbone.embeddings.weight",
        "lm.backbone.layers.0.mixer.in_proj.weight",
        "lm.backbone.layers.2.mixer.A_log",
        "lm.backbone.layers.3.mixer.dt_proj.bias",
        "alignment.feature_norms.1.weight",
        "alignment.fusion.weight",
        "alignment.decoder.query",
        "alignment.decoder.blocks.0.cross_attn.k_proj.weight",
        "alignment.decoder.blocks.3.mixer.in_proj.weight",
        "alignment.decoder.head.weight",
        "alignment.target_patch_embed.weight",
    ];
    for name in sampled {
        let analytic = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .to_vec_f64();
        let base = params[name].to_vec_f64();
        for j in [0, base.len() / 2, base.len() - 1] {
            let at = |step: f64| {
                let mut p = params.clone();
                let mut v = base.clone();
                v[j] += step;
                p.insert(
                    name.to_string(),
                    Tensor::from_vec(v, params[name].shape()).unwrap(),
                );
                total_loss(&cfg, &p, &batch)
            };
            let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
            let err = (numeric - analytic[j]).abs() / numeric.abs().max(1e-4);
            assert!(
                err < 1e-4,
                "{name}[{j}]: analytic {} vs numeric {numeric}",
                analytic[j]
            );
        }
    }
}

#[test]
fn without_mff_and_pixel_loss_it_is_cobra() {
    let mut cfg = EmmaConfig::preset("tiny").unwrap();
    cfg.alignment.mff = false;
    cfg.alignment.pixel_loss = false;
    let model = Emma::random(&cfg, 1, DType::F32, true).unwrap();
    let names: Vec<String> = model.store().tensors().into_keys().collect();
    assert!(
        !names.iter().any(|k| k.starts_with("alignment.")),
        "decoder parameters present"
    );
    let losses = model.losses(&batch(&cfg, DType::F32, 2)).unwrap();
    assert!(losses.pixel.is_none());
    assert_eq!(
        losses.total.value().to_vec_f64(),
        losses.text.value().to_vec_f64()
    );

    // Without MFF but with the pixel loss: the decoder is there, the fusion map is not.
    cfg.alignment.pixel_loss = true;
    let model = Emma::random(&cfg, 1, DType::F32, true).unwrap();
    let names: Vec<String> = model.store().tensors().into_keys().collect();
    assert!(names.iter().any(|k| k.starts_with("alignment.decoder.")));
    assert!(!names.iter().any(|k| k.starts_with("alignment.fusion")));
}

#[test]
fn a_saved_model_loads_back_with_the_same_losses() {
    let cfg = EmmaConfig::preset("tiny").unwrap();
    let model = Emma::random(&cfg, 3, DType::F32, false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    emma::checkpoint::save(&model, dir.path()).unwrap();
    let loaded = emma::checkpoint::load(dir.path(), false, Device::Cpu).unwrap();
    let b = batch(&cfg, DType::F32, 4);
    let (x, y) = (model.losses(&b).unwrap(), loaded.losses(&b).unwrap());
    assert_eq!(x.total.value().to_vec_f64(), y.total.value().to_vec_f64());

    // A checkpoint missing a decoder tensor fails naming it.
    let mut tensors = tensor::safetensors::load(dir.path().join("model.safetensors")).unwrap();
    tensors.remove("alignment.decoder.head.weight");
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    tensor::safetensors::save(dir.path().join("model.safetensors"), &named, None).unwrap();
    let err = format!(
        "{:#}",
        emma::checkpoint::load(dir.path(), false, Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(err.contains("alignment.decoder.head.weight"), "{err}");
}

#[test]
fn towers_and_lm_load_from_hugging_face_directories() {
    // The committed parity fixtures are tiny HF models; a config shaped like them takes them in.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let mut cfg = EmmaConfig::preset("tiny").unwrap();
    cfg.vision.image_size = 28;
    cfg.vision.patch = 7;
    cfg.vision.siglip = emma::config::VitConfig {
        dim: 32,
        layers: 3,
        heads: 4,
        mlp: 64,
        registers: 0,
    };
    cfg.vision.dinov2 = emma::config::VitConfig {
        dim: 32,
        layers: 3,
        heads: 4,
        mlp: 64,
        registers: 2,
    };
    cfg.projector_hidden = 4 * 64;
    cfg.lm = emma::config::LmConfig {
        hidden: 16,
        layers: 2,
        vocab: 64,
        state: 8,
        dt_rank: 4,
        ..cfg.lm
    };
    cfg.alignment.layers = vec![1];
    cfg.alignment.heads = 2;
    cfg.alignment.head_dim = 8;
    cfg.alignment.mamba_head_dim = 8;
    let parts = emma::checkpoint::Pretrained {
        siglip: Some(&fixtures.join("siglip")),
        dinov2: Some(&fixtures.join("dinov2_registers")),
        lm: Some(&fixtures.join("mamba")),
    };
    let model = emma::checkpoint::from_pretrained_parts(&cfg, &parts, 0, false).unwrap();
    let lm = tensor::safetensors::load(fixtures.join("mamba/model.safetensors")).unwrap();
    let key = "backbone.layers.1.mixer.x_proj.weight";
    assert_eq!(
        model.store().tensors()[&format!("lm.{key}")].to_vec_f64(),
        lm[key].to_vec_f64()
    );
    let losses = model.losses(&batch(&cfg, DType::F32, 5)).unwrap();
    assert!(losses.total.value().to_scalar_f64().unwrap().is_finite());
}

#[test]
fn the_backward_pass_finishes_gradients_in_the_reverse_of_the_order_the_model_takes_them() {
    let cfg = EmmaConfig::preset("tiny").unwrap();
    let model = Emma::random(&cfg, 9, DType::F32, true).unwrap();
    let store = model.store();
    // Built, the model has taken every parameter; the trainer orders its gradient buckets so.
    let taken = store.first_taken();
    let mut all = store.names();
    all.sort();
    let mut sorted = taken.clone();
    sorted.sort();
    assert_eq!(sorted, all);
    let names = store.names_by_var_id();
    let mut announced = Vec::new();
    let losses = model.losses(&batch(&cfg, DType::F32, 10)).unwrap();
    losses
        .total
        .backward_notifying(&mut |leaf| announced.push(names[&leaf.id()].clone()))
        .unwrap();
    let mut with_grads: Vec<String> = store.grads().into_keys().collect();
    let mut each_once = announced.clone();
    each_once.sort();
    each_once.dedup();
    with_grads.sort();
    assert_eq!(each_once.len(), announced.len(), "a parameter announced twice");
    assert_eq!(each_once, with_grads);
    // Through the LM, later blocks finish first, as the reverse of the taking order says.
    let layers = cfg.lm.layers;
    let at = |list: &[String], prefix: &str| list.iter().position(|k| k.contains(prefix)).unwrap();
    let (first, last) = ("backbone.layers.0.", format!("backbone.layers.{}.", layers - 1));
    assert!(at(&announced, &last) < at(&announced, first), "{announced:?}");
    assert!(at(&taken, first) < at(&taken, &last), "{taken:?}");
}
