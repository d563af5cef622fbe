//! Cached recurrent generation with `MambaLm` (Mamba-1 and Mamba-2, the committed tiny fixtures):
//! a prefill over the first k tokens followed by one `step` per remaining token gives, at every
//! position, the logits of the parallel forward pass over the whole sequence.

use nn::{load_pretrained, MambaLm, NnError, ParamStore};
use std::path::Path;
use tensor::safetensors::SafetensorsFile;
use tensor::Tensor;

/// The fixture `name`'s model over a frozen store, and its 13 reference token ids.
fn model(name: &str) -> (MambaLm, Vec<u32>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    let pre = load_pretrained(&dir).unwrap();
    let store = ParamStore::new(pre.tensors, false, dir.display().to_string());
    let lm = MambaLm::new(&pre.config, &store).unwrap();
    let reference = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
    let ids = reference.get("input_ids").unwrap().to_vec::<u32>().unwrap();
    (lm, ids)
}

/// Two different sequences `[2, L]`: the reference ids and a permutation of the vocabulary.
fn batch_ids(ids: &[u32], vocab: u32) -> Tensor {
    let other = ids.iter().rev().map(|&i| (i * 7 + 3) % vocab);
    let both: Vec<u32> = ids.iter().copied().chain(other).collect();
    Tensor::from_slice(&both, &[2, ids.len()]).unwrap()
}

/// `‖a - b‖ / ‖b‖`; infinite on a shape mismatch or NaN.
fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    let (x, y) = (a.to_vec_f64(), b.to_vec_f64());
    if a.shape() != b.shape() || x.iter().chain(&y).any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let diff: f64 = x.iter().zip(&y).map(|(p, q)| (p - q) * (p - q)).sum();
    let norm: f64 = y.iter().map(|q| q * q).sum();
    diff.sqrt() / norm.sqrt().max(1e-30)
}

/// Prefills k tokens, steps through the rest and compares every position with the parallel
/// forward pass.
fn check_prefill_then_step(name: &str) {
    let (lm, ids) = model(name);
    let ids = batch_ids(&ids, 64);
    let len = ids.dim(1);
    let full = lm.forward(&ids).unwrap().value().clone(); // [2, L, vocab]
    let embeds = lm.embed(&ids).unwrap().value().clone(); // [2, L, hidden]
    for k in [0, 1, 5, 12] {
        let (hidden, mut cache) = lm.prefill(&embeds.narrow(1, 0, k).unwrap()).unwrap();
        assert_eq!(hidden.shape(), [2, k, embeds.dim(2)]);
        assert_eq!(cache.batch(), 2);
        let bytes = cache.size_in_bytes();
        if k > 0 {
            let err = rel_error(&lm.logits_of(&hidden).unwrap(), &full.narrow(1, 0, k).unwrap());
            assert!(err < 1e-4, "{name}: prefill {k}: logits relative error {err:e}");
        }
        for t in k..len {
            let embed = embeds.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
            let logits = lm.step(&embed, &mut cache).unwrap();
            let expected = full.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
            let err = rel_error(&logits, &expected);
            assert!(
                err < 1e-4,
                "{name}: prefill {k}, step at {t}: logits relative error {err:e}"
            );
            assert_eq!(cache.size_in_bytes(), bytes, "{name}: the cache grew");
        }
    }
}

#[test]
fn mamba_steps_match_the_parallel_forward() {
    check_prefill_then_step("mamba");
}

#[test]
fn mamba2_steps_match_the_parallel_forward() {
    // Length 13 with chunk 8: prefills of 12 end inside a partial chunk.
    check_prefill_then_step("mamba2");
}

#[test]
fn prefill_and_stepping_leave_the_same_state() {
    for name in ["mamba", "mamba2"] {
        let (lm, ids) = model(name);
        let embeds = lm.embed(&batch_ids(&ids, 64)).unwrap().value().clone();
        let (_, prefilled) = lm.prefill(&embeds.narrow(1, 0, 6).unwrap()).unwrap();
        let mut stepped = lm.empty_cache(2).unwrap();
        for t in 0..6 {
            let embed = embeds.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
            lm.step(&embed, &mut stepped).unwrap();
        }
        for (p, s) in prefilled.layers().iter().zip(stepped.layers()) {
            assert_eq!(p.conv_state().shape(), [2, p.conv_state().dim(1), 3]);
            assert!(
                rel_error(s.conv_state(), p.conv_state()) < 1e-5,
                "{name}: conv state"
            );
            assert!(
                rel_error(s.ssm_state(), p.ssm_state()) < 1e-4,
                "{name}: SSM state"
            );
        }
    }
}

#[test]
fn an_empty_prompt_gives_the_empty_cache() {
    let (lm, _) = model("mamba2");
    let (hidden, cache) = lm
        .prefill(&Tensor::zeros(&[3, 0, 32], tensor::DType::F32))
        .unwrap();
    assert_eq!(hidden.shape(), [3, 0, 32]);
    assert_eq!(cache.batch(), 3);
    assert_eq!(cache.layers().len(), 2);
    for layer in cache.layers() {
        assert_eq!(layer.conv_state().shape(), [3, 64 + 2 * 2 * 8, 3]);
        assert_eq!(layer.ssm_state().shape(), [3, 8, 8, 8]);
        assert!(layer.ssm_state().to_vec_f64().iter().all(|&v| v == 0.0));
    }
}

#[test]
fn wrong_shapes_are_named_and_leave_the_cache_unchanged() {
    let (lm, ids) = model("mamba");
    let embeds = lm.embed(&batch_ids(&ids, 64)).unwrap().value().clone();
    let err = lm.prefill(&embeds.narrow(2, 0, 8).unwrap()).unwrap_err();
    assert!(
        matches!(err, NnError::Input { .. }) && err.to_string().contains("[2, 13, 8]"),
        "{err}"
    );

    let (_, mut cache) = lm.prefill(&embeds.narrow(1, 0, 4).unwrap()).unwrap();
    let before = cache.clone();
    for bad in [
        Tensor::zeros(&[3, 16], tensor::DType::F32),
        Tensor::zeros(&[2, 1, 16], tensor::DType::F32),
    ] {
        let err = lm.step(&bad, &mut cache).unwrap_err();
        assert!(err.to_string().contains(&format!("{:?}", bad.shape())), "{err}");
    }
    let mut other = model("mamba2").0.empty_cache(2).unwrap();
    let embed = embeds.narrow(1, 4, 1).unwrap().squeeze(1).unwrap();
    assert!(
        lm.step(&embed, &mut other).is_err(),
        "a Mamba-2 cache in a Mamba-1 model"
    );
    for (a, b) in cache.layers().iter().zip(before.layers()) {
        assert_eq!(a.conv_state().to_vec_f64(), b.conv_state().to_vec_f64());
        assert_eq!(a.ssm_state().to_vec_f64(), b.ssm_state().to_vec_f64());
    }
}
