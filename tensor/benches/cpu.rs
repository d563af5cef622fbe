//! CPU benchmarks: matmul GFLOP/s against numpy's BLAS, and memory-bound ops in GB/s against
//! a plain parallel copy measured in the same run. `cargo bench -p tensor`.

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
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let copy = best_time(10, || {
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
    });
    let copy_gbs = 8.0 * n as f64 / copy / 1e9;
    println!("copy f32 16M (ceiling): {copy_gbs:6.1} GB/s");

    // Two sizes: 16M elements, whose 64 MiB outputs glibc maps fresh from the kernel on every
    // call (page faults included), and 4M, whose 16 MiB outputs come back from the heap.
    for m in [n, n / 4] {
        let label = format!("{}M", m >> 20);
        let x = Tensor::randn(&[m], DType::F32, 0.0, 1.0, &mut rng)?;
        let y = Tensor::randn(&[m], DType::F32, 0.0, 1.0, &mut rng)?;
        let report = |name: &str, bytes: f64, t: f64| {
            let gbs = bytes / t / 1e9;
            println!("{name}: {gbs:6.1} GB/s ({:.0}% of copy)", 100.0 * gbs / copy_gbs);
        };
        report(
            &format!("add f32 {label}"),
            12.0 * m as f64,
            best_time(10, || drop(x.add(&y).expect("add"))),
        );
        report(
            &format!("silu f32 {label}"),
            8.0 * m as f64,
            best_time(10, || drop(x.silu().expect("silu"))),
        );
        let rows = x.reshape(&[m / 1024, 1024])?;
        report(
            &format!("softmax f32 [{}, 1024]", m / 1024),
            8.0 * m as f64,
            best_time(10, || drop(rows.softmax(1).expect("softmax"))),
        );
        let w = Tensor::ones(&[1024], DType::F32);
        report(
            &format!("rms_norm f32 [{}, 1024]", m / 1024),
            8.0 * m as f64,
            best_time(10, || drop(rows.rms_norm(&w, 1e-5).expect("rms_norm"))),
        );
    }
    Ok(())
}
