//! The fused attention op (`Tensor::attention`, its backward and its autograd rule) against a
//! plain f64 reference that builds the whole score matrix, masks it, takes the softmax and
//! multiplies, and differentiates that by the textbook softmax rule (dS = P ∘ (dP − rowsum(P ∘
//! dP))), not by the fused kernel's log-sum-exp recomputation.
//!
//! Random shapes: query and key lengths from {1, 7, 64, 65, 127, 729, 1025}, head dims 64, 72,
//! 80 and 128, every mask kind, grouped keys (Hk < H) and key-padding masks that may blank a
//! whole batch row. Errors are relative L2 over each whole output: f32 within 1e-5, bf16 within
//! 1e-2, f64 within 1e-12. The reference sees the inputs rounded to the dtype under test; NaN
//! never passes. The autograd rule is also checked against central differences in f64.

use autograd::Var;
use proptest::prelude::*;
use tensor::DType::{BF16, F32, F64};
use tensor::{AttentionMask, AttentionSpec, DType, Tensor};
use tests::attention_reference::{attention_reference, AttentionSizes};
use tests::{config, uniform};

type TestResult = Result<(), TestCaseError>;

/// Sizes of one case.
#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    h: usize,
    hk: usize,
    tq: usize,
    tk: usize,
    d: usize,
    mask: AttentionMask,
    padded: bool,
}

/// Values rounded to `dtype` (what the reference must see) and the tensor of them.
fn rounded(shape: &[usize], seed: u64, dtype: DType) -> (Vec<f64>, Tensor) {
    let t = Tensor::from_vec(uniform(shape.iter().product(), -1.0, 1.0, seed), shape)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap();
    (t.to_vec_f64(), t)
}

/// The largest relative error each dtype may show.
fn tol(dtype: DType) -> f64 {
    match dtype {
        F32 => 1e-5,
        BF16 => 1e-2,
        _ => 1e-12,
    }
}

/// Runs one case in `dtype` through the autograd rule and compares the output, the
/// log-sum-exp and all three gradients with the reference.
fn run(c: Case, dtype: DType, seed: u64) -> TestResult {
    let scale = 1.0 / (c.d as f64).sqrt();
    let (q, qt) = rounded(&[c.b, c.h, c.tq, c.d], seed, dtype);
    let (k, kt) = rounded(&[c.b, c.hk, c.tk, c.d], seed + 1, dtype);
    let (v, vt) = rounded(&[c.b, c.hk, c.tk, c.d], seed + 2, dtype);
    let (go, got) = rounded(&[c.b, c.h, c.tq, c.d], seed + 3, dtype);
    // Padding keeps about 80% of the keys; with two or more batch rows, the last sees none.
    let keep: Vec<bool> = uniform(c.b * c.tk, 0.0, 1.0, seed + 4)
        .iter()
        .enumerate()
        .map(|(n, &u)| !c.padded || (u < 0.8 && (c.b == 1 || n / c.tk != c.b - 1)))
        .collect();
    let keep_t = c.padded.then(|| {
        Tensor::from_vec(
            keep.iter().map(|&x| u32::from(x)).collect::<Vec<u32>>(),
            &[c.b, c.tk],
        )
        .unwrap()
    });
    let spec = AttentionSpec { scale, mask: c.mask };
    let sizes = AttentionSizes {
        b: c.b,
        h: c.h,
        hk: c.hk,
        tq: c.tq,
        tk: c.tk,
        d: c.d,
        mask: c.mask,
    };
    let want = attention_reference(&sizes, &q, &k, &v, &keep, &go, scale);

    let (_, lse) = qt
        .attention(&kt, &vt, &spec, keep_t.as_ref())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let lse = lse.to_vec_f64();
    for (n, (&got, &w)) in lse.iter().zip(&want.lse).enumerate() {
        prop_assert!(
            (got == w) || (got - w).abs() <= tol(dtype).max(1e-6) * w.abs().max(1.0),
            "{c:?} {dtype}: log-sum-exp of row {n}: {got} vs {w}"
        );
    }
    let (vq, vk, vv) = (Var::parameter(qt), Var::parameter(kt), Var::parameter(vt));
    let out = vq
        .attention(&vk, &vv, &spec, keep_t.as_ref())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    out.mul(&Var::constant(got))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let shapes = ([c.b, c.h, c.tq, c.d], [c.b, c.hk, c.tk, c.d]);
    let checks = [
        ("out", out.value().clone(), want.out, &shapes.0, 0.0),
        ("dq", vq.grad().unwrap(), want.dq, &shapes.0, want.dq_terms),
        ("dk", vk.grad().unwrap(), want.dk, &shapes.1, want.dk_terms),
        ("dv", vv.grad().unwrap(), want.dv, &shapes.1, 0.0),
    ];
    for (name, got, want, shape, terms) in checks {
        prop_assert_eq!(got.shape(), &shape[..]);
        let got = got.to_vec_f64();
        prop_assert!(got.iter().all(|x| !x.is_nan()), "{c:?} {dtype}: {name} has NaN");
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
        let diff = norm(&mut got.iter().zip(&want).map(|(a, b)| a - b));
        // Relative to the result, or to the terms that cancel in it; absolute when both are 0.
        let scale = norm(&mut want.iter().copied()).max(terms);
        let err = if scale > 0.0 { diff / scale } else { diff };
        prop_assert!(err < tol(dtype), "{c:?} {dtype}: {name} relative error {err}");
    }
    Ok(())
}

/// Random cases: lengths from the list, head dims 64/72/80/128, any mask, grouped keys.
fn cases() -> impl Strategy<Value = Case> {
    let len = prop::sample::select(vec![1usize, 7, 64, 65, 127, 729, 1025]);
    let heads = prop::sample::select(vec![(1usize, 1usize), (2, 1), (2, 2), (4, 2)]);
    (
        1usize..=2,
        heads,
        len.clone(),
        len,
        prop::sample::select(vec![64usize, 72, 80, 128]),
        0usize..4,
        any::<bool>(),
    )
        .prop_filter(
            "keep the f64 reference affordable",
            |&(b, (h, _), tq, tk, d, _, _)| b * h * tq * tk * d <= 40_000_000,
        )
        .prop_map(|(b, (h, hk), tq, tk, d, m, padded)| Case {
            b,
            h,
            hk,
            tq,
            tk,
            d,
            mask: match m {
                0 => AttentionMask::Full,
                1 => AttentionMask::Causal,
                // A raster as wide as the square root of the keys (27 for 729, the decoder's).
                _ => AttentionMask::BlockCausal {
                    width: ((tk as f64).sqrt() as usize).max(1),
                },
            },
            padded,
        })
}

proptest! {
    #![proptest_config(config(12))]

    #[test]
    fn fused_attention_matches_the_plain_reference_in_f32(c in cases(), seed in any::<u64>()) {
        run(c, F32, seed >> 8)?;
    }

    #[test]
    fn fused_attention_matches_the_plain_reference_in_bf16(c in cases(), seed in any::<u64>()) {
        run(c, BF16, seed >> 8)?;
    }

    #[test]
    fn fused_attention_matches_the_plain_reference_in_f64(c in cases(), seed in any::<u64>()) {
        run(c, F64, seed >> 8)?;
    }
}

#[test]
fn a_query_that_sees_no_key_gets_zeros_and_no_gradient() {
    // Causal with fewer keys than queries: the first two queries see nothing.
    let c = Case {
        b: 1,
        h: 1,
        hk: 1,
        tq: 5,
        tk: 3,
        d: 8,
        mask: AttentionMask::Causal,
        padded: false,
    };
    run(c, F32, 7).unwrap();
    let (_, q) = rounded(&[1, 1, 5, 8], 1, F32);
    let (_, k) = rounded(&[1, 1, 3, 8], 2, F32);
    let spec = AttentionSpec {
        scale: 0.5,
        mask: AttentionMask::Causal,
    };
    let (out, lse) = q.attention(&k, &k, &spec, None).unwrap();
    let (out, lse) = (out.to_vec_f64(), lse.to_vec_f64());
    assert!(out[..16].iter().all(|&x| x == 0.0), "{out:?}");
    assert!(
        lse[..2].iter().all(|&x| x == f64::NEG_INFINITY) && lse[2].is_finite(),
        "{lse:?}"
    );
    assert!(out.iter().all(|x| x.is_finite()));
}

#[test]
fn bad_operands_are_errors_that_name_the_shapes() {
    let t = |shape: &[usize]| Tensor::zeros(shape, F32);
    let spec = AttentionSpec {
        scale: 0.125,
        mask: AttentionMask::Full,
    };
    let cases = [
        (t(&[1, 2, 4, 8]), t(&[1, 3, 4, 8]), None, "do not divide"),
        (t(&[1, 2, 4, 8]), t(&[1, 2, 4, 16]), None, "differ"),
        (t(&[2, 4, 8]), t(&[2, 4, 8]), None, "[B, heads, T, D]"),
        (
            t(&[1, 2, 4, 8]),
            t(&[1, 2, 4, 8]),
            Some(Tensor::zeros(&[1, 5], DType::U32)),
            "key-padding",
        ),
    ];
    for (q, k, pad, want) in cases {
        let err = q.attention(&k, &k, &spec, pad.as_ref()).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
    let block = AttentionSpec {
        scale: 1.0,
        mask: AttentionMask::BlockCausal { width: 0 },
    };
    let err = t(&[1, 1, 2, 4]).attention(&t(&[1, 1, 2, 4]), &t(&[1, 1, 2, 4]), &block, None);
    assert!(err.unwrap_err().to_string().contains("block-causal"));
}

/// The autograd rule against central differences in f64 (`tests::check`, relative error below
/// 1e-6): every mask kind, grouped keys, with and without key padding, on shapes small enough to
/// perturb every input.
#[test]
fn the_cpu_gradients_match_finite_differences_in_f64() {
    let masks = [
        AttentionMask::Full,
        AttentionMask::Causal,
        AttentionMask::BlockCausal { width: 3 },
    ];
    for (n, mask) in masks.into_iter().enumerate() {
        for padded in [false, true] {
            let seed = 100 + 10 * n as u64 + u64::from(padded);
            let t = |shape: &[usize], s: u64| {
                Tensor::from_vec(uniform(shape.iter().product(), -1.0, 1.0, s), shape).unwrap()
            };
            let (q, k, v) = (
                t(&[2, 4, 5, 6], seed),
                t(&[2, 2, 7, 6], seed + 1),
                t(&[2, 2, 7, 6], seed + 2),
            );
            // Key 2 of row 0 and key 5 of row 1 padded away.
            let keep = padded.then(|| {
                let flags: Vec<u32> = (0..14).map(|i| u32::from(i != 2 && i != 12)).collect();
                Tensor::from_vec(flags, &[2, 7]).unwrap()
            });
            let spec = AttentionSpec { scale: 0.4, mask };
            let result = tests::check(|x| x[0].attention(&x[1], &x[2], &spec, keep.as_ref()), &[q, k, v]);
            assert!(result.is_ok(), "{mask:?}, padded {padded}: {result:?}");
        }
    }
}
