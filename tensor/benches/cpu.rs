//! CPU benchmarks: matmul GFLOP/s against numpy's BLAS, and memory-bound ops in GB/s against
//! the fastest of three parallel copies measured in the same run. `cargo bench -p tensor`.

use rayon::prelude::*;
use std::process::Command;
use std::time::Instant;
use tensor::{seeded_rng, DType, Tensor};

/// Best wall time in seconds of `reps` runs of `f` after one warm-up run.
fn best_time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The best GFLOP/s of numpy's f32 matmul, when python3 with numpy is available.
fn numpy_gflops(n: usize) -> Option<f64> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/blas_reference.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(n.to_string())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// The memory-bound ceiling: a parallel copy of `n` f32 between two buffers, in chunks of 64K
/// elements, done three ways, of which the fastest counts.
struct CopyCeiling {
    src: Vec<f32>,
    dst: std::cell::RefCell<Vec<f32>>,
}

impl CopyCeiling {
    fn new(n: usize) -> Self {
        let src = (0..n).map(|i| i as f32).collect();
        CopyCeiling {
            src,
            dst: vec![0f32; n].into(),
        }
    }

    /// GB/s (bytes read and written) of each copy, named:
    /// - `memcpy`: `copy_from_slice`, whose method glibc picks by CPU (the slowest of the three
    ///   on some days);
    /// - `loop`: the widest vector loads and stores this CPU has, each element's bits through an
    ///   xor with a zero the compiler cannot see (which keeps the loop from becoming a memcpy);
    /// - `streaming`: stores that bypass the cache (x86-64 only), which skip reading each
    ///   destination line before writing it, as a kernel's ordinary stores cannot.
    fn measure(&self) -> Vec<(&'static str, f64)> {
        let mut dst = self.dst.borrow_mut();
        let bytes = 8.0 * self.src.len() as f64;
        let mut copy = |name, f: &(dyn Fn(&mut [f32], &[f32]) + Sync)| {
            let t = best_time(10, || {
                dst.par_chunks_mut(1 << 16)
                    .zip(self.src.par_chunks(1 << 16))
                    .for_each(|(d, s)| f(d, s));
            });
            (name, bytes / t / 1e9)
        };
        let zero = std::hint::black_box(0u32);
        let mut rates = vec![
            copy("memcpy", &|d, s| d.copy_from_slice(s)),
            copy("loop", &|d, s| {
                pulp::Arch::new().dispatch(
                    #[inline(always)]
                    || {
                        for (d, s) in d.iter_mut().zip(s) {
                            *d = f32::from_bits(s.to_bits() ^ zero);
                        }
                    },
                )
            }),
        ];
        #[cfg(target_arch = "x86_64")]
        rates.push(copy("streaming", &streaming_copy));
        rates
    }

    /// The fastest copy's GB/s.
    fn ceiling(&self) -> f64 {
        self.measure().iter().map(|r| r.1).fold(0.0, f64::max)
    }
}

/// Copies `s` into `d` (as long) with SSE streaming stores, after a plain copy of the elements
/// before `d`'s first 16-byte boundary.
#[cfg(target_arch = "x86_64")]
fn streaming_copy(d: &mut [f32], s: &[f32]) {
    use std::arch::x86_64::{_mm_loadu_ps, _mm_sfence, _mm_stream_ps};
    let head = d.as_ptr().align_offset(16).min(d.len());
    d[..head].copy_from_slice(&s[..head]);
    let (d, s) = (&mut d[head..], &s[head..]);
    let done = d.len() - d.len() % 4;
    for (d, s) in d[..done].chunks_exact_mut(4).zip(s.chunks_exact(4)) {
        // SAFETY: `d` is 16-byte aligned (a multiple of 4 f32 past the boundary) and both
        // blocks hold 4 elements; SSE is part of x86-64.
        unsafe { _mm_stream_ps(d.as_mut_ptr(), _mm_loadu_ps(s.as_ptr())) };
    }
    d[done..].copy_from_slice(&s[done..]);
    // SAFETY: a fence has no operands; it orders the streaming stores before later stores.
    unsafe { _mm_sfence() };
}

fn main() -> tensor::Result<()> {
    tensor::host_memory::keep_freed_memory();
    let mut rng = seeded_rng(0);
    println!(
        "tensor CPU benchmarks ({} rayon threads)",
        rayon::current_num_threads()
    );

    for (n, dtype) in [
        (1024, DType::F32),
        (2048, DType::F32),
        (1024, DType::BF16),
        (1024, DType::F64),
    ] {
        let a = Tensor::randn(&[n, n], dtype, 0.0, 1.0, &mut rng)?;
        let b = Tensor::randn(&[n, n], dtype, 0.0, 1.0, &mut rng)?;
        let t = best_time(10, || {
            a.matmul(&b).expect("matmul");
        });
        let gflops = 2.0 * (n as f64).powi(3) / t / 1e9;
        let reference = if dtype == DType::F32 {
            numpy_gflops(n)
        } else {
            None
        };
        match reference {
            Some(r) => println!(
                "matmul {dtype} {n}^3: {gflops:7.1} GFLOP/s   numpy/OpenBLAS {r:7.1} GFLOP/s   ratio {:.2}",
                gflops / r
            ),
            None => println!("matmul {dtype} {n}^3: {gflops:7.1} GFLOP/s"),
        }
    }

    let n = 1 << 24;
    let copy = CopyCeiling::new(n);
    let rates: Vec<String> = copy
        .measure()
        .iter()
        .map(|(name, gbs)| format!("{name} {gbs:.1} GB/s"))
        .collect();
    println!("copy f32 16M (the ceiling is the fastest): {}", rates.join(", "));

    // Two sizes: 16M elements (64 MiB per tensor, well past the caches) and 4M, whose 16 MiB
    // tensors partly fit the last-level cache. Each op is reported against the fastest of the
    // copies, measured again just before it, so that a change in the machine's memory speed
    // during the run moves both numbers.
    for m in [n, n / 4] {
        let label = format!("{}M", m >> 20);
        let x = Tensor::randn(&[m], DType::F32, 0.0, 1.0, &mut rng)?;
        let y = Tensor::randn(&[m], DType::F32, 0.0, 1.0, &mut rng)?;
        let report = |name: &str, bytes: f64, op: &dyn Fn()| {
            let ceiling = copy.ceiling();
            let gbs = bytes / best_time(10, op) / 1e9;
            println!(
                "{name}: {gbs:6.1} GB/s ({:.0}% of copy at {ceiling:.1} GB/s)",
                100.0 * gbs / ceiling
            );
        };
        report(&format!("add f32 {label}"), 12.0 * m as f64, &|| {
            drop(x.add(&y).expect("add"))
        });
        report(&format!("silu f32 {label}"), 8.0 * m as f64, &|| {
            drop(x.silu().expect("silu"))
        });
        let rows = x.reshape(&[m / 1024, 1024])?;
        report(
            &format!("softmax f32 [{}, 1024]", m / 1024),
            8.0 * m as f64,
            &|| drop(rows.softmax(1).expect("softmax")),
        );
        let w = Tensor::ones(&[1024], DType::F32);
        report(
            &format!("rms_norm f32 [{}, 1024]", m / 1024),
            8.0 * m as f64,
            &|| drop(rows.rms_norm(&w, 1e-5).expect("rms_norm")),
        );
    }
    Ok(())
}
