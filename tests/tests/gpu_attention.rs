//! The fused attention kernel on `Device::Cuda(0)` against the f64 reference: the CPU's fused op
//! run in f64 on the same inputs (rounded to the dtype under test), which `attention.rs` checks
//! against a plain score-matrix implementation to 1e-12.
//!
//! Random shapes: query and key lengths from {1, 7, 64, 65, 127, 729, 1025}, head dims 64, 72,
//! 80, 96 and 128, every mask kind, grouped keys (Hk < H) and key-padding masks that may blank a
//! whole batch row; f32 (CUDA cores), bf16 and f16 (tensor cores). The outputs are poisoned with
//! NaN before the kernel writes them. Errors are relative L2 over the whole output: f32 within
//! 1e-5, bf16 and f16 within 1e-2; the log-sum-exp (f32 on every path) within 1e-5 in f32 and
//! 1e-2 otherwise, over the rows that see a key, and exactly -inf on the rows that see none.
//!
//! Without a GPU every test prints one line `skipped: <reason>` and passes; with
//! `EMMA_REQUIRE_GPU=1` it fails instead.

use proptest::prelude::*;
use tensor::DType::{BF16, F16, F32, F64};
use tensor::{AttentionMask, AttentionSpec, DType, Device::Cpu, Tensor};
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
        .prop_filter("work", |c| c.b * c.h * c.tq * c.tk * c.d <= 300_000_000)
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

#[test]
fn attention_forward_matches_the_f64_reference() {
    run(24, case(), |c| {
        let q = random(&[c.b, c.h, c.tq, c.d], c.seed, c.dtype)?;
        let k = random(&[c.b, c.hk, c.tk, c.d], c.seed ^ 1, c.dtype)?;
        let v = random(&[c.b, c.hk, c.tk, c.d], c.seed ^ 2, c.dtype)?;
        let keep = c.padded.then(|| padding(&c)).transpose()?;
        let spec = AttentionSpec {
            scale: 1.0 / (c.d as f64).sqrt(),
            mask: c.mask,
        };
        let wide = |t: &Tensor| t.to_dtype(F64).or_fail();
        let (want, want_lse) = wide(&q)?
            .attention(&wide(&k)?, &wide(&v)?, &spec, keep.as_ref())
            .or_fail()?;
        let on = |t: &Tensor| t.to_device(GPU).or_fail();
        let keep_gpu = keep.as_ref().map(on).transpose()?;
        poison(&c)?;
        let (out, lse) = on(&q)?
            .attention(&on(&k)?, &on(&v)?, &spec, keep_gpu.as_ref())
            .or_fail()?;
        prop_assert_eq!(out.device(), GPU);
        prop_assert_eq!(lse.dtype(), F32);
        let got = out.to_device(Cpu).or_fail()?.to_dtype(F64).or_fail()?;
        let values = got.to_vec_f64();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(TestCaseError::fail(format!("out: {} at {i}", values[i])));
        }
        let err = tests::rel_error(&got, &want);
        prop_assert!(err <= tol(c.dtype), "out: relative error {err:e}");

        // The log-sum-exp: -inf exactly where a row sees no key, close elsewhere.
        let want_lse = want_lse.to_vec_f64();
        let got_lse = lse.to_device(Cpu).or_fail()?.to_vec_f64();
        let (mut err, mut norm) = (0.0, 0.0);
        for (i, (&w, &g)) in want_lse.iter().zip(&got_lse).enumerate() {
            if w == f64::NEG_INFINITY {
                prop_assert!(g == f64::NEG_INFINITY, "lse row {i}: {g}, expected -inf");
            } else {
                prop_assert!(g.is_finite(), "lse row {i}: {g}, expected {w}");
                err += (g - w) * (g - w);
                norm += w * w;
            }
        }
        let rel = (err / norm.max(1e-300)).sqrt();
        prop_assert!(rel <= tol(c.dtype), "lse relative error {rel:e}");
        Ok(())
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
