//! Attention against a plain per-head softmax(QKᵀ/√d)V written out in loops, for self and
//! cross attention, with and without a causal mask, and the dense masks of the unfused path.

use autograd::Var;
use nn::{Attention, AttentionNames, ParamStore};
use std::collections::BTreeMap;
use tensor::{seeded_rng, AttentionMask, DType, Tensor};

const DIM: usize = 8;
const HEADS: usize = 2;

fn layer(seed: u64) -> (Attention, BTreeMap<String, Tensor>) {
    let mut rng = seeded_rng(seed);
    let mut params = BTreeMap::new();
    for p in ["q", "k", "v", "o"] {
        params.insert(
            format!("{p}.weight"),
            Tensor::randn(&[DIM, DIM], DType::F64, 0.0, 0.4, &mut rng).unwrap(),
        );
        params.insert(
            format!("{p}.bias"),
            Tensor::randn(&[DIM], DType::F64, 0.0, 0.4, &mut rng).unwrap(),
        );
    }
    let store = ParamStore::new(params.clone(), false, "test");
    let names = AttentionNames {
        q: "q".into(),
        k: "k".into(),
        v: "v".into(),
        out: "o".into(),
    };
    (Attention::new(&store, &names, DIM, HEADS, true).unwrap(), params)
}

/// `x [T, DIM] · Wᵀ + b` in plain loops.
fn linear(x: &[f64], t: usize, w: &Tensor, b: &Tensor) -> Vec<f64> {
    let (w, b) = (w.to_vec_f64(), b.to_vec_f64());
    let mut y = vec![0.0; t * DIM];
    for i in 0..t {
        for o in 0..DIM {
            y[i * DIM + o] = b[o] + (0..DIM).map(|k| x[i * DIM + k] * w[o * DIM + k]).sum::<f64>();
        }
    }
    y
}

fn reference(
    p: &BTreeMap<String, Tensor>,
    x: &[f64],
    tq: usize,
    kv: &[f64],
    tk: usize,
    causal: bool,
) -> Vec<f64> {
    let proj =
        |n: &str, src: &[f64], t: usize| linear(src, t, &p[&format!("{n}.weight")], &p[&format!("{n}.bias")]);
    let (q, k, v) = (proj("q", x, tq), proj("k", kv, tk), proj("v", kv, tk));
    let hd = DIM / HEADS;
    let mut ctx = vec![0.0; tq * DIM];
    for h in 0..HEADS {
        for i in 0..tq {
            let keys = if causal { i + 1 } else { tk };
            let scores: Vec<f64> = (0..keys)
                .map(|j| {
                    (0..hd)
                        .map(|c| q[i * DIM + h * hd + c] * k[j * DIM + h * hd + c])
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..hd {
                ctx[i * DIM + h * hd + c] = (0..keys).map(|j| e[j] / z * v[j * DIM + h * hd + c]).sum();
            }
        }
    }
    linear(&ctx, tq, &p["o.weight"], &p["o.bias"])
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn self_attention_causal_and_not() {
    let (attn, params) = layer(1);
    let t = 5;
    let x = Tensor::randn(&[1, t, DIM], DType::F64, 0.0, 1.0, &mut seeded_rng(2)).unwrap();
    let xv = Var::constant(x.clone());
    let full = attn
        .forward(&xv, &xv, AttentionMask::Full)
        .unwrap()
        .value()
        .to_vec_f64();
    assert!(
        max_abs_diff(
            &full,
            &reference(&params, &x.to_vec_f64(), t, &x.to_vec_f64(), t, false)
        ) < 1e-12
    );
    let causal = attn
        .forward(&xv, &xv, AttentionMask::Causal)
        .unwrap()
        .value()
        .to_vec_f64();
    assert!(
        max_abs_diff(
            &causal,
            &reference(&params, &x.to_vec_f64(), t, &x.to_vec_f64(), t, true)
        ) < 1e-12
    );
}

#[test]
fn cross_attention_over_another_sequence() {
    let (attn, params) = layer(3);
    let (tq, tk) = (3, 6);
    let x = Tensor::randn(&[1, tq, DIM], DType::F64, 0.0, 1.0, &mut seeded_rng(4)).unwrap();
    let kv = Tensor::randn(&[1, tk, DIM], DType::F64, 0.0, 1.0, &mut seeded_rng(5)).unwrap();
    let out = attn
        .forward(
            &Var::constant(x.clone()),
            &Var::constant(kv.clone()),
            AttentionMask::Full,
        )
        .unwrap();
    assert_eq!(out.value().shape(), &[1, tq, DIM]);
    let expected = reference(&params, &x.to_vec_f64(), tq, &kv.to_vec_f64(), tk, false);
    assert!(max_abs_diff(&out.value().to_vec_f64(), &expected) < 1e-12);
}

#[test]
fn dense_masks_spell_out_each_kind() {
    let rows = |m: AttentionMask, tq, tk| m.dense(tq, tk).unwrap().map(|t| t.to_vec_f64());
    assert_eq!(rows(AttentionMask::Full, 2, 3), None);
    // Causal, aligned to the end of the keys: 2 queries over 3 keys.
    assert_eq!(
        rows(AttentionMask::Causal, 2, 3),
        Some(vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    );
    // A 2-wide raster of 4 positions: rows {0, 1} and {2, 3}.
    assert_eq!(
        rows(AttentionMask::BlockCausal { width: 2 }, 4, 4),
        Some(vec![
            1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0
        ])
    );
}
