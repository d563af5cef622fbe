//! GPU benchmarks of the `cuda` crate: `cargo bench -p cuda`.
//!
//! First the ceiling: device-to-device copy bandwidth (`cuMemcpyDtoDAsync`, bytes read plus
//! bytes written). Then bf16 GEMM TFLOP/s on 4096³ and on the LM's shapes through cuBLAS
//! `GemmEx` (the path `tensor::matmul` takes), next to cuBLASLt (heuristic algorithm, with a bias
//! epilogue) as cuBLAS's other route; the ratio is GemmEx over the better of the two. Then the
//! memory-bound kernels in GB/s of the bytes they must read and write once, as a fraction of the
//! copy bandwidth; last the Mamba scans (selective scan and SSD chunk scan, forward and backward)
//! at the 2.8B/2.7B models' shapes, likewise in GB/s of the bytes they must move once; then the
//! fused attention, forward and backward, in TFLOP/s of the visible (unmasked) score entries at
//! EMMA's shapes and at FlashAttention's reference shapes, as a fraction of the measured bf16
//! GEMM rate on 4096³ (`scripts/bench_sdpa.py` times PyTorch's SDPA on the same shapes). Times are
//! the best of several event-timed rounds after a warm-up (which also
//! compiles the kernels). Without a GPU it prints one line and exits successfully.

use cuda::kernels::{
    AttentionBackward, AttentionDims, AttentionMaskKind, BinaryOp, NormSpec, ScanGrads, ScanInputs, ScanSpec,
    SsdGradBuffers, SsdInputs, SsdSpec, UnaryOp,
};
use cuda::{bf16, DeviceBuffer, FloatElem, GemmSpec, GpuDevice, Result};

/// Timed rounds per measurement; the best counts.
const ROUNDS: usize = 10;

/// Milliseconds per call of `f`: the best of `ROUNDS` rounds of `calls` calls, after a warm-up.
fn time_ms(dev: &GpuDevice, calls: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let (start, end) = (dev.event()?, dev.event()?);
        start.record()?;
        for _ in 0..calls {
            f()?;
        }
        end.record()?;
        end.synchronize()?;
        best = best.min(f64::from(start.elapsed_ms(&end)?) / calls as f64);
    }
    Ok(best)
}

/// GB/s of moving `bytes` in `ms` milliseconds.
fn gb_per_s(bytes: usize, ms: f64) -> f64 {
    bytes as f64 / (ms * 1e-3) / 1e9
}

/// A buffer of `n` elements, each `v`.
fn filled<T: FloatElem>(dev: &GpuDevice, n: usize, v: T) -> Result<DeviceBuffer<T>> {
    dev.full(n, v)
}

/// One GEMM shape: `[m, k] · op([k, n])`, B stored transposed (`[n, k]`, a linear layer's weight)
/// when `trans_b`.
struct Shape {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    trans_b: bool,
}

const GEMMS: [Shape; 4] = [
    Shape {
        name: "bf16 4096^3",
        m: 4096,
        n: 4096,
        k: 4096,
        trans_b: false,
    },
    // 2048 tokens through Mamba-2.8B's in_proj (2560 -> 2 x 5120), out_proj and the tied LM head.
    Shape {
        name: "bf16 in_proj [2048x2560]x[2560x10240]",
        m: 2048,
        n: 10240,
        k: 2560,
        trans_b: true,
    },
    Shape {
        name: "bf16 out_proj [2048x5120]x[5120x2560]",
        m: 2048,
        n: 2560,
        k: 5120,
        trans_b: true,
    },
    Shape {
        name: "bf16 lm_head [2048x2560]x[2560x50280]",
        m: 2048,
        n: 50280,
        k: 2560,
        trans_b: true,
    },
];

fn run(dev: &GpuDevice) -> Result<()> {
    let info = dev.info();
    println!(
        "cuda GPU benchmarks: {} ({}, {} SMs, {:.0} GiB)",
        info.name,
        info.arch(),
        info.multiprocessors,
        info.total_memory as f64 / (1u64 << 30) as f64
    );

    // The ceiling: a 1 GiB device-to-device copy.
    let n = 1 << 28;
    let src = filled(dev, n, 1.0f32)?;
    let mut dst = dev.alloc::<f32>(n)?;
    let copy_ms = time_ms(dev, 5, || dev.copy(&src, &mut dst))?;
    let ceiling = gb_per_s(2 * n * 4, copy_ms);
    println!("| op | result | reference | ratio |");
    println!("|---|---|---|---|");
    println!("| copy d2d 1 GiB (ceiling) | {ceiling:.0} GB/s | | |");
    drop((src, dst));

    let mut peak = 0.0f64;
    for s in GEMMS {
        let a = filled(dev, s.m * s.k, bf16::from_f32(0.01))?;
        let b = filled(dev, s.k * s.n, bf16::from_f32(0.02))?;
        let bias = dev.zeros::<bf16>(s.n)?;
        let mut c = dev.alloc::<bf16>(s.m * s.n)?;
        let spec = GemmSpec::new(s.m, s.n, s.k).transposed(false, s.trans_b);
        let flop = 2.0 * (s.m * s.n * s.k) as f64;
        let tflops = |ms: f64| flop / (ms * 1e-3) / 1e12;
        let ex = tflops(time_ms(dev, 10, || dev.gemm(&a, &b, &mut c, spec))?);
        let lt = tflops(time_ms(dev, 10, || dev.gemm_bias((&a, &b), &bias, &mut c, spec))?);
        if s.m == 4096 && s.n == 4096 && s.k == 4096 {
            peak = ex.max(lt);
        }
        println!(
            "| {} | {ex:.0} TFLOP/s | cuBLASLt {lt:.0} TFLOP/s | {:.2} |",
            s.name,
            ex / ex.max(lt)
        );
    }

    // Memory-bound kernels on 64 Mi elements (rows of the LM's widths for the row kernels).
    let n = 1 << 26;
    let row_op = |name: &str, bytes: usize, ms: f64| {
        let gbs = gb_per_s(bytes, ms);
        println!(
            "| {name} | {gbs:.0} GB/s | copy | {:.0}% |",
            100.0 * gbs / ceiling
        );
    };
    for (label, size) in [("f32", 4), ("bf16", 2)] {
        let (ms_add, ms_silu) = if size == 4 {
            let (x, y) = (filled(dev, n, 0.5f32)?, filled(dev, n, 0.25f32)?);
            let mut out = dev.alloc::<f32>(n)?;
            (
                time_ms(dev, 10, || dev.binary(BinaryOp::Add, &x, &y, &mut out))?,
                time_ms(dev, 10, || dev.unary(UnaryOp::Silu, &x, &mut out))?,
            )
        } else {
            let (x, y) = (
                filled(dev, n, bf16::from_f32(0.5))?,
                filled(dev, n, bf16::from_f32(0.25))?,
            );
            let mut out = dev.alloc::<bf16>(n)?;
            (
                time_ms(dev, 10, || dev.binary(BinaryOp::Add, &x, &y, &mut out))?,
                time_ms(dev, 10, || dev.unary(UnaryOp::Silu, &x, &mut out))?,
            )
        };
        row_op(&format!("add {label} 64M"), 3 * n * size, ms_add);
        row_op(&format!("silu {label} 64M"), 2 * n * size, ms_silu);
    }
    for (rows, len) in [(16384, 4096), (2048, 50280)] {
        let x = filled(dev, rows * len, bf16::from_f32(0.5))?;
        let mut y = dev.alloc::<bf16>(rows * len)?;
        let ms = time_ms(dev, 10, || dev.softmax(&x, &mut y, rows, len))?;
        row_op(&format!("softmax bf16 [{rows}, {len}]"), 2 * rows * len * 2, ms);
    }
    for (rows, dim) in [(16384, 2560), (16384, 5120)] {
        let x = filled(dev, rows * dim, bf16::from_f32(0.5))?;
        let w = filled(dev, dim, bf16::from_f32(1.0))?;
        let mut y = dev.alloc::<bf16>(rows * dim)?;
        let spec = NormSpec::new(rows, dim, 1e-5);
        let ms = time_ms(dev, 10, || dev.rms_norm(&x, None, &w, &mut y, spec))?;
        row_op(&format!("rms_norm bf16 [{rows}, {dim}]"), 2 * rows * dim * 2, ms);
    }
    scan_benches(dev, ceiling)?;
    attention(dev, peak)
}

/// Prints one scan measurement: GB/s of `bytes` moved in `ms`, and its share of the copy
/// bandwidth `ceiling`.
fn scan_row(name: &str, bytes: usize, ms: f64, ceiling: f64) {
    let gbs = gb_per_s(bytes, ms);
    println!(
        "| {name} | {gbs:.0} GB/s ({ms:.3} ms) | copy | {:.0}% |",
        100.0 * gbs / ceiling
    );
}

/// The Mamba scans in bf16 at d_inner 5120 and length 2048, batch 1 to 16: the Mamba-1 selective
/// scan (d_state 16, with D, z and the dt bias, softplus) and the Mamba-2 SSD chunk scan (80
/// heads of 64, d_state 128, one group, chunk 256, with D and the dt bias, softplus). The bytes
/// counted are those each pass must read and write once: forward, the inputs and y (and the
/// last state); backward, the inputs, dL/dy and every gradient.
fn scan_benches(dev: &GpuDevice, ceiling: f64) -> Result<()> {
    const E: usize = 2; // bytes per bf16 element
    let (dim, len) = (5120, 2048);
    let v = |x: f32| bf16::from_f32(x);
    for batch in [1, 2, 4, 8, 16] {
        // Mamba-1.
        let n = 16;
        let spec = ScanSpec {
            batch,
            dim,
            len,
            state: n,
            softplus: true,
        };
        let (seq, bc) = (batch * dim * len, batch * n * len);
        let (u, delta, z) = (
            filled(dev, seq, v(0.5))?,
            filled(dev, seq, v(-1.0))?,
            filled(dev, seq, v(0.3))?,
        );
        let (a, b, c) = (
            filled(dev, dim * n, v(-1.0))?,
            filled(dev, bc, v(0.2))?,
            filled(dev, bc, v(0.1))?,
        );
        let (d, bias) = (filled(dev, dim, v(1.0))?, filled(dev, dim, v(0.1))?);
        let inputs = ScanInputs {
            u: &u,
            delta: &delta,
            a: &a,
            b: &b,
            c: &c,
            d_skip: Some(&d),
            z: Some(&z),
            delta_bias: Some(&bias),
        };
        let (mut y, mut last) = (dev.alloc::<bf16>(seq)?, dev.alloc::<bf16>(batch * dim * n)?);
        let ms = time_ms(dev, 3, || {
            dev.selective_scan(&inputs, &mut y, &mut last, None, spec)
        })?;
        let small = (dim * n + 2 * dim) * E;
        let fwd = (4 * seq + 2 * bc + batch * dim * n) * E + small;
        scan_row(
            &format!("selective_scan fwd bf16 B={batch} D={dim} L={len} N={n}"),
            fwd,
            ms,
            ceiling,
        );
        let grad = filled(dev, seq, v(0.01))?;
        let (mut du, mut ddelta, mut dz) = (
            dev.alloc::<bf16>(seq)?,
            dev.alloc::<bf16>(seq)?,
            dev.alloc::<bf16>(seq)?,
        );
        let (mut da, mut db, mut dc) = (
            dev.alloc::<bf16>(dim * n)?,
            dev.alloc::<bf16>(bc)?,
            dev.alloc::<bf16>(bc)?,
        );
        let (mut dd, mut dbias) = (dev.alloc::<bf16>(dim)?, dev.alloc::<bf16>(dim)?);
        let ms = time_ms(dev, 2, || {
            let grads = ScanGrads {
                du: &mut du,
                ddelta: &mut ddelta,
                da: &mut da,
                db: &mut db,
                dc: &mut dc,
                dd: Some(&mut dd),
                dz: Some(&mut dz),
                ddelta_bias: Some(&mut dbias),
            };
            dev.selective_scan_backward(&inputs, &grad, grads, spec)
        })?;
        let bwd = (7 * seq + 4 * bc) * E + 2 * small;
        scan_row(
            &format!("selective_scan bwd bf16 B={batch} D={dim} L={len} N={n}"),
            bwd,
            ms,
            ceiling,
        );
        drop((u, delta, z, grad, y, du, ddelta, dz));

        // Mamba-2.
        let (heads, head_dim, groups, n) = (80, 64, 1, 128);
        let spec = SsdSpec {
            batch,
            len,
            heads,
            head_dim,
            groups,
            state: n,
            chunk: 256,
            softplus: true,
        };
        let (xs, dts, bcs, states) = (
            batch * len * dim,
            batch * len * heads,
            batch * len * groups * n,
            batch * heads * head_dim * n,
        );
        let (x, dt) = (filled(dev, xs, v(0.5))?, filled(dev, dts, v(-1.0))?);
        let (a, b, c) = (
            filled(dev, heads, v(-1.0))?,
            filled(dev, bcs, v(0.1))?,
            filled(dev, bcs, v(0.05))?,
        );
        let (d, bias) = (filled(dev, heads, v(1.0))?, filled(dev, heads, v(0.1))?);
        let inputs = SsdInputs {
            x: &x,
            dt: &dt,
            a: &a,
            b: &b,
            c: &c,
            d_skip: Some(&d),
            dt_bias: Some(&bias),
            initial: None,
        };
        let (mut y, mut last) = (dev.alloc::<bf16>(xs)?, dev.alloc::<bf16>(states)?);
        let ms = time_ms(dev, 3, || dev.ssd_scan(&inputs, &mut y, &mut last, spec))?;
        let fwd = (2 * xs + dts + 2 * bcs + states + 3 * heads) * E;
        scan_row(
            &format!("ssd_scan fwd bf16 B={batch} H={heads} P={head_dim} L={len} N={n}"),
            fwd,
            ms,
            ceiling,
        );
        let grad = filled(dev, xs, v(0.01))?;
        let (mut dx, mut ddt) = (dev.alloc::<bf16>(xs)?, dev.alloc::<bf16>(dts)?);
        let (mut db, mut dc) = (dev.alloc::<bf16>(bcs)?, dev.alloc::<bf16>(bcs)?);
        let (mut da, mut dd, mut dbias) = (
            dev.alloc::<bf16>(heads)?,
            dev.alloc::<bf16>(heads)?,
            dev.alloc::<bf16>(heads)?,
        );
        let ms = time_ms(dev, 2, || {
            let grads = SsdGradBuffers {
                dx: &mut dx,
                ddt: &mut ddt,
                da: &mut da,
                db: &mut db,
                dc: &mut dc,
                dd: Some(&mut dd),
                ddt_bias: Some(&mut dbias),
                dinitial: None,
            };
            dev.ssd_scan_backward(&inputs, &grad, grads, spec)
        })?;
        let bwd = (4 * xs + 2 * dts + 4 * bcs + 6 * heads) * E;
        scan_row(
            &format!("ssd_scan bwd bf16 B={batch} H={heads} P={head_dim} L={len} N={n}"),
            bwd,
            ms,
            ceiling,
        );
    }
    Ok(())
}

/// One attention shape: `b` batches of `h` heads, `tq` queries over `tk` keys of head dim `d`.
struct AttentionShape {
    name: &'static str,
    b: usize,
    h: usize,
    tq: usize,
    tk: usize,
    d: usize,
    mask: AttentionMaskKind,
}

/// EMMA's attention shapes (SigLIP SO400M, DINOv2 ViT-L, the pixel decoder's block-causal
/// attention over the 27 x 27 patch raster) at batch 1 and 16, then FlashAttention's reference
/// shapes (16 heads of 128, 16k tokens per batch, with and without the causal mask).
fn attention_shapes() -> Vec<AttentionShape> {
    let mut shapes = Vec::new();
    for b in [1, 16] {
        let full = AttentionMaskKind::Full;
        shapes.push(AttentionShape {
            name: "SigLIP",
            b,
            h: 16,
            tq: 729,
            tk: 729,
            d: 72,
            mask: full,
        });
        shapes.push(AttentionShape {
            name: "DINOv2",
            b,
            h: 16,
            tq: 734,
            tk: 734,
            d: 64,
            mask: full,
        });
        let block = AttentionMaskKind::BlockCausal { width: 27 };
        shapes.push(AttentionShape {
            name: "decoder",
            b,
            h: 40,
            tq: 729,
            tk: 729,
            d: 64,
            mask: block,
        });
    }
    for (b, t) in [(8, 2048), (2, 8192)] {
        for mask in [AttentionMaskKind::Full, AttentionMaskKind::Causal] {
            shapes.push(AttentionShape {
                name: "FA reference",
                b,
                h: 16,
                tq: t,
                tk: t,
                d: 128,
                mask,
            });
        }
    }
    shapes
}

/// The number of (query, key) pairs `mask` lets through: the work the kernels do.
fn visible_pairs(tq: usize, tk: usize, mask: AttentionMaskKind) -> usize {
    (0..tq)
        .map(|i| match mask {
            AttentionMaskKind::Full => tk,
            AttentionMaskKind::Causal => (i + tk + 1).saturating_sub(tq).min(tk),
            AttentionMaskKind::BlockCausal { width } => ((i / width + 1) * width).min(tk),
        })
        .sum()
}

/// The fused attention in bf16: forward (4 flops per visible entry and channel: QKᵀ and PV) and
/// backward (10: the convention that the backward is 2.5 forwards), as TFLOP/s and as a share of
/// `peak`, the measured bf16 GEMM rate.
fn attention(dev: &GpuDevice, peak: f64) -> Result<()> {
    for s in attention_shapes() {
        let dims = AttentionDims {
            b: s.b,
            h: s.h,
            hk: s.h,
            tq: s.tq,
            tk: s.tk,
            d: s.d,
        };
        let (nq, nk) = (s.b * s.h * s.tq * s.d, s.b * s.h * s.tk * s.d);
        let q = filled(dev, nq, bf16::from_f32(0.1))?;
        let k = filled(dev, nk, bf16::from_f32(0.1))?;
        let v = filled(dev, nk, bf16::from_f32(0.1))?;
        let grad = filled(dev, nq, bf16::from_f32(0.01))?;
        let mut out = dev.alloc::<bf16>(nq)?;
        let mut lse = dev.alloc::<f32>(s.b * s.h * s.tq)?;
        let mut delta = dev.alloc::<f32>(s.b * s.h * s.tq)?;
        let (mut dq, mut dk, mut dv) = (
            dev.alloc::<bf16>(nq)?,
            dev.alloc::<bf16>(nk)?,
            dev.alloc::<bf16>(nk)?,
        );
        let scale = 1.0 / (s.d as f32).sqrt();
        let fwd = time_ms(dev, 3, || {
            dev.attention_forward((&q, &k, &v), None, &mut out, &mut lse, dims, scale, s.mask)
        })?;
        let inputs = AttentionBackward {
            qkv: (&q, &k, &v),
            out: &out,
            lse: &lse,
            grad: &grad,
            keep: None,
        };
        let bwd = time_ms(dev, 3, || {
            dev.attention_backward(
                &inputs,
                (&mut dq, &mut dk, &mut dv),
                &mut delta,
                dims,
                scale,
                s.mask,
            )
        })?;
        let entries = (s.b * s.h * s.d * visible_pairs(s.tq, s.tk, s.mask)) as f64;
        for (pass, flop, ms) in [("fwd", 4.0 * entries, fwd), ("bwd", 10.0 * entries, bwd)] {
            let tflops = flop / (ms * 1e-3) / 1e12;
            println!(
                "| attention {pass} {} {:?} B={} H={} T={}x{} D={} | {tflops:.1} TFLOP/s ({ms:.3} ms) | bf16 GEMM {peak:.0} TFLOP/s | {:.0}% |",
                s.name,
                s.mask,
                s.b,
                s.h,
                s.tq,
                s.tk,
                s.d,
                100.0 * tflops / peak.max(1e-9)
            );
        }
    }
    Ok(())
}

fn main() {
    let dev = match GpuDevice::open(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("skipped: no GPU ({e})");
            return;
        }
    };
    if dev.is_emulated() {
        println!(
            "refused: {} is emulated; its timings mean nothing (unset EMMA_GPU)",
            dev.info().name
        );
        return;
    }
    if let Err(e) = run(&dev) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
