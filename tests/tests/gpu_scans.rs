//! The Mamba scan kernels on `Device::Cuda(0)` against the CPU reference: the Mamba-1 selective
//! scan and the Mamba-2 SSD chunk scan, forward and every gradient, and both one-token state
//! updates.
//!
//! Shapes are drawn at random: lengths 1, 7, 255, 256, 257 and 2049 (around the kernels' chunk
//! and tile sizes), state sizes 16 and 128, several heads per group, chunk sizes that do and do
//! not divide the length; with and without D, z, the dt bias, softplus and an initial state;
//! f32 and bf16. Inputs are drawn fresh from a seed. Before every GPU call the caching allocator
//! is handed NaN-filled blocks of the outputs' sizes, so an output element the kernels never
//! write shows up as NaN; NaN or infinity never passes.
//!
//! The error is the relative L2 error of each whole output, ‖gpu − cpu‖ / ‖cpu‖: in f32 below
//! 1e-5 for forward outputs and 1e-4 for gradients (both sides sum in f32, in different orders),
//! and 1e-3 for the SSD gradients that sum over every step of every sequence (dA, dD,
//! d(dt_bias)), where the chunked GPU order and the sequential CPU order drift further apart;
//! 1e-2 in bf16.
//!
//! Without a GPU every test prints one line `skipped: <reason>` and passes; with
//! `EMMA_REQUIRE_GPU=1` it fails instead.

use proptest::prelude::*;
use tensor::DType::{BF16, F32};
use tensor::{DType, SelectiveScanGrads, SsdGrads, Tensor, TensorError};
use tests::gpu::{check_close, gpu_ready, run, OrFail, Pair, Side, TestResult, GPU};
use tests::{random_ref, to_tensor};

/// What an output is, for its tolerance.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A forward output.
    Forward,
    /// A gradient.
    Grad,
    /// A gradient summed over every step of every sequence (SSD's dA, dD, d(dt_bias)).
    Reduced,
}

/// The largest relative error allowed for `kind` in `dtype`.
fn tol(dtype: DType, kind: Kind) -> f64 {
    match (dtype, kind) {
        (F32, Kind::Forward) => 1e-5,
        (F32, Kind::Grad) => 1e-4,
        (F32, Kind::Reduced) => 1e-3,
        _ => 1e-2,
    }
}

/// [`check_close`] with the tolerance of `kind` in the output's dtype.
fn check(name: &str, cpu: &Tensor, gpu: &Tensor, kind: Kind) -> TestResult {
    check_close(name, cpu, gpu, tol(cpu.dtype(), kind))
}

/// A gradient summed over every step of every sequence, whose f32 value can lose digits to
/// cancellation: the GPU's relative error against the f64 reference `exact` must be within
/// `kind`'s tolerance or within twice the CPU's own f32 error, whichever is larger.
fn check_reduced(name: &str, cpu: &Tensor, gpu: &Tensor, exact: &Tensor) -> TestResult {
    let own = tests::rel_error(cpu, exact);
    let allowed = tol(cpu.dtype(), Kind::Reduced).max(2.0 * own);
    let exact_here = exact.to_dtype(cpu.dtype()).or_fail()?;
    check_close(
        &format!("{name} (CPU f32 error {own:e})"),
        &exact_here,
        gpu,
        allowed,
    )
}

/// Compares two optional outputs: both absent, or both present and close.
fn check_opt(name: &str, cpu: &Option<Tensor>, gpu: &Option<Tensor>, kind: Kind) -> TestResult {
    match (cpu, gpu) {
        (None, None) => Ok(()),
        (Some(c), Some(g)) => check(name, c, g, kind),
        _ => Err(TestCaseError::fail(format!(
            "{name}: present on one device only (cpu {}, gpu {})",
            cpu.is_some(),
            gpu.is_some()
        ))),
    }
}

/// Hands the caching allocator NaN-filled blocks of each of `shapes`, so that the next
/// allocations of those sizes (the op's outputs) start out as NaN.
fn poison(shapes: &[&[usize]], dtype: DType) -> TestResult {
    let mut blocks = Vec::new();
    for shape in shapes {
        for _ in 0..3 {
            blocks.push(Tensor::full_on(shape, f64::NAN, dtype, GPU).or_fail()?);
        }
    }
    drop(blocks);
    Ok(())
}

/// Values uniform in `[lo, hi)` from `seed`, rounded to `dtype`, on both devices.
fn pair(shape: &[usize], lo: f64, hi: f64, seed: u64, dtype: DType) -> Result<Pair, TestCaseError> {
    Pair::of(to_tensor(&random_ref(shape, lo, hi, seed), dtype))
}

/// An optional input on both devices.
fn maybe(
    given: bool,
    shape: &[usize],
    lo: f64,
    hi: f64,
    seed: u64,
    dtype: DType,
) -> Result<Option<Pair>, TestCaseError> {
    given.then(|| pair(shape, lo, hi, seed, dtype)).transpose()
}

/// The copy on `side` of an optional input.
fn opt_on(p: &Option<Pair>, side: Side) -> Option<&Tensor> {
    p.as_ref().map(|p| p.on(side))
}

/// f32 or bf16.
fn float() -> impl Strategy<Value = DType> {
    prop_oneof![Just(F32), Just(BF16)]
}

/// Sequence lengths around the chunk and tile sizes.
fn length() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 7, 255, 256, 257, 2049])
}

/// Which optional parts a case has.
#[derive(Clone, Copy, Debug)]
struct Options {
    d_skip: bool,
    z: bool,
    bias: bool,
    softplus: bool,
    initial: bool,
}

fn options() -> impl Strategy<Value = Options> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(d_skip, z, bias, softplus, initial)| Options {
            d_skip,
            z,
            bias,
            softplus,
            initial,
        })
}

/// The value ranges of dt and its bias: around zero through softplus, small and positive
/// without it (a negative step would make the state grow without bound).
fn dt_ranges(softplus: bool) -> ((f64, f64), (f64, f64)) {
    if softplus {
        ((-1.0, 1.0), (-0.5, 0.5))
    } else {
        ((0.02, 0.3), (0.0, 0.1))
    }
}

// ---------------------------------------------------------------------------------------------
// Mamba-1 selective scan
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct ScanCase {
    batch: usize,
    dim: usize,
    len: usize,
    state: usize,
    opts: Options,
    dtype: DType,
    seed: u64,
}

fn scan_case() -> impl Strategy<Value = ScanCase> {
    (
        1usize..=3,
        1usize..=9,
        length(),
        prop::sample::select(vec![16usize, 128, 5]),
        options(),
        float(),
        any::<u64>(),
    )
        .prop_map(|(batch, dim, len, state, opts, dtype, seed)| ScanCase {
            batch,
            dim,
            len,
            state,
            opts,
            dtype,
            seed,
        })
}

/// The operands of a selective scan: u, delta, A, B, C, D, z, delta_bias.
struct ScanOperands {
    u: Pair,
    delta: Pair,
    a: Pair,
    b: Pair,
    c: Pair,
    d_skip: Option<Pair>,
    z: Option<Pair>,
    bias: Option<Pair>,
}

impl ScanOperands {
    fn new(k: &ScanCase) -> Result<Self, TestCaseError> {
        let (bs, d, l, n, t, s) = (k.batch, k.dim, k.len, k.state, k.dtype, k.seed);
        let (dt, bias) = dt_ranges(k.opts.softplus);
        Ok(ScanOperands {
            u: pair(&[bs, d, l], -1.0, 1.0, s, t)?,
            delta: pair(&[bs, d, l], dt.0, dt.1, s ^ 1, t)?,
            a: pair(&[d, n], -2.0, -0.2, s ^ 2, t)?,
            b: pair(&[bs, n, l], -1.0, 1.0, s ^ 3, t)?,
            c: pair(&[bs, n, l], -1.0, 1.0, s ^ 4, t)?,
            d_skip: maybe(k.opts.d_skip, &[d], -1.0, 1.0, s ^ 5, t)?,
            z: maybe(k.opts.z, &[bs, d, l], -2.0, 2.0, s ^ 6, t)?,
            bias: maybe(k.opts.bias, &[d], bias.0, bias.1, s ^ 7, t)?,
        })
    }

    /// The selective scan of the copies on `side`.
    fn scan(&self, side: Side, softplus: bool) -> tensor::Result<(Tensor, Tensor)> {
        self.u.on(side).selective_scan(
            self.delta.on(side),
            self.a.on(side),
            self.b.on(side),
            self.c.on(side),
            opt_on(&self.d_skip, side),
            opt_on(&self.z, side),
            opt_on(&self.bias, side),
            softplus,
        )
    }

    /// Its backward given dL/dy `grad`, on `side`.
    fn backward(&self, side: Side, softplus: bool, grad: &Pair) -> tensor::Result<SelectiveScanGrads> {
        self.u.on(side).selective_scan_backward(
            self.delta.on(side),
            self.a.on(side),
            self.b.on(side),
            self.c.on(side),
            opt_on(&self.d_skip, side),
            opt_on(&self.z, side),
            opt_on(&self.bias, side),
            softplus,
            grad.on(side),
        )
    }
}

#[test]
fn selective_scan_forward_and_gradients_match_the_cpu() {
    run(16, scan_case(), |k| {
        let o = ScanOperands::new(&k)?;
        let sp = k.opts.softplus;
        let (seq, last) = ([k.batch, k.dim, k.len], [k.batch, k.dim, k.state]);
        let cpu = o.scan(Side::Cpu, sp).or_fail()?;
        poison(&[&seq, &last], k.dtype)?;
        let gpu = o.scan(Side::Gpu, sp).or_fail()?;
        check("y", &cpu.0, &gpu.0, Kind::Forward)?;
        check("last state", &cpu.1, &gpu.1, Kind::Forward)?;

        let grad = pair(&seq, -1.0, 1.0, k.seed ^ 8, k.dtype)?;
        let gc = o.backward(Side::Cpu, sp, &grad).or_fail()?;
        let bcs = [k.batch, k.state, k.len];
        poison(&[&seq, &[k.dim, k.state], &bcs, &[k.dim]], k.dtype)?;
        let gg = o.backward(Side::Gpu, sp, &grad).or_fail()?;
        check("du", &gc.du, &gg.du, Kind::Grad)?;
        check("ddelta", &gc.ddelta, &gg.ddelta, Kind::Grad)?;
        check("dA", &gc.da, &gg.da, Kind::Grad)?;
        check("dB", &gc.db, &gg.db, Kind::Grad)?;
        check("dC", &gc.dc, &gg.dc, Kind::Grad)?;
        check_opt("dD", &gc.dd, &gg.dd, Kind::Grad)?;
        check_opt("dz", &gc.dz, &gg.dz, Kind::Grad)?;
        check_opt("ddelta_bias", &gc.ddelta_bias, &gg.ddelta_bias, Kind::Grad)
    });
}

#[test]
fn selective_state_update_matches_the_cpu() {
    let case = (
        1usize..=5,
        1usize..=40,
        prop::sample::select(vec![16usize, 128, 3]),
        options(),
        float(),
        any::<u64>(),
    );
    run(24, case, |(bs, d, n, opts, t, s)| {
        let (dt, bias) = dt_ranges(opts.softplus);
        let state = pair(&[bs, d, n], -1.0, 1.0, s, t)?;
        let x = pair(&[bs, d], -1.0, 1.0, s ^ 1, t)?;
        let delta = pair(&[bs, d], dt.0, dt.1, s ^ 2, t)?;
        let a = pair(&[d, n], -2.0, -0.2, s ^ 3, t)?;
        let b = pair(&[bs, n], -1.0, 1.0, s ^ 4, t)?;
        let c = pair(&[bs, n], -1.0, 1.0, s ^ 5, t)?;
        let d_skip = maybe(opts.d_skip, &[d], -1.0, 1.0, s ^ 6, t)?;
        let z = maybe(opts.z, &[bs, d], -2.0, 2.0, s ^ 7, t)?;
        let dt_bias = maybe(opts.bias, &[d], bias.0, bias.1, s ^ 8, t)?;
        let update = |side| {
            state.on(side).selective_state_update(
                x.on(side),
                delta.on(side),
                a.on(side),
                b.on(side),
                c.on(side),
                opt_on(&d_skip, side),
                opt_on(&z, side),
                opt_on(&dt_bias, side),
                opts.softplus,
            )
        };
        let cpu = update(Side::Cpu).or_fail()?;
        poison(&[&[bs, d], &[bs, d, n]], t)?;
        let gpu = update(Side::Gpu).or_fail()?;
        check("y", &cpu.0, &gpu.0, Kind::Forward)?;
        check("state", &cpu.1, &gpu.1, Kind::Forward)
    });
}

// ---------------------------------------------------------------------------------------------
// Mamba-2 SSD chunk scan
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct SsdCase {
    batch: usize,
    len: usize,
    heads: usize,
    groups: usize,
    head_dim: usize,
    state: usize,
    chunk: usize,
    opts: Options,
    dtype: DType,
    seed: u64,
}

fn ssd_case() -> impl Strategy<Value = SsdCase> {
    let heads = prop::sample::select(vec![(1usize, 1usize), (2, 1), (4, 2), (6, 3), (3, 3), (6, 1)]);
    let sizes = (
        prop::sample::select(vec![1usize, 3, 16, 64, 70]),
        prop::sample::select(vec![16usize, 128, 5]),
        prop::sample::select(vec![16usize, 64, 100, 256]),
    );
    (
        1usize..=2,
        length(),
        heads,
        sizes,
        options(),
        float(),
        any::<u64>(),
    )
        .prop_map(
            |(batch, len, (heads, groups), (head_dim, state, chunk), opts, dtype, seed)| SsdCase {
                batch,
                len,
                heads,
                groups,
                head_dim,
                state,
                chunk,
                opts,
                dtype,
                seed,
            },
        )
}

/// The operands of an SSD scan: x, dt, A, B, C, D, dt_bias, initial state.
struct SsdOperands {
    x: Pair,
    dt: Pair,
    a: Pair,
    b: Pair,
    c: Pair,
    d_skip: Option<Pair>,
    bias: Option<Pair>,
    initial: Option<Pair>,
}

impl SsdOperands {
    fn new(k: &SsdCase) -> Result<Self, TestCaseError> {
        let (bs, l, h, p, g, n, t, s) = (
            k.batch, k.len, k.heads, k.head_dim, k.groups, k.state, k.dtype, k.seed,
        );
        let (dt, bias) = dt_ranges(k.opts.softplus);
        Ok(SsdOperands {
            x: pair(&[bs, l, h, p], -1.0, 1.0, s, t)?,
            dt: pair(&[bs, l, h], dt.0, dt.1, s ^ 1, t)?,
            a: pair(&[h], -1.5, -0.2, s ^ 2, t)?,
            b: pair(&[bs, l, g, n], -1.0, 1.0, s ^ 3, t)?,
            c: pair(&[bs, l, g, n], -1.0, 1.0, s ^ 4, t)?,
            d_skip: maybe(k.opts.d_skip, &[h], -1.0, 1.0, s ^ 5, t)?,
            bias: maybe(k.opts.bias, &[h], bias.0, bias.1, s ^ 6, t)?,
            initial: maybe(k.opts.initial, &[bs, h, p, n], -1.0, 1.0, s ^ 7, t)?,
        })
    }

    /// The SSD scan of the copies on `side` with `chunk` steps per chunk.
    fn scan(&self, side: Side, softplus: bool, chunk: usize) -> tensor::Result<(Tensor, Tensor)> {
        self.x.on(side).ssd_scan(
            self.dt.on(side),
            self.a.on(side),
            self.b.on(side),
            self.c.on(side),
            opt_on(&self.d_skip, side),
            opt_on(&self.bias, side),
            softplus,
            chunk,
            opt_on(&self.initial, side),
        )
    }

    /// The backward of the host copies computed in f64: the reference for the reduced gradients.
    fn backward_f64(&self, softplus: bool, chunk: usize, grad: &Pair) -> tensor::Result<SsdGrads> {
        let wide = |p: &Pair| p.cpu.to_dtype(DType::F64);
        let wide_opt = |p: &Option<Pair>| p.as_ref().map(wide).transpose();
        wide(&self.x)?.ssd_scan_backward(
            &wide(&self.dt)?,
            &wide(&self.a)?,
            &wide(&self.b)?,
            &wide(&self.c)?,
            wide_opt(&self.d_skip)?.as_ref(),
            wide_opt(&self.bias)?.as_ref(),
            softplus,
            chunk,
            wide_opt(&self.initial)?.as_ref(),
            &wide(grad)?,
        )
    }

    /// Its backward given dL/dy `grad`, on `side`.
    fn backward(&self, side: Side, softplus: bool, chunk: usize, grad: &Pair) -> tensor::Result<SsdGrads> {
        self.x.on(side).ssd_scan_backward(
            self.dt.on(side),
            self.a.on(side),
            self.b.on(side),
            self.c.on(side),
            opt_on(&self.d_skip, side),
            opt_on(&self.bias, side),
            softplus,
            chunk,
            opt_on(&self.initial, side),
            grad.on(side),
        )
    }
}

#[test]
fn ssd_scan_forward_and_gradients_match_the_cpu() {
    run(16, ssd_case(), |k| {
        let o = SsdOperands::new(&k)?;
        let (sp, q) = (k.opts.softplus, k.chunk);
        let xs = [k.batch, k.len, k.heads, k.head_dim];
        let states = [k.batch, k.heads, k.head_dim, k.state];
        let cpu = o.scan(Side::Cpu, sp, q).or_fail()?;
        poison(&[&xs, &states], k.dtype)?;
        let gpu = o.scan(Side::Gpu, sp, q).or_fail()?;
        check("y", &cpu.0, &gpu.0, Kind::Forward)?;
        check("final state", &cpu.1, &gpu.1, Kind::Forward)?;

        let grad = pair(&xs, -1.0, 1.0, k.seed ^ 8, k.dtype)?;
        let gc = o.backward(Side::Cpu, sp, q, &grad).or_fail()?;
        let bcs = [k.batch, k.len, k.groups, k.state];
        poison(
            &[&xs, &[k.batch, k.len, k.heads], &[k.heads], &bcs, &states],
            k.dtype,
        )?;
        let gg = o.backward(Side::Gpu, sp, q, &grad).or_fail()?;
        check("dx", &gc.dx, &gg.dx, Kind::Grad)?;
        check("ddt", &gc.ddt, &gg.ddt, Kind::Grad)?;
        check("dB", &gc.db, &gg.db, Kind::Grad)?;
        check("dC", &gc.dc, &gg.dc, Kind::Grad)?;
        // The sums over every step: against the f64 reference, no worse than the CPU's f32.
        let exact = o.backward_f64(sp, q, &grad).or_fail()?;
        check_reduced("dA", &gc.da, &gg.da, &exact.da)?;
        for (name, cpu, gpu, exact) in [
            ("dD", &gc.dd, &gg.dd, &exact.dd),
            ("ddt_bias", &gc.ddt_bias, &gg.ddt_bias, &exact.ddt_bias),
        ] {
            match (cpu, gpu, exact) {
                (Some(c), Some(g), Some(e)) => check_reduced(name, c, g, e)?,
                _ => check_opt(name, cpu, gpu, Kind::Reduced)?,
            }
        }
        check_opt(
            "dinitial_state",
            &gc.dinitial_state,
            &gg.dinitial_state,
            Kind::Grad,
        )
    });
}

#[test]
fn ssd_state_update_matches_the_cpu() {
    let heads = prop::sample::select(vec![(1usize, 1usize), (4, 2), (6, 3), (80, 1)]);
    let case = (
        1usize..=4,
        heads,
        prop::sample::select(vec![1usize, 5, 64]),
        prop::sample::select(vec![16usize, 128, 3]),
        options(),
        float(),
        any::<u64>(),
    );
    run(24, case, |(bs, (h, g), p, n, opts, t, s)| {
        let (dt, bias) = dt_ranges(opts.softplus);
        let state = pair(&[bs, h, p, n], -1.0, 1.0, s, t)?;
        let x = pair(&[bs, h, p], -1.0, 1.0, s ^ 1, t)?;
        let delta = pair(&[bs, h], dt.0, dt.1, s ^ 2, t)?;
        let a = pair(&[h], -1.5, -0.2, s ^ 3, t)?;
        let b = pair(&[bs, g, n], -1.0, 1.0, s ^ 4, t)?;
        let c = pair(&[bs, g, n], -1.0, 1.0, s ^ 5, t)?;
        let d_skip = maybe(opts.d_skip, &[h], -1.0, 1.0, s ^ 6, t)?;
        let dt_bias = maybe(opts.bias, &[h], bias.0, bias.1, s ^ 7, t)?;
        let update = |side| {
            state.on(side).ssd_state_update(
                x.on(side),
                delta.on(side),
                a.on(side),
                b.on(side),
                c.on(side),
                opt_on(&d_skip, side),
                opt_on(&dt_bias, side),
                opts.softplus,
            )
        };
        let cpu = update(Side::Cpu).or_fail()?;
        poison(&[&[bs, h, p], &[bs, h, p, n]], t)?;
        let gpu = update(Side::Gpu).or_fail()?;
        check("y", &cpu.0, &gpu.0, Kind::Forward)?;
        check("state", &cpu.1, &gpu.1, Kind::Forward)
    });
}

#[test]
fn mixed_devices_are_a_device_mismatch() {
    if !gpu_ready() {
        return;
    }
    let host = |shape: &[usize]| Tensor::zeros(shape, F32);
    let dev = |shape: &[usize]| Tensor::zeros(shape, F32).to_device(GPU).unwrap();
    let mismatch = |r: tensor::Result<(Tensor, Tensor)>| {
        let e = r.expect_err("mixed devices must fail");
        assert!(matches!(e, TensorError::DeviceMismatch { .. }), "{e}");
    };
    // u on the GPU, C on the host.
    mismatch(dev(&[1, 2, 3]).selective_scan(
        &dev(&[1, 2, 3]),
        &dev(&[2, 4]),
        &dev(&[1, 4, 3]),
        &host(&[1, 4, 3]),
        None,
        None,
        None,
        true,
    ));
    // An optional operand on the other device.
    mismatch(dev(&[1, 3, 2, 2]).ssd_scan(
        &dev(&[1, 3, 2]),
        &dev(&[2]),
        &dev(&[1, 3, 1, 4]),
        &dev(&[1, 3, 1, 4]),
        Some(&host(&[2])),
        None,
        true,
        2,
        None,
    ));
}
