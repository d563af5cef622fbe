//! The fused attention kernels on `Device::Cuda(0)`, forward and backward, against the plain
//! f64 reference (`tests::attention_reference`) on the same inputs, rounded to the dtype under
//! test.
//!
//! Random shapes: query and key lengths from {1, 7, 64, 65, 127, 729, 1025}, head dims 64, 72,
//! 80, 96 and 128, every mask kind, grouped keys (Hk < H) and key-padding masks that may blank a
//! whole batch row; f32 (CUDA cores), bf16 and f16 (tensor cores). The outputs are poisoned with
//! NaN before the kernels write them. Errors are relative L2 over each whole output: f32 within
//! 1e-5, bf16 and f16 within 1e-2, dq and dk relative to the larger of the result and the terms
//! that cancel in it; the log-sum-exp (f32 on every path) likewise per row, and exactly -inf on
//! the rows that see no key. The backward is also run several times and must give the same
//! bits every time (it has no atomics; the emulated device runs blocks on several threads).
//!
//! Without a GPU every test prints one line `skipped: <reason>` and passes; with
//! `EMMA_REQUIRE_GPU=1` it fails instead.

use proptest::prelude::*;
use tensor::DType::{BF16, F16, F32};
use tensor::{AttentionMask, AttentionSpec, DType, Device::Cpu, Tensor};
use tests::attention_reference::{attention_reference, AttentionSizes};
use tests::gpu::{run, OrFail, TestResult, GPU};
use tests::uniform;

/// Sizes and options of one case.
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
    dtype: DType,
    seed: u64,
}

fn length() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 7, 64, 65, 127, 729, 1025])
}

fn case() -> impl Strategy<Value = Case> {
    (
        (
            length(),
            length(),
            prop::sample::select(vec![64usize, 72, 80, 96, 128]),
        ),
        (
            1usize..=2,
            prop::sample::select(vec![(1usize, 1usize), (2, 1), (2, 2), (4, 2)]),
        ),
        (0usize..3, 1usize..40, any::<bool>()),
        (prop::sample::select(vec![F32, BF16, F16]), any::<u64>()),
    )
        .prop_map(
            |((tq, tk, d), (b, (h, hk)), (m, width, padded), (dtype, seed))| Case {
                b,
                h,
                hk,
                tq,
                tk,
                d,
                mask: match m {
                    0 => AttentionMask::Full,
                    1 => AttentionMask::Causal,
                    _ => AttentionMask::BlockCausal { width },
                },
                padded,
                dtype,
                seed,
            },
        )
        // Keep the emulated device's work per case to a few seconds.
        .prop_filter("work", |c| c.b * c.h * c.tq * c.tk * c.d <= 100_000_000)
}

/// Values uniform in [-2, 2) from `seed`, rounded to `dtype`.
fn random(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor, TestCaseError> {
    let n = shape.iter().product();
    Tensor::from_vec(uniform(n, -2.0, 2.0, seed), shape)
        .and_then(|t| t.to_dtype(dtype))
        .or_fail()
}

/// The key-padding mask: each key kept with probability 3/4, and batch row 1 (if any) blank.
fn padding(c: &Case) -> Result<Tensor, TestCaseError> {
    let draws = uniform(c.b * c.tk, 0.0, 1.0, c.seed ^ 0x9ad);
    let keep: Vec<u32> = draws
        .iter()
        .enumerate()
        .map(|(i, &u)| u32::from(u < 0.75 && i / c.tk != 1))
        .collect();
    Tensor::from_vec(keep, &[c.b, c.tk]).or_fail()
}

/// Hands the caching allocator NaN-filled blocks of the outputs' sizes.
fn poison(c: &Case) -> TestResult {
    let mut blocks = Vec::new();
    for _ in 0..3 {
        blocks.push(Tensor::full_on(&[c.b, c.h, c.tq, c.d], f64::NAN, c.dtype, GPU).or_fail()?);
        blocks.push(Tensor::full_on(&[c.b, c.hk, c.tk, c.d], f64::NAN, c.dtype, GPU).or_fail()?);
        blocks.push(Tensor::full_on(&[c.b, c.h, c.tq], f64::NAN, F32, GPU).or_fail()?);
    }
    drop(blocks);
    Ok(())
}

fn tol(dtype: DType) -> f64 {
    if dtype == F32 {
        1e-5
    } else {
        1e-2
    }
}

/// Fails unless `got` (on the GPU, in `dtype`) is finite and within `tol(dtype)` of `want`,
/// relative to the larger of `want`'s norm and `terms` (the norm of the terms that cancel in it).
fn check(name: &str, got: &Tensor, want: &[f64], terms: f64, dtype: DType) -> TestResult {
    prop_assert_eq!(got.device(), GPU, "{}", name);
    prop_assert_eq!(got.dtype(), dtype, "{}", name);
    let values = got.to_device(Cpu).or_fail()?.to_vec_f64();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(TestCaseError::fail(format!("{name}: {} at {i}", values[i])));
    }
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let diff = norm(&mut values.iter().zip(want).map(|(a, b)| a - b));
    let scale = norm(&mut want.iter().copied()).max(terms);
    let err = if scale > 0.0 { diff / scale } else { diff };
    prop_assert!(err <= tol(dtype), "{name} {dtype}: relative error {err:e}");
    Ok(())
}

#[test]
fn attention_forward_and_backward_match_the_f64_reference() {
    run(24, case(), |c| {
        let q = random(&[c.b, c.h, c.tq, c.d], c.seed, c.dtype)?;
        let k = random(&[c.b, c.hk, c.tk, c.d], c.seed ^ 1, c.dtype)?;
        let v = random(&[c.b, c.hk, c.tk, c.d], c.seed ^ 2, c.dtype)?;
        let go = random(&[c.b, c.h, c.tq, c.d], c.seed ^ 3, c.dtype)?;
        let keep = c.padded.then(|| padding(&c)).transpose()?;
        let scale = 1.0 / (c.d as f64).sqrt();
        let spec = AttentionSpec { scale, mask: c.mask };
        let keep_flags: Vec<bool> = match &keep {
            Some(t) => t.to_vec_f64().iter().map(|&x| x != 0.0).collect(),
            None => vec![true; c.b * c.tk],
        };
        let sizes = AttentionSizes {
            b: c.b,
            h: c.h,
            hk: c.hk,
            tq: c.tq,
            tk: c.tk,
            d: c.d,
            mask: c.mask,
        };
        let want = attention_reference(
            &sizes,
            &q.to_vec_f64(),
            &k.to_vec_f64(),
            &v.to_vec_f64(),
            &keep_flags,
            &go.to_vec_f64(),
            scale,
        );

        let on = |t: &Tensor| t.to_device(GPU).or_fail();
        let (qg, kg, vg, gog) = (on(&q)?, on(&k)?, on(&v)?, on(&go)?);
        let keep_gpu = keep.as_ref().map(on).transpose()?;
        poison(&c)?;
        let (out, lse) = qg.attention(&kg, &vg, &spec, keep_gpu.as_ref()).or_fail()?;
        check("out", &out, &want.out, 0.0, c.dtype)?;
        // The log-sum-exp (f32 on every path): -inf exactly where a row sees no key.
        prop_assert_eq!(lse.dtype(), F32);
        let got_lse = lse.to_device(Cpu).or_fail()?.to_vec_f64();
        for (i, (&w, &g)) in want.lse.iter().zip(&got_lse).enumerate() {
            if w == f64::NEG_INFINITY {
                prop_assert!(g == f64::NEG_INFINITY, "lse row {i}: {g}, expected -inf");
            } else {
                prop_assert!(
                    (g - w).abs() <= tol(c.dtype) * w.abs().max(1.0),
                    "lse row {i}: {g} vs {w}"
                );
            }
        }

        poison(&c)?;
        let (dq, dk, dv) = qg
            .attention_backward(&kg, &vg, &out, &lse, &gog, &spec, keep_gpu.as_ref())
            .or_fail()?;
        check("dq", &dq, &want.dq, want.dq_terms, c.dtype)?;
        check("dk", &dk, &want.dk, want.dk_terms, c.dtype)?;
        check("dv", &dv, &want.dv, 0.0, c.dtype)
    });
}

#[test]
fn attention_on_the_gpu_refuses_head_dims_past_128() {
    if !tests::gpu::gpu_ready() {
        return;
    }
    let q = Tensor::zeros_on(&[1, 1, 4, 160], BF16, GPU).unwrap();
    let spec = AttentionSpec {
        scale: 0.1,
        mask: AttentionMask::Full,
    };
    let err = q.attention(&q, &q, &spec, None).unwrap_err().to_string();
    assert!(err.contains("head dim 160"), "{err}");
}

#[test]
fn the_gpu_backward_is_deterministic() {
    if !tests::gpu::gpu_ready() {
        return;
    }
    let c = Case {
        b: 2,
        h: 4,
        hk: 2,
        tq: 127,
        tk: 129,
        d: 72,
        mask: AttentionMask::Causal,
        padded: true,
        dtype: BF16,
        seed: 11,
    };
    let on = |t: Tensor| t.to_device(GPU).unwrap();
    let q = on(random(&[c.b, c.h, c.tq, c.d], 1, c.dtype).unwrap());
    let k = on(random(&[c.b, c.hk, c.tk, c.d], 2, c.dtype).unwrap());
    let v = on(random(&[c.b, c.hk, c.tk, c.d], 3, c.dtype).unwrap());
    let go = on(random(&[c.b, c.h, c.tq, c.d], 4, c.dtype).unwrap());
    let keep = on(padding(&c).unwrap());
    let spec = AttentionSpec {
        scale: 0.1,
        mask: c.mask,
    };
    let (out, lse) = q.attention(&k, &v, &spec, Some(&keep)).unwrap();
    let grads = || {
        let (dq, dk, dv) = q
            .attention_backward(&k, &v, &out, &lse, &go, &spec, Some(&keep))
            .unwrap();
        [dq, dk, dv].map(|t| t.to_device(Cpu).unwrap().to_vec_f64())
    };
    let first = grads();
    for _ in 0..3 {
        let again = grads();
        for (a, b) in first.iter().zip(&again) {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "the backward differs between runs"
            );
        }
    }
}
