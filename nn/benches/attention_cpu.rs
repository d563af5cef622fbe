//! The fused attention op against the unfused composition (scores, mask, softmax, product) on
//! the CPU, at EMMA's attention shapes, forward and forward + backward, f32, batch 1:
//! `cargo bench -p nn --bench attention_cpu`.
//!
//! Prints each path's best time of several rounds, its GFLOP/s (4·Tq·Tk·D per head forward,
//! 2.5 times that for forward + backward, halved where a causal mask halves the work), the
//! unfused / fused time ratio, and the peak heap bytes allocated while the pass ran (a counting
//! allocator around the system one), so the O(T²) score matrices of the unfused path show.
//! Last, the fused op's peak memory as the length doubles from 512 to 4,096 (4 heads of 64,
//! causal), against the size of its inputs: it grows linearly with T.

use autograd::Var;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tensor::{AttentionMask, AttentionSpec, DType, Tensor};

/// The system allocator, counting the bytes held now and the most held since the last reset.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Timed rounds per measurement; the best counts.
const ROUNDS: usize = 3;

/// One attention shape of EMMA.
struct Shape {
    name: &'static str,
    heads: usize,
    tq: usize,
    tk: usize,
    d: usize,
    mask: AttentionMask,
}

/// The unfused path, as `nn::Attention` computes it on a GPU: q·kᵀ·scale, masked, softmax, ·v.
fn unfused(q: &Var, k: &Var, v: &Var, spec: &AttentionSpec) -> BenchResult<Var> {
    let (tq, tk) = (q.value().dim(2), k.value().dim(2));
    let mut scores = q.matmul(&k.transpose(2, 3)?)?.affine(spec.scale, 0.0)?;
    if let Some(allowed) = spec.mask.dense(tq, tk)? {
        let blocked = Var::constant(Tensor::full(&[], f64::NEG_INFINITY, DType::F32));
        scores = Var::where_(&allowed, &scores, &blocked)?;
    }
    Ok(scores.softmax(3)?.matmul(v)?)
}

/// Best milliseconds of `f` and the peak heap bytes above the bytes held when it started.
fn measure(mut f: impl FnMut() -> BenchResult<()>) -> BenchResult<(f64, usize)> {
    f()?;
    let mut best = f64::INFINITY;
    let base = HELD.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok((best, PEAK.load(Ordering::Relaxed) - base))
}

fn main() -> BenchResult<()> {
    tensor::host_memory::keep_freed_memory();
    let shapes = [
        Shape {
            name: "SigLIP SO400M self-attention",
            heads: 16,
            tq: 729,
            tk: 729,
            d: 72,
            mask: AttentionMask::Full,
        },
        Shape {
            name: "DINOv2 ViT-L self-attention (729 + 5)",
            heads: 16,
            tq: 734,
            tk: 734,
            d: 64,
            mask: AttentionMask::Full,
        },
        Shape {
            name: "pixel decoder cross-attention, block-causal",
            heads: 40,
            tq: 729,
            tk: 729,
            d: 64,
            mask: AttentionMask::BlockCausal { width: 27 },
        },
    ];
    println!(
        "fused attention vs the unfused ops on the CPU ({} threads), f32, batch 1",
        rayon::current_num_threads()
    );
    let mut rng = tensor::seeded_rng(0);
    for s in &shapes {
        let spec = AttentionSpec {
            scale: 1.0 / (s.d as f64).sqrt(),
            mask: s.mask,
        };
        let q = Tensor::randn(&[1, s.heads, s.tq, s.d], DType::F32, 0.0, 1.0, &mut rng)?;
        let k = Tensor::randn(&[1, s.heads, s.tk, s.d], DType::F32, 0.0, 1.0, &mut rng)?;
        let v = Tensor::randn(&[1, s.heads, s.tk, s.d], DType::F32, 0.0, 1.0, &mut rng)?;
        let g = Tensor::randn(&[1, s.heads, s.tq, s.d], DType::F32, 0.0, 1.0, &mut rng)?;
        let share = if s.mask == AttentionMask::Full { 1.0 } else { 0.5 };
        let flop = 4.0 * (s.heads * s.tq * s.tk * s.d) as f64 * share;
        println!(
            "{} ({} heads of {}, {} x {} positions):",
            s.name, s.heads, s.d, s.tq, s.tk
        );
        for backward in [false, true] {
            let pass = |fused: bool| {
                measure(|| {
                    let (vq, vk, vv) = (
                        Var::parameter(q.clone()),
                        Var::parameter(k.clone()),
                        Var::parameter(v.clone()),
                    );
                    let out = if fused {
                        vq.attention(&vk, &vv, &spec, None)?
                    } else {
                        unfused(&vq, &vk, &vv, &spec)?
                    };
                    if backward {
                        out.mul(&Var::constant(g.clone()))?.sum_all()?.backward()?;
                    }
                    Ok(())
                })
            };
            let ((fused_ms, fused_mem), (plain_ms, plain_mem)) = (pass(true)?, pass(false)?);
            let work = if backward { 2.5 * flop } else { flop };
            let name = if backward { "forward+backward" } else { "forward" };
            println!(
                "  {name:<16} fused {fused_ms:8.1} ms ({:5.1} GFLOP/s, peak {:7.1} MiB) | unfused {plain_ms:8.1} ms ({:5.1} GFLOP/s, peak {:7.1} MiB) | unfused/fused time {:.2}",
                work / fused_ms / 1e6,
                fused_mem as f64 / (1 << 20) as f64,
                work / plain_ms / 1e6,
                plain_mem as f64 / (1 << 20) as f64,
                plain_ms / fused_ms,
            );
        }
    }
    memory_scaling(&mut rng)
}

/// The fused op's peak heap (forward + backward) at T = 512 .. 4096: linear in T, a small
/// multiple of the q, k, v and output-gradient bytes.
fn memory_scaling(rng: &mut tensor::Rng) -> BenchResult<()> {
    let (heads, d) = (4, 64);
    let spec = AttentionSpec {
        scale: 1.0 / (d as f64).sqrt(),
        mask: AttentionMask::Causal,
    };
    println!("fused forward+backward peak memory by length ({heads} heads of {d}, causal):");
    for t in [512, 1024, 2048, 4096] {
        let shape = [1, heads, t, d];
        let q = Tensor::randn(&shape, DType::F32, 0.0, 1.0, rng)?;
        let k = Tensor::randn(&shape, DType::F32, 0.0, 1.0, rng)?;
        let v = Tensor::randn(&shape, DType::F32, 0.0, 1.0, rng)?;
        let g = Tensor::randn(&shape, DType::F32, 0.0, 1.0, rng)?;
        let (ms, peak) = measure(|| {
            let (vq, vk, vv) = (
                Var::parameter(q.clone()),
                Var::parameter(k.clone()),
                Var::parameter(v.clone()),
            );
            let out = vq.attention(&vk, &vv, &spec, None)?;
            out.mul(&Var::constant(g.clone()))?.sum_all()?.backward()?;
            Ok(())
        })?;
        let inputs = 4 * heads * t * d * 4;
        println!(
            "  T = {t:5}: peak {:7.2} MiB = {:.2} x the inputs' {:.2} MiB ({ms:.0} ms; the score matrix alone would be {:.0} MiB)",
            peak as f64 / (1 << 20) as f64,
            peak as f64 / inputs as f64,
            inputs as f64 / (1 << 20) as f64,
            (heads * t * t * 4) as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
