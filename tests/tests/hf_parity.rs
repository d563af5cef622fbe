//! Parity with Hugging Face `transformers`: tiny random models saved with `save_pretrained`
//! and their reference outputs and gradients (made by `scripts/make_fixtures.py`, committed in
//! `tests/fixtures/`) must be reproduced: outputs to a relative error < 1e-4, gradients < 1e-3.
//! Also: a checkpoint with a tensor removed, renamed or reshaped fails naming that tensor.

use std::path::{Path, PathBuf};
use tensor::safetensors::SafetensorsFile;
use tensor::{Device, Tensor};
use tests::gpu::gpu_ready;
use tests::rel_error;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

fn reference(name: &str) -> SafetensorsFile {
    SafetensorsFile::open(fixture(name).join("reference.safetensors")).expect("fixture reference file")
}

fn ids(r: &SafetensorsFile, name: &str) -> Vec<u32> {
    r.get(name).unwrap().to_vec::<u32>().unwrap()
}

fn check_lm(name: &str, device: Device) {
    let r = reference(name);
    let input = ids(&r, "input_ids");
    let logits = emma::commands::logits(&fixture(name), &input, device).unwrap();
    let err = rel_error(&logits, &r.get("logits").unwrap());
    assert!(err < 1e-4, "{name}: logits relative error {err:e}");

    let (loss, grads) = emma::commands::grads(&fixture(name), &input, device).unwrap();
    let expected_loss = r.get("loss").unwrap().to_scalar_f64().unwrap();
    assert!(
        ((loss - expected_loss) / expected_loss).abs() < 1e-4,
        "{name}: loss {loss} vs {expected_loss}"
    );
    let expected: Vec<String> = r
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix("grad.").map(String::from))
        .collect();
    assert!(!expected.is_empty(), "{name}: the fixture has no gradients");
    for key in &expected {
        let got = grads
            .get(key)
            .unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
        let err = rel_error(got, &r.get(&format!("grad.{key}")).unwrap());
        assert!(err < 1e-3, "{name}: gradient of {key}: relative error {err:e}");
    }
    let extra: Vec<&String> = grads.keys().filter(|k| !expected.contains(k)).collect();
    assert!(
        extra.is_empty(),
        "{name}: gradients the reference does not have: {extra:?}"
    );
}

#[test]
fn mamba_logits_and_gradients_match_transformers() {
    check_lm("mamba", Device::Cpu);
}

#[test]
fn mamba2_logits_and_gradients_match_transformers() {
    // Length 13 with chunk size 8 and two groups: a partial last chunk.
    check_mamba2(Device::Cpu);
}

/// The Mamba-2 fixture at length 13 (logits and gradients) and 16 (logits).
fn check_mamba2(device: Device) {
    check_lm("mamba2", device);
    let r = reference("mamba2");
    let logits = emma::commands::logits(&fixture("mamba2"), &ids(&r, "input_ids_16"), device).unwrap();
    let err = rel_error(&logits, &r.get("logits_16").unwrap());
    assert!(err < 1e-4, "mamba2 (length 16): logits relative error {err:e}");
}

fn check_vision(name: &str, device: Device) {
    let r = reference(name);
    // The trained 28x28 grid, an upscaled 42x42 one and a non-square 21x35 (3x5 patches).
    for suffix in ["", "_42", "_21x35"] {
        let pixels = r.get(&format!("pixel_values{suffix}")).unwrap();
        let (last, penultimate) = emma::commands::vision(&fixture(name), &pixels, device).unwrap();
        for (got, key) in [
            (&last, "last_hidden_state"),
            (&penultimate, "penultimate_hidden_state"),
        ] {
            let expected = r.get(&format!("{key}{suffix}")).unwrap();
            assert_eq!(got.shape(), expected.shape(), "{name}: {key}{suffix} shape");
            let err = rel_error(got, &expected);
            assert!(err < 1e-4, "{name}: {key}{suffix} relative error {err:e}");
        }
    }
}

#[test]
fn siglip_features_match_transformers() {
    check_vision("siglip", Device::Cpu);
}

#[test]
fn dinov2_features_match_transformers() {
    check_vision("dinov2", Device::Cpu);
}

#[test]
fn dinov2_with_registers_features_match_transformers() {
    check_vision("dinov2_registers", Device::Cpu);
}

/// The same fixtures with every layer, scan and gradient on `cuda:0` (skipped without a GPU).
#[test]
fn every_fixture_matches_transformers_on_the_gpu() {
    if !gpu_ready() {
        return;
    }
    let gpu = Device::Cuda(0);
    check_lm("mamba", gpu);
    check_mamba2(gpu);
    for name in ["siglip", "dinov2", "dinov2_registers"] {
        check_vision(name, gpu);
    }
}

/// Copies a fixture's model into a temporary directory with its tensors edited by `edit`.
fn edited_copy(name: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(name).join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors: Vec<(String, Tensor)> =
        tensor::safetensors::load(fixture(name).join("model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    edit(&mut tensors);
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    tensor::safetensors::save(dir.path().join("model.safetensors"), &named, None).unwrap();
    dir
}

fn error_of(dir: &Path) -> String {
    format!(
        "{:#}",
        emma::commands::logits(dir, &[1, 2, 3], Device::Cpu).expect_err("loading must fail")
    )
}

#[test]
fn a_removed_renamed_or_reshaped_tensor_is_named() {
    let key = "backbone.layers.1.mixer.x_proj.weight";
    let removed = edited_copy("mamba", |t| t.retain(|(k, _)| k != key));
    let msg = error_of(removed.path());
    assert!(msg.contains("missing parameter") && msg.contains(key), "{msg}");

    let renamed = edited_copy("mamba", |t| {
        t.iter_mut()
            .filter(|(k, _)| k == key)
            .for_each(|(k, _)| *k = "backbone.layers.1.mixer.x_proj.wieght".into())
    });
    let msg = error_of(renamed.path());
    assert!(msg.contains(key), "{msg}");

    let reshaped = edited_copy("mamba", |t| {
        for (_, v) in t.iter_mut().filter(|(k, _)| k == key) {
            *v = v.reshape(&[v.numel()]).unwrap();
        }
    });
    let msg = error_of(reshaped.path());
    assert!(msg.contains(key) && msg.contains("shape"), "{msg}");

    let extra = edited_copy("mamba", |t| {
        t.push((
            "backbone.layers.9.mixer.D".into(),
            Tensor::ones(&[4], tensor::DType::F32),
        ))
    });
    let msg = error_of(extra.path());
    assert!(
        msg.contains("unexpected") && msg.contains("backbone.layers.9.mixer.D"),
        "{msg}"
    );
}

#[test]
fn an_unsupported_model_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 8, "vocab_size": 8, "num_hidden_layers": 1}"#,
    )
    .unwrap();
    tensor::safetensors::save(dir.path().join("model.safetensors"), &[], None).unwrap();
    let msg = error_of(dir.path());
    assert!(msg.contains("llama"), "{msg}");
}

#[test]
fn a_sharded_checkpoint_loads_like_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("mamba").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let tensors = tensor::safetensors::load(fixture("mamba").join("model.safetensors")).unwrap();
    let mut weight_map = serde_json::Map::new();
    let mut shards: [Vec<(&str, &Tensor)>; 2] = [Vec::new(), Vec::new()];
    for (i, (name, t)) in tensors.iter().enumerate() {
        let shard = format!("model-{:05}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(name.clone(), serde_json::Value::String(shard));
        shards[i % 2].push((name.as_str(), t));
    }
    for (i, shard) in shards.iter().enumerate() {
        let path = dir
            .path()
            .join(format!("model-{:05}-of-00002.safetensors", i + 1));
        tensor::safetensors::save(path, shard, None).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let ids = [3, 1, 4, 1, 5];
    let sharded = emma::commands::logits(dir.path(), &ids, Device::Cpu).unwrap();
    let single = emma::commands::logits(&fixture("mamba"), &ids, Device::Cpu).unwrap();
    assert_eq!(sharded.to_vec_f64(), single.to_vec_f64());

    // A shard name that leaves the checkpoint's folder is refused by name, before it is read.
    let outside = dir
        .path()
        .parent()
        .unwrap()
        .join("model-00001-of-00002.safetensors");
    for escape in ["../model-00001-of-00002.safetensors", outside.to_str().unwrap()] {
        let (first, _) = weight_map.iter().next().unwrap();
        let mut bad = weight_map.clone();
        bad.insert(first.clone(), serde_json::Value::String(escape.to_owned()));
        let index = serde_json::json!({ "metadata": {}, "weight_map": bad });
        std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
        let msg = error_of(dir.path());
        assert!(
            msg.contains("model.safetensors.index.json")
                && msg.contains(escape)
                && msg.contains(first.as_str()),
            "{msg}"
        );
    }
}

#[test]
fn vision_inputs_of_the_wrong_kind_are_refused() {
    let dir = fixture("siglip");
    let ids = Tensor::from_vec(vec![0u32; 3 * 28 * 28], &[1, 3, 28, 28]).unwrap();
    let err = format!(
        "{:#}",
        emma::commands::vision(&dir, &ids, Device::Cpu).unwrap_err()
    );
    assert!(err.contains("float"), "{err}");
    let grey = Tensor::zeros(&[1, 1, 28, 28], tensor::DType::F32);
    let err = format!(
        "{:#}",
        emma::commands::vision(&dir, &grey, Device::Cpu).unwrap_err()
    );
    assert!(err.contains("[batch, 3, height, width]"), "{err}");
    let tiny = Tensor::zeros(&[1, 3, 2, 2], tensor::DType::F32);
    let err = format!(
        "{:#}",
        emma::commands::vision(&dir, &tiny, Device::Cpu).unwrap_err()
    );
    assert!(err.contains("smaller than one"), "{err}");
}
