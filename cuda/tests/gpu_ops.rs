//! Kernels against plain Rust references on random inputs (fresh seeds, printed on failure).
//! Outputs are poisoned with NaN before each launch, so an element a kernel skips shows up.
//! Relative error ‖out − ref‖₂ / ‖ref‖₂ must stay below 1e-5 for f32 and 1e-2 for bf16.
//!
//! Without a GPU every test prints one line and returns; with `EMMA_REQUIRE_GPU=1` a missing
//! GPU fails them instead.

use cuda::kernels::{AdamWStep, BinaryOp, NormSpec, Residual, RmsNormGrads, UnaryOp};
use cuda::{bf16, FloatElem, GemmSpec, GpuDevice, View};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The device, or `None` after printing why the test is skipped.
fn device() -> Option<GpuDevice> {
    match GpuDevice::open(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            if std::env::var("EMMA_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("EMMA_REQUIRE_GPU=1 but no usable GPU: {e}");
            }
            eprintln!("skipped: no GPU ({e})");
            None
        }
    }
}

macro_rules! gpu_or_skip {
    () => {
        match device() {
            Some(dev) => dev,
            None => return,
        }
    };
}

/// A random generator with a fresh seed, and the seed (for failure messages).
fn rng() -> (StdRng, u64) {
    let seed = rand::random::<u64>();
    (StdRng::seed_from_u64(seed), seed)
}

/// The element types tested, with their conversions and tolerance.
trait Elem: FloatElem {
    const TOL: f64;
    fn of(v: f64) -> Self;
    fn f64(self) -> f64;
}

impl Elem for f32 {
    const TOL: f64 = 1e-5;
    fn of(v: f64) -> Self {
        v as f32
    }
    fn f64(self) -> f64 {
        f64::from(self)
    }
}

impl Elem for bf16 {
    const TOL: f64 = 1e-2;
    fn of(v: f64) -> Self {
        bf16::from_f64(v)
    }
    fn f64(self) -> f64 {
        self.to_f64()
    }
}

/// `n` values uniform in `lo..hi`, rounded to T.
fn random<T: Elem>(rng: &mut StdRng, n: usize, (lo, hi): (f64, f64)) -> Vec<T> {
    (0..n).map(|_| T::of(rng.gen_range(lo..hi))).collect()
}

fn widen<T: Elem>(v: &[T]) -> Vec<f64> {
    v.iter().map(|&x| x.f64()).collect()
}

/// ‖out − ref‖₂ / ‖ref‖₂ (absolute when the reference is 0).
fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let diff: f64 = out
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = reference.iter().map(|b| b * b).sum::<f64>().sqrt();
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
}

/// Asserts the relative error is within T's tolerance.
fn check<T: Elem>(what: &str, seed: u64, out: &[T], reference: &[f64]) {
    let out = widen(out);
    assert!(
        out.iter().all(|v| v.is_finite()),
        "{what} (seed {seed}): non-finite output"
    );
    let e = rel_err(&out, reference);
    assert!(
        e < T::TOL,
        "{what} (seed {seed}): relative error {e:e} >= {:e}",
        T::TOL
    );
}

/// A buffer of `n` NaNs.
fn poisoned<T: Elem>(dev: &GpuDevice, n: usize) -> cuda::DeviceBuffer<T> {
    dev.full(n, T::of(f64::NAN)).unwrap()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// A unary op, the input range it is tested on, and its f64 reference.
type UnaryCase = (UnaryOp, (f64, f64), fn(f64) -> f64);

/// Every unary op.
fn unary_cases() -> Vec<UnaryCase> {
    vec![
        (UnaryOp::Neg, (-3.0, 3.0), |x| -x),
        (UnaryOp::Exp, (-3.0, 3.0), f64::exp),
        (UnaryOp::Log, (0.1, 5.0), f64::ln),
        (UnaryOp::Sqrt, (0.1, 5.0), f64::sqrt),
        (UnaryOp::Rsqrt, (0.1, 5.0), |x| 1.0 / x.sqrt()),
        (UnaryOp::Tanh, (-3.0, 3.0), f64::tanh),
        (UnaryOp::Sigmoid, (-6.0, 6.0), sigmoid),
        (UnaryOp::Silu, (-6.0, 6.0), |x| x * sigmoid(x)),
        (UnaryOp::GeluTanh, (-4.0, 4.0), |x| {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }),
        (UnaryOp::GeluErf, (-4.0, 4.0), |x| {
            0.5 * x * (1.0 + libm::erf(x / 2f64.sqrt()))
        }),
        (UnaryOp::Softplus, (-8.0, 8.0), |x| {
            x.max(0.0) + (-x.abs()).exp().ln_1p()
        }),
        (UnaryOp::Abs, (-3.0, 3.0), f64::abs),
        (UnaryOp::Sqr, (-3.0, 3.0), |x| x * x),
        (UnaryOp::Recip, (0.2, 4.0), |x| 1.0 / x),
        (UnaryOp::Powf(1.7), (0.1, 4.0), |x| x.powf(1.7)),
        (UnaryOp::Clamp(-0.5, 0.75), (-2.0, 2.0), |x| x.clamp(-0.5, 0.75)),
        (UnaryOp::Affine(2.5, -1.0), (-2.0, 2.0), |x| 2.5 * x - 1.0),
        (UnaryOp::Relu, (-2.0, 2.0), |x| x.max(0.0)),
    ]
}

fn unary_for<T: Elem>(dev: &GpuDevice) {
    let (mut rng, seed) = rng();
    let n = 4096 + rng.gen_range(1..64); // vector body and a scalar tail
    for (op, range, f) in unary_cases() {
        let x = random::<T>(&mut rng, n, range);
        let xd = dev.upload(&x).unwrap();
        let mut y = poisoned::<T>(dev, n);
        dev.unary(op, &xd, &mut y).unwrap();
        let reference: Vec<f64> = x.iter().map(|v| f(v.f64())).collect();
        check(&format!("{op:?}"), seed, &dev.download(&y).unwrap(), &reference);
    }
}

#[test]
fn unary_ops_match_the_reference() {
    let dev = gpu_or_skip!();
    unary_for::<f32>(&dev);
    unary_for::<bf16>(&dev);
}

#[test]
fn unary_strided_and_backward() {
    let dev = gpu_or_skip!();
    let (mut rng, seed) = rng();
    let (r, c) = (37, 53);
    let x = random::<f32>(&mut rng, r * c, (-3.0, 3.0));
    let xd = dev.upload(&x).unwrap();
    // The transpose [c, r] of x [r, c].
    let view = View {
        shape: vec![c, r],
        strides: vec![1, c],
        offset: 0,
    };
    let mut y = poisoned::<f32>(&dev, r * c);
    dev.unary_strided(UnaryOp::Tanh, (&xd, &view), &mut y).unwrap();
    let reference: Vec<f64> = (0..c)
        .flat_map(|j| (0..r).map(move |i| (i, j)))
        .map(|(i, j)| f64::from(x[i * c + j]).tanh())
        .collect();
    check("tanh strided", seed, &dev.download(&y).unwrap(), &reference);

    let g = random::<f32>(&mut rng, r * c, (-1.0, 1.0));
    let gd = dev.upload(&g).unwrap();
    let mut dx = poisoned::<f32>(&dev, r * c);
    dev.unary_backward(UnaryOp::Silu, &xd, &gd, &mut dx).unwrap();
    let reference: Vec<f64> = x
        .iter()
        .zip(&g)
        .map(|(&x, &g)| {
            let (x, s) = (f64::from(x), sigmoid(f64::from(x)));
            f64::from(g) * s * (1.0 + x * (1.0 - s))
        })
        .collect();
    check("silu backward", seed, &dev.download(&dx).unwrap(), &reference);
}

fn binary_for<T: Elem>(dev: &GpuDevice) {
    let (mut rng, seed) = rng();
    let (b, m, n) = (3, 17, 129);
    let a = random::<T>(&mut rng, b * m * n, (-2.0, 2.0));
    let col = random::<T>(&mut rng, m, (0.5, 2.0));
    let (ad, cd) = (dev.upload(&a).unwrap(), dev.upload(&col).unwrap());
    let (va, vc) = (View::contiguous(&[b, m, n]), View::contiguous(&[m, 1]));
    type Case = (BinaryOp, fn(f64, f64) -> f64);
    let ops: [Case; 6] = [
        (BinaryOp::Add, |x, y| x + y),
        (BinaryOp::Sub, |x, y| x - y),
        (BinaryOp::Mul, |x, y| x * y),
        (BinaryOp::Div, |x, y| x / y),
        (BinaryOp::Maximum, f64::max),
        (BinaryOp::Minimum, f64::min),
    ];
    for (op, f) in ops {
        let mut out = poisoned::<T>(dev, b * m * n);
        dev.binary_broadcast(op, (&ad, &va), (&cd, &vc), &mut out, &[b, m, n])
            .unwrap();
        let reference: Vec<f64> = (0..b * m * n)
            .map(|i| f(a[i].f64(), col[(i / n) % m].f64()))
            .collect();
        check(
            &format!("{op:?} broadcast"),
            seed,
            &dev.download(&out).unwrap(),
            &reference,
        );
    }
}

#[test]
fn broadcasting_binary_ops_match_the_reference() {
    let dev = gpu_or_skip!();
    binary_for::<f32>(&dev);
    binary_for::<bf16>(&dev);
}

fn softmax_reference(x: &[f64], len: usize, log: bool) -> Vec<f64> {
    x.chunks(len)
        .flat_map(|row| {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
            row.iter()
                .map(move |v| if log { (v - m) - s.ln() } else { (v - m).exp() / s })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn softmax_for<T: Elem>(dev: &GpuDevice) {
    let (mut rng, seed) = rng();
    for (rows, len) in [(7, 1), (33, 100), (5, 5000)] {
        let x = random::<T>(&mut rng, rows * len, (-5.0, 5.0));
        let xd = dev.upload(&x).unwrap();
        for log in [false, true] {
            let mut y = poisoned::<T>(dev, rows * len);
            if log {
                dev.log_softmax(&xd, &mut y, rows, len).unwrap();
            } else {
                dev.softmax(&xd, &mut y, rows, len).unwrap();
            }
            let reference = softmax_reference(&widen(&x), len, log);
            let what = format!("softmax log={log} [{rows}, {len}]");
            check(&what, seed, &dev.download(&y).unwrap(), &reference);
        }
        // Backward of softmax from its (device) output.
        let mut y = poisoned::<T>(dev, rows * len);
        dev.softmax(&xd, &mut y, rows, len).unwrap();
        let yh = widen(&dev.download(&y).unwrap());
        let g = random::<T>(&mut rng, rows * len, (-1.0, 1.0));
        let gd = dev.upload(&g).unwrap();
        let mut dx = poisoned::<T>(dev, rows * len);
        dev.softmax_backward(&y, &gd, &mut dx, (rows, len), false)
            .unwrap();
        let reference: Vec<f64> = yh
            .chunks(len)
            .zip(widen(&g).chunks(len))
            .flat_map(|(yr, gr)| {
                let dot: f64 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                yr.iter()
                    .zip(gr)
                    .map(move |(a, b)| a * (b - dot))
                    .collect::<Vec<_>>()
            })
            .collect();
        check(
            &format!("softmax backward [{rows}, {len}]"),
            seed,
            &dev.download(&dx).unwrap(),
            &reference,
        );
    }
}

#[test]
fn softmax_matches_the_reference() {
    let dev = gpu_or_skip!();
    softmax_for::<f32>(&dev);
    softmax_for::<bf16>(&dev);
}

fn rms_norm_for<T: Elem>(dev: &GpuDevice) {
    let (mut rng, seed) = rng();
    let eps = 1e-5;
    for (rows, d) in [(3, 7), (65, 96), (9, 3000)] {
        let x = random::<T>(&mut rng, rows * d, (-2.0, 2.0));
        let res = random::<T>(&mut rng, rows * d, (-1.0, 1.0));
        let w = random::<T>(&mut rng, d, (0.5, 1.5));
        let (xd, rd, wd) = (
            dev.upload(&x).unwrap(),
            dev.upload(&res).unwrap(),
            dev.upload(&w).unwrap(),
        );
        let spec = NormSpec::new(rows, d, eps);
        let mut y = poisoned::<T>(dev, rows * d);
        let mut h = poisoned::<T>(dev, rows * d);
        let residual = Residual {
            input: &rd,
            sum_out: &mut h,
        };
        dev.rms_norm(&xd, Some(residual), &wd, &mut y, spec).unwrap();
        // h = x + res rounded to T, then the norm.
        let hv: Vec<f64> = x
            .iter()
            .zip(&res)
            .map(|(a, b)| T::of(a.f64() + b.f64()).f64())
            .collect();
        let wv = widen(&w);
        let reference: Vec<f64> = hv
            .chunks(d)
            .flat_map(|row| {
                let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
                row.iter()
                    .zip(&wv)
                    .map(move |(v, w)| v * r * w)
                    .collect::<Vec<_>>()
            })
            .collect();
        let what = format!("rms_norm [{rows}, {d}]");
        check(&what, seed, &dev.download(&y).unwrap(), &reference);
        check(&format!("{what} residual"), seed, &dev.download(&h).unwrap(), &hv);

        // Backward from x (no residual).
        let g = random::<T>(&mut rng, rows * d, (-1.0, 1.0));
        let gd = dev.upload(&g).unwrap();
        let (mut dx, mut dw) = (poisoned::<T>(dev, rows * d), poisoned::<T>(dev, d));
        let grads = RmsNormGrads {
            dx: &mut dx,
            dweight: &mut dw,
        };
        dev.rms_norm_backward(&xd, &wd, &gd, grads, spec).unwrap();
        let (xv, gv) = (widen(&x), widen(&g));
        let mut dx_ref = vec![0.0; rows * d];
        let mut dw_ref = vec![0.0; d];
        for r in 0..rows {
            let (xr, gr) = (&xv[r * d..][..d], &gv[r * d..][..d]);
            let inv = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
            let dot = (0..d).map(|j| gr[j] * wv[j] * xr[j]).sum::<f64>() / d as f64;
            for j in 0..d {
                dx_ref[r * d + j] = inv * gr[j] * wv[j] - xr[j] * inv * inv * inv * dot;
                dw_ref[j] += gr[j] * xr[j] * inv;
            }
        }
        check(&format!("{what} dx"), seed, &dev.download(&dx).unwrap(), &dx_ref);
        check(
            &format!("{what} dweight"),
            seed,
            &dev.download(&dw).unwrap(),
            &dw_ref,
        );
    }
}

#[test]
fn rms_norm_matches_the_reference() {
    let dev = gpu_or_skip!();
    rms_norm_for::<f32>(&dev);
    rms_norm_for::<bf16>(&dev);
}

#[test]
fn cross_entropy_matches_the_reference() {
    let dev = gpu_or_skip!();
    let (mut rng, seed) = rng();
    let (rows, classes, ignore) = (67, 1001, u32::MAX);
    let x = random::<f32>(&mut rng, rows * classes, (-4.0, 4.0));
    let targets: Vec<u32> = (0..rows)
        .map(|r| {
            if r % 7 == 3 {
                ignore
            } else {
                rng.gen_range(0..classes as u32)
            }
        })
        .collect();
    let (xd, td) = (dev.upload(&x).unwrap(), dev.upload(&targets).unwrap());
    let (loss, count) = dev.cross_entropy(&xd, &td, (rows, classes), ignore).unwrap();
    let xv = widen(&x);
    let lse: Vec<f64> = xv
        .chunks(classes)
        .map(|row| {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
        })
        .collect();
    let counted: Vec<usize> = (0..rows).filter(|&r| targets[r] != ignore).collect();
    let want = counted
        .iter()
        .map(|&r| lse[r] - xv[r * classes + targets[r] as usize])
        .sum::<f64>()
        / counted.len() as f64;
    check("cross_entropy", seed, &dev.download(&loss).unwrap(), &[want]);
    assert_eq!(dev.download(&count).unwrap(), vec![counted.len() as u32]);

    let grad = dev.upload(&[2.0f32]).unwrap();
    let mut dx = poisoned::<f32>(&dev, rows * classes);
    dev.cross_entropy_backward(&xd, &td, &grad, &mut dx, (rows, classes), ignore)
        .unwrap();
    let scale = 2.0 / counted.len() as f64;
    let reference: Vec<f64> = (0..rows * classes)
        .map(|i| {
            let (r, j) = (i / classes, i % classes);
            if targets[r] == ignore {
                return 0.0;
            }
            let p = (xv[i] - lse[r]).exp();
            (if j == targets[r] as usize { p - 1.0 } else { p }) * scale
        })
        .collect();
    check(
        "cross_entropy backward",
        seed,
        &dev.download(&dx).unwrap(),
        &reference,
    );

    // An out-of-range target is an error naming its row.
    let mut bad = targets.clone();
    bad[5] = classes as u32 + 3;
    let bd = dev.upload(&bad).unwrap();
    let err = dev
        .cross_entropy(&xd, &bd, (rows, classes), ignore)
        .unwrap_err()
        .to_string();
    assert!(err.contains("position 5"), "{err}");
}

#[test]
fn adamw_matches_the_reference() {
    let dev = gpu_or_skip!();
    let (mut rng, seed) = rng();
    let n = 10_007;
    let p0 = random::<f32>(&mut rng, n, (-1.0, 1.0));
    let mut pd = dev.upload(&p0).unwrap();
    let (mut md, mut vd) = (dev.zeros::<f32>(n).unwrap(), dev.zeros::<f32>(n).unwrap());
    let mut copy = poisoned::<bf16>(&dev, n);
    let (mut p, mut m, mut v) = (widen(&p0), vec![0.0; n], vec![0.0; n]);
    let (lr, b1, b2, eps, wd) = (1e-2, 0.9, 0.999, 1e-8, 0.1);
    for step in 1..=3u64 {
        let g = random::<f32>(&mut rng, n, (-1.0, 1.0));
        let gd = dev.upload(&g).unwrap();
        let s = AdamWStep {
            lr,
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
            step,
        };
        dev.adamw(&mut pd, &gd, (&mut md, &mut vd), Some(&mut copy), &s)
            .unwrap();
        let (bc1, bc2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
        for i in 0..n {
            let g = f64::from(g[i]);
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            p[i] = p[i] * (1.0 - lr * wd) - lr * (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
        }
    }
    check("adamw weights", seed, &dev.download(&pd).unwrap(), &p);
    check("adamw m", seed, &dev.download(&md).unwrap(), &m);
    check("adamw v", seed, &dev.download(&vd).unwrap(), &v);
    check("adamw bf16 copy", seed, &dev.download(&copy).unwrap(), &p);
}

/// Row-major reference of one product per `spec`.
fn gemm_reference(a: &[f64], b: &[f64], bias: Option<&[f64]>, s: GemmSpec) -> Vec<f64> {
    let mut c = vec![0.0; s.batch * s.m * s.n];
    for t in 0..s.batch {
        let (a, b) = (&a[t * s.stride_a..], &b[t * s.stride_b..]);
        for i in 0..s.m {
            for j in 0..s.n {
                let mut acc = 0.0;
                for l in 0..s.k {
                    let av = if s.trans_a { a[l * s.m + i] } else { a[i * s.k + l] };
                    let bv = if s.trans_b { b[j * s.k + l] } else { b[l * s.n + j] };
                    acc += av * bv;
                }
                c[t * s.m * s.n + i * s.n + j] = f64::from(s.alpha) * acc + bias.map_or(0.0, |bias| bias[j]);
            }
        }
    }
    c
}

fn gemm_for<T: Elem>(dev: &GpuDevice) {
    let (mut rng, seed) = rng();
    for (m, n, k, batch) in [(33, 17, 65, 1), (64, 128, 96, 3), (1, 200, 31, 2)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let spec = GemmSpec {
                alpha: 0.5,
                ..GemmSpec::new(m, n, k).batched(batch).transposed(ta, tb)
            };
            let a = random::<T>(&mut rng, batch * m * k, (-1.0, 1.0));
            let b = random::<T>(&mut rng, batch * k * n, (-1.0, 1.0));
            let (ad, bd) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
            let mut c = poisoned::<T>(dev, batch * m * n);
            dev.gemm(&ad, &bd, &mut c, spec).unwrap();
            let reference = gemm_reference(&widen(&a), &widen(&b), None, spec);
            let what = format!("gemm {m}x{n}x{k} batch {batch} trans ({ta}, {tb})");
            check(&what, seed, &dev.download(&c).unwrap(), &reference);

            let bias = random::<T>(&mut rng, n, (-1.0, 1.0));
            let biasd = dev.upload(&bias).unwrap();
            let mut c = poisoned::<T>(dev, batch * m * n);
            dev.gemm_bias((&ad, &bd), &biasd, &mut c, spec).unwrap();
            let reference = gemm_reference(&widen(&a), &widen(&b), Some(&widen(&bias)), spec);
            check(
                &format!("{what} + bias"),
                seed,
                &dev.download(&c).unwrap(),
                &reference,
            );
        }
    }
}

#[test]
fn gemm_matches_the_reference() {
    let dev = gpu_or_skip!();
    gemm_for::<f32>(&dev);
    gemm_for::<bf16>(&dev);
}

#[test]
fn the_allocator_reuses_freed_blocks() {
    let dev = gpu_or_skip!();
    let before = dev.memory_stats();
    let a = dev.alloc::<f32>(1000).unwrap();
    let ptr = a.device_ptr();
    drop(a);
    let b = dev.alloc::<f32>(900).unwrap();
    assert_eq!(b.device_ptr(), ptr, "same size class, same block");
    let after = dev.memory_stats();
    assert!(after.reuses > before.reuses);
    assert!(after.peak_in_use >= after.in_use);
}
