//! Every op that `tensor` dispatches to CUDA, run on `Device::Cuda(0)` against the same op on
//! the CPU: the CPU kernels are the reference.
//!
//! Inputs are fresh random values (seeded from a proptest-drawn u64) on random shapes with size-1
//! and odd dimensions, in f32 and bf16. Each input is built on the host and copied to the device,
//! then laid out by the same view ops on both (see [`View`]): contiguous, permuted, transposed,
//! narrowed or strided out of a NaN-padded buffer, or broadcast from a smaller tensor. So a GPU
//! kernel sees the same strided views as the CPU one, and one that reads the padding fails.
//! The error is the relative L2 error of the whole output, ‖gpu − cpu‖ / ‖cpu‖: below 1e-5 in
//! f32 and 1e-2 in bf16; ops that only move, pick or compare elements must match exactly. NaN
//! never passes. Value ranges avoid outputs that cancel to nearly zero, where two correct f32
//! computations in different orders would differ relatively by more than that.
//!
//! Without a GPU every test prints one line `skipped: <reason>` and passes; with
//! `EMMA_REQUIRE_GPU=1` it fails instead.

use autograd::Var;
use proptest::prelude::*;
use tensor::DType::{BF16, F16, F32, F64, U32};
use tensor::{AdamWStep, BinaryOp, CmpOp, DType, Device, Tensor, TensorError, UnaryOp};
use tests::gpu::{check_close, gpu_ready, run, OrFail, Pair, TestResult, GPU};
use tests::{random_ids, shape, uniform};

/// The largest relative error a kernel may have in `dtype` (0: exact).
fn tol(dtype: DType) -> f64 {
    match dtype {
        F32 => 1e-5,
        BF16 => 1e-2,
        F16 => 2e-3,
        F64 | U32 => 0.0,
    }
}

/// [`check_close`] with the tolerance of the output's dtype.
fn check(cpu: &Tensor, gpu: &Tensor) -> TestResult {
    check_close("output", cpu, gpu, tol(cpu.dtype()))
}

/// Exact equality, for ops that only move, pick or compare elements.
fn check_exact(cpu: &Tensor, gpu: &Tensor) -> TestResult {
    check_close("output", cpu, gpu, 0.0)
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// Runs `f` on both devices and compares (tolerance of the dtype).
fn same(f: impl Fn(&[&Tensor]) -> tensor::Result<Tensor>, inputs: &[&Pair]) -> TestResult {
    let cpu: Vec<&Tensor> = inputs.iter().map(|p| &p.cpu).collect();
    let gpu: Vec<&Tensor> = inputs.iter().map(|p| &p.gpu).collect();
    check(&f(&cpu).or_fail()?, &f(&gpu).or_fail()?)
}

/// Runs `f` on both devices and requires equal results.
fn same_exact(f: impl Fn(&[&Tensor]) -> tensor::Result<Tensor>, inputs: &[&Pair]) -> TestResult {
    let cpu: Vec<&Tensor> = inputs.iter().map(|p| &p.cpu).collect();
    let gpu: Vec<&Tensor> = inputs.iter().map(|p| &p.gpu).collect();
    check_exact(&f(&cpu).or_fail()?, &f(&gpu).or_fail()?)
}

/// How an input is laid out over its storage.
#[derive(Clone, Copy, Debug)]
enum View {
    /// Row-major, offset 0.
    Contiguous,
    /// Stored with the axes reversed and viewed through `permute`.
    Permuted,
    /// Stored with the last two axes swapped and viewed through `t()` (rank >= 2).
    Transposed,
    /// Cut out of a NaN-padded buffer by `narrow` on every axis (offset and gaps).
    Narrowed,
    /// Every other element of a NaN-interleaved buffer (innermost stride 2).
    Strided,
    /// Broadcast (zero strides) from a shape with every other axis 1.
    Broadcast,
}

/// Whether an input laid out as `view` is constant along `axis` (a zero stride there): a
/// normalised gradient is then a difference of equal terms, zero up to rounding, and a relative
/// error against it measures noise.
fn constant_along(view: View, axis: usize) -> bool {
    matches!(view, View::Broadcast) && axis.is_multiple_of(2)
}

fn view() -> impl Strategy<Value = View> {
    prop_oneof![
        Just(View::Contiguous),
        Just(View::Permuted),
        Just(View::Transposed),
        Just(View::Narrowed),
        Just(View::Strided),
        Just(View::Broadcast),
    ]
}

/// f32 or bf16.
fn float() -> impl Strategy<Value = DType> {
    prop_oneof![Just(F32), Just(BF16)]
}

/// Where values come from: uniform in `[lo, hi)`, rounded down to a multiple of `step` when
/// `step > 0` (ties and equalities are then common).
#[derive(Clone, Copy, Debug)]
struct Dist {
    lo: f64,
    hi: f64,
    step: f64,
}

const fn range(lo: f64, hi: f64) -> Dist {
    Dist { lo, hi, step: 0.0 }
}

const fn grid(lo: f64, hi: f64, step: f64) -> Dist {
    Dist { lo, hi, step }
}

impl Dist {
    /// `n` fresh values.
    fn values(self, n: usize, seed: u64) -> Vec<f64> {
        let mut v = uniform(n, self.lo, self.hi, seed);
        if self.step > 0.0 {
            v.iter_mut()
                .for_each(|x| *x = (*x / self.step).floor() * self.step);
        }
        v
    }
}

/// A host tensor of `shape` in `dtype` holding `values` (u32 truncates).
fn host(values: Vec<f64>, shape: &[usize], dtype: DType) -> Result<Tensor, TestCaseError> {
    Tensor::from_vec(values, shape)
        .and_then(|t| t.to_dtype(dtype))
        .or_fail()
}

/// A fresh input of `shape` from `dist` in `dtype`, laid out as `view` on both devices.
fn input(shape: &[usize], dist: Dist, dtype: DType, view: View, seed: u64) -> Result<Pair, TestCaseError> {
    let rank = shape.len();
    let numel = |s: &[usize]| s.iter().product::<usize>();
    // Padding a kernel must never read: NaN for floats, a large id for u32.
    let pad = if dtype.is_float() { f64::NAN } else { 7777.0 };
    match view {
        View::Permuted if rank >= 2 => {
            let perm: Vec<usize> = (0..rank).rev().collect();
            let stored: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            Pair::of(host(dist.values(numel(&stored), seed), &stored, dtype)?)?.map(|t| t.permute(&perm))
        }
        View::Transposed if rank >= 2 => {
            let mut stored = shape.to_vec();
            stored.swap(rank - 2, rank - 1);
            Pair::of(host(dist.values(numel(&stored), seed), &stored, dtype)?)?.map(|t| t.t())
        }
        View::Narrowed => {
            // Each axis padded by 1 before and 2 after.
            let stored: Vec<usize> = shape.iter().map(|&d| d + 3).collect();
            let mut values = vec![pad; numel(&stored)];
            let inner = dist.values(numel(shape), seed);
            let mut idx = vec![0; rank];
            for v in inner {
                let at = idx.iter().zip(&stored).fold(0, |acc, (&i, &d)| acc * d + i + 1);
                values[at] = v;
                for d in (0..rank).rev() {
                    idx[d] += 1;
                    if idx[d] < shape[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            Pair::of(host(values, &stored, dtype)?)?
                .map(|t| (0..rank).try_fold(t.clone(), |acc, axis| acc.narrow(axis, 1, shape[axis])))
        }
        View::Strided => {
            let values: Vec<f64> = dist
                .values(numel(shape), seed)
                .into_iter()
                .flat_map(|v| [v, pad])
                .collect();
            let stored = [shape, &[2]].concat();
            Pair::of(host(values, &stored, dtype)?)?.map(|t| t.narrow(rank, 0, 1)?.squeeze(rank))
        }
        View::Broadcast => {
            let source: Vec<usize> = shape
                .iter()
                .enumerate()
                .map(|(i, &d)| if i % 2 == 0 { 1 } else { d })
                .collect();
            Pair::of(host(dist.values(numel(&source), seed), &source, dtype)?)?.map(|t| t.broadcast_to(shape))
        }
        _ => Pair::of(host(dist.values(numel(shape), seed), shape, dtype)?),
    }
}

/// Random ids in `0..bound` as a u32 tensor of `shape` on both devices.
fn ids(shape: &[usize], bound: usize, seed: u64) -> Result<Pair, TestCaseError> {
    let n = shape.iter().product();
    let values = random_ids(n, bound, seed).into_iter().map(|i| i as f64).collect();
    Pair::of(host(values, shape, U32)?)
}

/// `shape` with the axes whose bit is set in `mask` made 1, and `mask >> 8` leading axes dropped:
/// a shape that broadcasts to it.
fn broadcastable(shape: &[usize], mask: u32) -> Vec<usize> {
    let drop = (mask as usize >> 8) % (shape.len() + 1);
    shape[drop..]
        .iter()
        .enumerate()
        .map(|(i, &d)| if mask >> i & 1 == 1 { 1 } else { d })
        .collect()
}

/// A scalar of `dtype` on both devices.
fn scalar(value: f64, dtype: DType) -> Result<Pair, TestCaseError> {
    Pair::of(Tensor::full(&[], value, dtype))
}

// ---------------------------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------------------------

/// Every unary op with a domain where its f32 result does not cancel to nearly zero.
const UNARY: [(UnaryOp, Dist); 17] = [
    (UnaryOp::Neg, range(-3.0, 3.0)),
    (UnaryOp::Exp, range(-3.0, 3.0)),
    (UnaryOp::Log, range(0.1, 3.0)),
    (UnaryOp::Sqrt, range(0.1, 3.0)),
    (UnaryOp::Rsqrt, range(0.1, 3.0)),
    (UnaryOp::Tanh, range(-3.0, 3.0)),
    (UnaryOp::Sigmoid, range(-3.0, 3.0)),
    (UnaryOp::Silu, range(-2.0, 3.0)),
    (UnaryOp::GeluTanh, range(-2.0, 3.0)),
    (UnaryOp::GeluErf, range(-2.0, 3.0)),
    (UnaryOp::Softplus, range(-3.0, 3.0)),
    (UnaryOp::Abs, range(-3.0, 3.0)),
    (UnaryOp::Sqr, range(-3.0, 3.0)),
    (UnaryOp::Recip, range(0.1, 3.0)),
    (UnaryOp::Powf(1.7), range(0.1, 3.0)),
    (UnaryOp::Clamp(-0.5, 0.5), range(-3.0, 3.0)),
    (UnaryOp::Affine(1.5, 0.25), range(0.1, 3.0)),
];

#[test]
fn unary_ops_and_their_backward() {
    run(
        24,
        (shape(4, 7), view(), view(), float(), any::<u64>()),
        |(s, vx, vg, dtype, seed)| {
            let g = input(&s, range(-1.0, 1.0), dtype, vg, seed ^ 1)?;
            for (op, dist) in UNARY {
                let x = input(&s, dist, dtype, vx, seed)?;
                same(|t| t[0].unary(op), &[&x])?;
                // Derivatives on x > 0, away from their zeros.
                let xb = input(&s, range(0.1, 3.0), dtype, vx, seed)?;
                same(|t| t[0].unary_backward(op, t[1]), &[&xb, &g])?;
            }
            Ok(())
        },
    );
}

const BINARY: [BinaryOp; 6] = [
    BinaryOp::Add,
    BinaryOp::Sub,
    BinaryOp::Mul,
    BinaryOp::Div,
    BinaryOp::Maximum,
    BinaryOp::Minimum,
];

#[test]
fn binary_ops_with_broadcasting() {
    let strategy = (
        shape(4, 7),
        any::<u32>(),
        any::<bool>(),
        view(),
        view(),
        float(),
        any::<u64>(),
    );
    run(32, strategy, |(s, mask, swap, va, vb, dtype, seed)| {
        let small = broadcastable(&s, mask);
        let (sa, sb) = if swap { (&small, &s) } else { (&s, &small) };
        let a = input(sa, range(0.5, 2.0), dtype, va, seed)?;
        let b = input(sb, range(0.5, 2.0), dtype, vb, seed ^ 1)?;
        for op in BINARY {
            same(|t| t[0].binary(op, t[1]), &[&a, &b])?;
        }
        Ok(())
    });
}

const COMPARE: [CmpOp; 6] = [CmpOp::Eq, CmpOp::Ne, CmpOp::Lt, CmpOp::Le, CmpOp::Gt, CmpOp::Ge];

#[test]
fn comparisons_and_where() {
    let dtype = prop_oneof![Just(F32), Just(BF16), Just(U32)];
    let strategy = (shape(4, 6), any::<u32>(), view(), view(), dtype, any::<u64>());
    run(32, strategy, |(s, mask, va, vb, dtype, seed)| {
        // On a coarse grid, so that equal elements are common.
        let a = input(&s, grid(0.0, 4.0, 0.5), dtype, va, seed)?;
        let b = input(&broadcastable(&s, mask), grid(0.0, 4.0, 0.5), dtype, vb, seed ^ 1)?;
        for op in COMPARE {
            same_exact(|t| t[0].compare(op, t[1]), &[&a, &b])?;
        }
        let cond = a.map(|t| t.ge(&Tensor::full(&[], 2.0, dtype).to_device(t.device())?))?;
        same_exact(|t| t[0].where_(t[1], t[2]), &[&cond, &a, &b])?;
        same_exact(|t| t[0].where_(t[1], t[2]), &[&cond, &b, &a])?;
        Ok(())
    });
}

#[test]
fn casts_between_every_device_dtype() {
    const DTYPES: [DType; 4] = [F32, BF16, F16, U32];
    run(24, (shape(3, 7), view(), any::<u64>()), |(s, v, seed)| {
        for from in DTYPES {
            // Negatives and fractions (u32 truncates and saturates at 0), beyond bf16's integers.
            let x = input(&s, range(-5.0, 300.0), from, v, seed)?;
            for to in DTYPES {
                same_exact(|t| t[0].to_dtype(to), &[&x])?;
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Reductions, softmax, losses, norms
// ---------------------------------------------------------------------------------------------

#[test]
fn sum_and_mean_over_axis_subsets() {
    let masks = (any::<u8>(), any::<u32>());
    let strategy = (shape(4, 7), masks, any::<bool>(), view(), float(), any::<u64>());
    run(
        32,
        strategy,
        |(s, (mask, target_mask), keepdim, v, dtype, seed)| {
            // Mostly positive values, so that sums do not cancel.
            let x = input(&s, range(0.5, 1.5), dtype, v, seed)?;
            let axes: Vec<usize> = (0..s.len()).filter(|i| mask >> i & 1 == 1).collect();
            same(|t| t[0].sum(&axes, keepdim), &[&x])?;
            same(|t| t[0].mean(&axes, keepdim), &[&x])?;
            same(|t| t[0].sum_all(), &[&x])?;
            let target = broadcastable(&s, target_mask);
            same(|t| t[0].sum_to_shape(&target), &[&x])
        },
    );
}

#[test]
fn max_min_argmax_with_ties() {
    let strategy = (
        shape(4, 7),
        any::<usize>(),
        any::<bool>(),
        view(),
        float(),
        any::<u64>(),
    );
    run(32, strategy, |(s, axis, keepdim, v, dtype, seed)| {
        let axis = axis % s.len();
        let x = input(&s, grid(-2.0, 2.0, 0.25), dtype, v, seed)?;
        same_exact(|t| t[0].max(axis, keepdim), &[&x])?;
        same_exact(|t| t[0].min(axis, keepdim), &[&x])?;
        same_exact(|t| t[0].argmax(axis, keepdim), &[&x])
    });
}

#[test]
fn softmax_and_log_softmax_on_each_axis_with_backward() {
    run(
        32,
        (shape(4, 7), view(), view(), float(), any::<u64>()),
        |(s, vx, vg, dtype, seed)| {
            let x = input(&s, range(-1.0, 1.0), dtype, vx, seed)?;
            let g = input(&s, range(-1.0, 1.0), dtype, vg, seed ^ 1)?;
            for (axis, &size) in s.iter().enumerate() {
                same(|t| t[0].softmax(axis), &[&x])?;
                same(|t| t[0].log_softmax(axis), &[&x])?;
                if size == 1 || constant_along(vg, axis) {
                    continue; // the backward is zero up to rounding
                }
                // The backward from the forward outputs of each device.
                let y = x.map(|t| t.softmax(axis))?;
                same(|t| t[0].softmax_backward(t[1], axis), &[&y, &g])?;
                let ly = x.map(|t| t.log_softmax(axis))?;
                same(|t| t[0].log_softmax_backward(t[1], axis), &[&ly, &g])?;
            }
            Ok(())
        },
    );
}

#[test]
fn long_rows_span_many_threads() {
    run(4, (float(), any::<u64>()), |(dtype, seed)| {
        let x = input(&[5, 4099], range(-1.0, 1.0), dtype, View::Contiguous, seed)?;
        let g = input(&[5, 4099], range(-1.0, 1.0), dtype, View::Contiguous, seed ^ 1)?;
        let w = input(&[4099], range(0.5, 1.5), dtype, View::Contiguous, seed ^ 2)?;
        same(|t| t[0].softmax(1), &[&x])?;
        same(|t| t[0].log_softmax(0), &[&x])?;
        same(|t| t[0].rms_norm(t[1], 1e-5), &[&x, &w])?;
        same(|t| t[0].layer_norm(t[1], None, 1e-5), &[&x, &w])?;
        same(|t| Ok(t[0].rms_norm_backward(t[1], t[2], 1e-5)?.1), &[&x, &w, &g])?;
        same(
            |t| Ok(t[0].layer_norm_backward(t[1], t[2], 1e-5)?.0),
            &[&x, &w, &g],
        )?;
        let positive = input(&[129, 2051], range(0.5, 1.5), dtype, View::Contiguous, seed)?;
        same(|t| t[0].sum(&[0], false), &[&positive])?;
        same(|t| t[0].sum(&[1], false), &[&positive])?;
        same_exact(|t| t[0].argmax(1, false), &[&positive])
    });
}

#[test]
fn cross_entropy_with_ignored_rows_and_backward() {
    let strategy = (
        1..=9usize,
        1..=12usize,
        any::<bool>(),
        view(),
        float(),
        any::<u64>(),
    );
    run(32, strategy, |(n, c, ignore_max, v, dtype, seed)| {
        let ignore = if ignore_max { u32::MAX } else { 0 };
        let logits = input(&[n, c], range(-2.0, 2.0), dtype, v, seed)?;
        // About one row in four ignored.
        let values: Vec<f64> = random_ids(n, c, seed)
            .into_iter()
            .zip(random_ids(n, 4, seed ^ 1))
            .map(|(id, r)| if r == 0 { f64::from(ignore) } else { id as f64 })
            .collect();
        let targets = Pair::of(host(values, &[n], U32)?)?;
        same(|t| t[0].cross_entropy(t[1], ignore), &[&logits, &targets])?;
        let grad = scalar(1.5, F32)?;
        same(
            |t| t[0].cross_entropy_backward(t[1], ignore, t[2]),
            &[&logits, &targets, &grad],
        )?;
        // A target out of range (and not ignored) is an error on the GPU too.
        let bad = Pair::of(host(vec![c as f64; n], &[n], U32)?)?;
        let err = logits.gpu.cross_entropy(&bad.gpu, u32::MAX - 1).unwrap_err();
        prop_assert!(matches!(err, TensorError::OutOfRange { .. }), "{err}");
        Ok(())
    });
}

#[test]
fn cross_entropy_over_a_large_vocabulary() {
    run(2, (float(), any::<u64>()), |(dtype, seed)| {
        let logits = input(&[7, 50_281], range(-2.0, 2.0), dtype, View::Contiguous, seed)?;
        let values = random_ids(7, 50_281, seed)
            .into_iter()
            .map(|i| i as f64)
            .collect();
        let targets = Pair::of(host(values, &[7], U32)?)?;
        let grad = scalar(1.0, dtype)?;
        same(|t| t[0].cross_entropy(t[1], u32::MAX), &[&logits, &targets])?;
        same(
            |t| t[0].cross_entropy_backward(t[1], u32::MAX, t[2]),
            &[&logits, &targets, &grad],
        )
    });
}

#[test]
fn rms_norm_and_layer_norm_with_backward() {
    let strategy = (
        shape(3, 5),
        1..=40usize,
        (view(), view(), view()),
        float(),
        any::<u64>(),
    );
    run(32, strategy, |(lead, d, (vx, vw, vg), dtype, seed)| {
        let s = [&lead[..], &[d]].concat();
        let x = input(&s, range(-2.0, 2.0), dtype, vx, seed)?;
        let w = input(&[d], range(0.5, 1.5), dtype, vw, seed ^ 1)?;
        let b = input(&[d], range(-1.0, 1.0), dtype, vw, seed ^ 2)?;
        let g = input(&s, range(-1.0, 1.0), dtype, vg, seed ^ 3)?;
        same(|t| t[0].rms_norm(t[1], 1e-5), &[&x, &w])?;
        // An x constant along the features has x - mean = 0: the LayerNorm's output is then zero
        // up to the rounding of the mean, and a relative error against it measures noise.
        let x_varies = !constant_along(vx, s.len() - 1);
        if x_varies {
            same(|t| t[0].layer_norm(t[1], None, 1e-5), &[&x, &w])?;
            same(|t| t[0].layer_norm(t[1], Some(t[2]), 1e-5), &[&x, &w, &b])?;
        }
        // With one or two features, or a gradient constant along the features, the gradient is a
        // difference of nearly equal terms (the norm removes almost all of it); the CPU's own
        // f32 result is then noise.
        if d >= 3 && !constant_along(vg, s.len() - 1) {
            same(|t| Ok(t[0].rms_norm_backward(t[1], t[2], 1e-5)?.0), &[&x, &w, &g])?;
            same(|t| Ok(t[0].rms_norm_backward(t[1], t[2], 1e-5)?.1), &[&x, &w, &g])?;
            for part in (0..3).filter(|_| x_varies) {
                same(
                    |t| {
                        let (dx, dw, db) = t[0].layer_norm_backward(t[1], t[2], 1e-5)?;
                        Ok([dx, dw, db][part].clone())
                    },
                    &[&x, &w, &g],
                )?;
            }
        }
        Ok(())
    });
}

#[test]
fn residual_add_fused_into_the_norms() {
    let strategy = (shape(3, 5), 1..=40usize, (view(), view()), float(), any::<u64>());
    run(32, strategy, |(lead, d, (vx, vr), dtype, seed)| {
        let s = [&lead[..], &[d]].concat();
        let x = input(&s, range(-2.0, 2.0), dtype, vx, seed)?;
        let r = input(&s, range(-2.0, 2.0), dtype, vr, seed ^ 1)?;
        let w = input(&[d], range(0.5, 1.5), dtype, View::Contiguous, seed ^ 2)?;
        let b = input(&[d], range(-1.0, 1.0), dtype, View::Contiguous, seed ^ 3)?;
        // A sum constant along the features has a LayerNorm output of zero up to the rounding of
        // the mean (see `rms_norm_and_layer_norm_with_backward`): its relative error measures noise.
        let last = s.len() - 1;
        let sum_varies = !(constant_along(vx, last) && constant_along(vr, last));
        for part in 0..2 {
            same(
                |t| {
                    let (y, sum) = t[0].add_rms_norm(t[1], t[2], 1e-5)?;
                    Ok([y, sum][part].clone())
                },
                &[&x, &r, &w],
            )?;
            if part == 0 && !sum_varies {
                continue;
            }
            same(
                |t| {
                    let (y, sum) = t[0].add_layer_norm(t[1], t[2], Some(t[3]), 1e-5)?;
                    Ok([y, sum][part].clone())
                },
                &[&x, &r, &w, &b],
            )?;
        }
        Ok(())
    });
}

#[test]
fn gated_rms_norm_with_backward() {
    let strategy = (
        shape(2, 4),
        (1..=4usize, 1..=24usize),
        (view(), view(), view()),
        float(),
        any::<u64>(),
    );
    run(
        32,
        strategy,
        |(lead, (groups, group), (vx, vz, vg), dtype, seed)| {
            let d = groups * group;
            let s = [&lead[..], &[d]].concat();
            let x = input(&s, range(-2.0, 2.0), dtype, vx, seed)?;
            let z = input(&s, range(-2.0, 2.0), dtype, vz, seed ^ 1)?;
            let w = input(&[d], range(0.5, 1.5), dtype, View::Contiguous, seed ^ 2)?;
            let g = input(&s, range(-1.0, 1.0), dtype, vg, seed ^ 3)?;
            same(|t| t[0].gated_rms_norm(t[1], t[2], group, 1e-5), &[&x, &z, &w])?;
            // As for rms_norm: with fewer than three features per group the gradient is noise.
            if group >= 3 {
                for part in 0..3 {
                    same(
                        |t| {
                            let (dx, dz, dw) = t[0].gated_rms_norm_backward(t[1], t[2], t[3], group, 1e-5)?;
                            Ok([dx, dz, dw][part].clone())
                        },
                        &[&x, &z, &w, &g],
                    )?;
                }
            }
            Ok(())
        },
    );
}

#[test]
fn conv1d_decoding_step() {
    let strategy = (
        (1..=3usize, 1..=9usize, 2..=5usize),
        any::<bool>(),
        (view(), view()),
        float(),
        any::<u64>(),
    );
    run(32, strategy, |((b, c, k), with_bias, (vs, vx), dtype, seed)| {
        let state = input(&[b, c, k - 1], range(-1.0, 1.0), dtype, vs, seed)?;
        let x = input(&[b, c], range(-1.0, 1.0), dtype, vx, seed ^ 1)?;
        let w = input(&[c, k], range(-1.0, 1.0), dtype, View::Contiguous, seed ^ 2)?;
        let bias = input(&[c], range(-1.0, 1.0), dtype, View::Contiguous, seed ^ 3)?;
        same(
            |t| Ok(t[0].conv1d_step(t[1], t[2], with_bias.then_some(t[3]))?.0),
            &[&state, &x, &w, &bias],
        )?;
        // The rolled state only moves elements: exact.
        same_exact(
            |t| Ok(t[0].conv1d_step(t[1], t[2], with_bias.then_some(t[3]))?.1),
            &[&state, &x, &w, &bias],
        )
    });
}

// ---------------------------------------------------------------------------------------------
// Indexing, concatenation, convolution, matmul
// ---------------------------------------------------------------------------------------------

#[test]
fn embedding_index_select_and_index_add() {
    let dtype = prop_oneof![Just(F32), Just(BF16), Just(U32)];
    let strategy = (
        shape(3, 6),
        any::<usize>(),
        0..=9usize,
        view(),
        dtype,
        any::<u64>(),
    );
    run(32, strategy, |(s, axis, n_ids, v, dtype, seed)| {
        let axis = axis % s.len();
        let x = input(&s, grid(-4.0, 4.0, 0.25), dtype, v, seed)?;
        let picked = ids(&[n_ids], s[axis], seed ^ 1)?;
        same_exact(|t| t[0].index_select(axis, t[1]), &[&x, &picked])?;
        // An embedding table [V, D] and ids of any shape.
        let table = x.map(|t| t.reshape(&[s[0], s[1..].iter().product()]))?;
        let lookup = ids(&[2, n_ids.max(1)], s[0], seed ^ 2)?;
        same_exact(|t| t[0].embedding(t[1]), &[&table, &lookup])?;
        let bad = Pair::of(host(vec![s[0] as f64], &[1], U32)?)?;
        let err = table.gpu.embedding(&bad.gpu).unwrap_err();
        prop_assert!(matches!(err, TensorError::OutOfRange { .. }), "{err}");
        if dtype.is_float() {
            // Scatter-add with repeated ids.
            let mut src_shape = s.clone();
            src_shape[axis] = n_ids;
            let src = input(&src_shape, range(0.5, 1.5), dtype, v, seed ^ 3)?;
            let base = input(&s, range(0.5, 1.5), dtype, v, seed ^ 4)?;
            let repeated = ids(&[n_ids], s[axis].min(2), seed ^ 5)?;
            same(|t| t[0].index_add(axis, t[1], t[2]), &[&base, &repeated, &src])?;
        }
        Ok(())
    });
}

#[test]
fn concat_and_stack_along_each_axis() {
    let dtype = prop_oneof![Just(F32), Just(BF16), Just(U32)];
    let strategy = (
        shape(4, 5),
        0..=3usize,
        (view(), view(), view()),
        dtype,
        any::<u64>(),
    );
    run(32, strategy, |(s, len_b, (va, vb, vc), dtype, seed)| {
        for axis in 0..s.len() {
            let mut sb = s.clone();
            sb[axis] = len_b;
            let a = input(&s, grid(-4.0, 4.0, 0.25), dtype, va, seed)?;
            let b = input(&sb, grid(-4.0, 4.0, 0.25), dtype, vb, seed ^ 1)?;
            let c = input(&s, grid(-4.0, 4.0, 0.25), dtype, vc, seed ^ 2)?;
            same_exact(|t| Tensor::concat(t, axis), &[&a, &b, &c])?;
            same_exact(|t| Tensor::stack(&[t[0], t[1]], axis), &[&a, &c])?;
        }
        Ok(())
    });
}

#[test]
fn conv1d_causal_depthwise_with_backward() {
    let strategy = (
        (1..=3usize, 1..=5usize, 1..=9usize, 1..=5usize),
        any::<bool>(),
        (view(), view()),
        float(),
        any::<u64>(),
    );
    run(
        32,
        strategy,
        |((b, c, l, k), with_bias, (vx, vg), dtype, seed)| {
            let x = input(&[b, c, l], range(-1.0, 1.0), dtype, vx, seed)?;
            let w = input(&[c, k], range(-1.0, 1.0), dtype, View::Contiguous, seed ^ 1)?;
            let bias = input(&[c], range(-1.0, 1.0), dtype, View::Contiguous, seed ^ 2)?;
            let g = input(&[b, c, l], range(-1.0, 1.0), dtype, vg, seed ^ 3)?;
            same(
                |t| t[0].conv1d_causal_depthwise(t[1], with_bias.then_some(t[2])),
                &[&x, &w, &bias],
            )?;
            same(
                |t| t[0].conv1d_causal_depthwise_silu(t[1], with_bias.then_some(t[2])),
                &[&x, &w, &bias],
            )?;
            for part in 0..3 {
                same(
                    |t| {
                        let (dx, dw, db) = t[0].conv1d_causal_depthwise_backward(t[1], t[2])?;
                        Ok([dx, dw, db][part].clone())
                    },
                    &[&x, &w, &g],
                )?;
                same(
                    |t| {
                        let bias = with_bias.then_some(t[3]);
                        let (dx, dw, db) = t[0].conv1d_causal_depthwise_silu_backward(t[1], bias, t[2])?;
                        Ok([dx, dw, db][part].clone())
                    },
                    &[&x, &w, &g, &bias],
                )?;
            }
            Ok(())
        },
    );
}

#[test]
fn fused_adamw_update_on_f32_master_weights() {
    let strategy = (
        shape(3, 9),
        float(),
        (view(), view()),
        (1..=20u64, any::<bool>()),
        any::<u64>(),
    );
    run(
        32,
        strategy,
        |(shape, grad_dtype, (vp, vg), (step, decay), seed)| {
            let p = input(&shape, range(-1.0, 1.0), F32, vp, seed)?;
            let g = input(&shape, range(-1.0, 1.0), grad_dtype, vg, seed ^ 1)?;
            let m = input(&shape, range(-0.5, 0.5), F32, View::Contiguous, seed ^ 2)?;
            let v = input(&shape, range(0.0, 0.5), F32, View::Contiguous, seed ^ 3)?;
            let hyper = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: if decay { 0.1 } else { 0.0 },
                step,
            };
            // The CPU update takes one dtype: the gradient widened to f32 (exactly).
            let g_cpu = g.cpu.to_dtype(F32).or_fail()?;
            let cpu = p.cpu.adamw_update(&g_cpu, &m.cpu, &v.cpu, &hyper).or_fail()?;
            let gpu = p.gpu.adamw_update(&g.gpu, &m.gpu, &v.gpu, &hyper).or_fail()?;
            for (c, g) in cpu.iter().zip(&gpu) {
                check_close("AdamW output", c, g, tol(F32))?;
            }
            // In place, on copies that are the only handles on their memory: the same values,
            // written into the same buffers.
            let fresh = |t: &Tensor| t.to_device(Device::Cpu)?.to_device(Device::Cuda(0));
            let (mut pi, mut mi, mut vi) = (
                fresh(&p.gpu).or_fail()?,
                fresh(&m.gpu).or_fail()?,
                fresh(&v.gpu).or_fail()?,
            );
            let before = [&pi, &mi, &vi].map(|t| std::sync::Arc::as_ptr(t.storage()));
            pi.adamw_update_in_place(&g.gpu, &mut mi, &mut vi, &hyper)
                .or_fail()?;
            let after = [&pi, &mi, &vi].map(|t| std::sync::Arc::as_ptr(t.storage()));
            prop_assert_eq!(before, after, "not updated in place");
            for (copied, in_place) in gpu.iter().zip([&pi, &mi, &vi]) {
                prop_assert_eq!(
                    copied.to_vec::<f32>().or_fail()?,
                    in_place.to_vec::<f32>().or_fail()?
                );
            }
            Ok(())
        },
    );
}

#[test]
fn matmul_batched_broadcast_and_transposed() {
    let strategy = (
        (1..=9usize, 1..=9usize, 1..=9usize),
        prop::collection::vec(1..=3usize, 0..=2),
        any::<u32>(),
        (view(), view()),
        float(),
        any::<u64>(),
    );
    run(48, strategy, |((m, k, n), batch, mask, (va, vb), dtype, seed)| {
        let (ba, bb) = if mask & 1 == 0 {
            (batch.clone(), broadcastable(&batch, mask >> 1))
        } else {
            (broadcastable(&batch, mask >> 1), batch.clone())
        };
        // Positive values: no product cancels to nearly zero.
        let a = input(&[&ba[..], &[m, k]].concat(), range(0.1, 1.0), dtype, va, seed)?;
        let b = input(&[&bb[..], &[k, n]].concat(), range(0.1, 1.0), dtype, vb, seed ^ 1)?;
        same(|t| t[0].matmul(t[1]), &[&a, &b])
    });
}

#[test]
fn matmul_of_larger_shapes() {
    run(2, (float(), any::<u64>()), |(dtype, seed)| {
        let a = input(&[2, 67, 515], range(0.1, 1.0), dtype, View::Contiguous, seed)?;
        let b = input(&[515, 129], range(0.1, 1.0), dtype, View::Transposed, seed ^ 1)?;
        same(|t| t[0].matmul(t[1]), &[&a, &b])?;
        let w = input(&[257, 515], range(0.1, 1.0), dtype, View::Contiguous, seed ^ 2)?;
        // x · wᵀ, as a linear layer computes it.
        same(|t| t[0].matmul(&t[1].t()?), &[&a, &w])
    });
}

// ---------------------------------------------------------------------------------------------
// Layout, device moves, constructors, errors
// ---------------------------------------------------------------------------------------------

#[test]
fn views_copy_and_move_between_devices_exactly() {
    let dtype = prop_oneof![Just(F32), Just(BF16), Just(F16), Just(U32)];
    run(
        32,
        (shape(5, 5), view(), dtype, any::<u64>()),
        |(s, v, dtype, seed)| {
            let x = input(&s, grid(-4.0, 4.0, 0.125), dtype, v, seed)?;
            let copy = x.gpu.try_contiguous().or_fail()?;
            prop_assert!(copy.is_contiguous());
            check_exact(&x.cpu.contiguous(), &copy)?;
            same_exact(|t| t[0].reshape(&[t[0].numel()]), &[&x])?;
            // Host -> device -> host is the identity on the values.
            let back = x.gpu.to_device(Device::Cpu).or_fail()?;
            prop_assert_eq!(back.device(), Device::Cpu);
            prop_assert_eq!(back.to_vec_f64(), x.cpu.to_vec_f64());
            let up = x.cpu.to_device(GPU).or_fail()?;
            check_exact(&x.cpu, &up)
        },
    );
}

#[test]
fn constructors_on_the_device() {
    if !gpu_ready() {
        return;
    }
    for dtype in [F32, BF16, F16, U32] {
        let z = Tensor::zeros_on(&[3, 5], dtype, GPU).unwrap();
        assert_eq!((z.device(), z.to_vec_f64()), (GPU, vec![0.0; 15]));
        let o = Tensor::full_on(&[2], 7.0, dtype, GPU).unwrap();
        assert_eq!(o.to_vec_f64(), vec![7.0; 2]);
        assert_eq!(
            Tensor::ones_on(&[], dtype, GPU).unwrap().to_scalar_f64().unwrap(),
            1.0
        );
    }
}

#[test]
fn mixed_devices_and_missing_kernels_are_typed_errors() {
    if !gpu_ready() {
        return;
    }
    let cpu = Tensor::ones(&[2, 3], F32);
    let gpu = cpu.to_device(GPU).unwrap();
    let err = cpu.add(&gpu).unwrap_err();
    assert!(matches!(err, TensorError::DeviceMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("cpu") && msg.contains("cuda:0"), "{msg}");
    assert!(gpu.matmul(&cpu.t().unwrap()).is_err());
    // f64 has no CUDA kernels.
    let err = Tensor::ones(&[2], F64).to_device(GPU).unwrap_err();
    assert!(matches!(err, TensorError::DeviceDType { .. }), "{err}");
}

#[test]
fn without_a_gpu_moving_to_cuda_is_an_error_naming_what_is_missing() {
    let t = Tensor::ones(&[2], F32);
    match tensor::cuda_device(0) {
        // A GPU is here: the move works.
        Ok(_) => assert_eq!(t.to_device(GPU).unwrap().device(), GPU),
        Err(_) => {
            let err = t.to_device(GPU).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, TensorError::Cuda { .. }), "{msg}");
            assert!(msg.contains("cuda:0"), "{msg}");
            assert!(msg.contains("libcuda") || msg.contains("no CUDA device"), "{msg}");
        }
    }
    let err = Tensor::ones(&[2], F64).to_device(GPU).unwrap_err();
    assert!(matches!(err, TensorError::DeviceDType { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Autograd
// ---------------------------------------------------------------------------------------------

/// Loss and parameter gradients of a two-layer MLP with cross-entropy (one ignored row), with
/// every tensor on `device`.
fn mlp_gradients(
    params: &[Tensor],
    x: &Tensor,
    targets: &Tensor,
    device: Device,
) -> autograd::Result<Vec<Tensor>> {
    let on = |t: &Tensor| t.to_device(device);
    let vars: Vec<Var> = params
        .iter()
        .map(|p| Ok(Var::parameter(on(p)?)))
        .collect::<autograd::Result<_>>()?;
    let (w1, b1, w2, b2) = (&vars[0], &vars[1], &vars[2], &vars[3]);
    let x = Var::constant(on(x)?);
    let h = x.matmul(&w1.transpose(0, 1)?)?.add(b1)?.gelu_tanh()?;
    let logits = h.matmul(w2)?.add(b2)?;
    let loss = logits.cross_entropy(&on(targets)?, 3)?;
    loss.backward()?;
    let mut out = vec![loss.value().clone()];
    for v in &vars {
        out.push(v.grad().expect("every parameter gets a gradient"));
    }
    Ok(out)
}

#[test]
fn mlp_with_cross_entropy_has_the_cpu_gradients_on_the_gpu() {
    run(8, (1..=9usize, 1..=17usize, any::<u64>()), |(n, hidden, seed)| {
        let (d, c) = (5, 4);
        let p = |shape: &[usize], k: u64| {
            host(
                range(-1.0, 1.0).values(shape.iter().product(), seed ^ k),
                shape,
                F32,
            )
        };
        // w1 stored [hidden, d] and used transposed, as a linear layer does.
        let params = [
            p(&[hidden, d], 1)?,
            p(&[hidden], 2)?,
            p(&[hidden, c], 3)?,
            p(&[c], 4)?,
        ];
        let x = p(&[n, d], 5)?;
        let targets: Vec<f64> = random_ids(n, c, seed).into_iter().map(|i| i as f64).collect();
        let targets = host(targets, &[n], U32)?;
        let cpu = mlp_gradients(&params, &x, &targets, Device::Cpu).or_fail()?;
        let gpu = mlp_gradients(&params, &x, &targets, GPU).or_fail()?;
        for (c, g) in cpu.iter().zip(&gpu) {
            check(c, g)?;
        }
        Ok(())
    });
}
