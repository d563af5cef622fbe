//! Compiles every kernel source with NVRTC (no GPU needed) and prints one line per file.
//!
//!     cargo run -p cuda --bin nvrtc-check [-- --arch sm_90 [--arch sm_80 ...]]
//!
//! Exits 1 with NVRTC's log when a kernel does not compile, 2 when libnvrtc cannot be loaded
//! (`scripts/nvrtc.sh` fetches it), 64 on bad arguments.

use cuda::compile::{self, ALL_KERNELS};
use cuda::CudaError;
use std::process::ExitCode;
use std::time::Instant;

/// The architectures asked for (`--arch X`, repeatable; `sm_90` by default).
fn parse_archs() -> Result<Vec<String>, String> {
    let mut archs = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--arch" => archs.push(args.next().ok_or("--arch needs a value, e.g. sm_90")?),
            other => match other.strip_prefix("--arch=") {
                Some(a) => archs.push(a.to_string()),
                None => {
                    return Err(format!(
                        "unknown argument {other:?}; usage: nvrtc-check [--arch sm_XY]..."
                    ))
                }
            },
        }
    }
    if archs.is_empty() {
        archs.push("sm_90".into());
    }
    Ok(archs)
}

fn main() -> ExitCode {
    let archs = match parse_archs() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nvrtc-check: {e}");
            return ExitCode::from(64);
        }
    };
    let (major, minor) = match compile::nvrtc_version() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("nvrtc-check: cannot use NVRTC: {e}");
            eprintln!("nvrtc-check: fetch it with `scripts/nvrtc.sh cargo run -p cuda --bin nvrtc-check`");
            return ExitCode::from(2);
        }
    };
    println!(
        "NVRTC {major}.{minor}; {} kernel files; archs {}",
        ALL_KERNELS.len(),
        archs.join(", ")
    );
    let total = Instant::now();
    for arch in &archs {
        for file in ALL_KERNELS {
            let start = Instant::now();
            match compile::compile(file, arch) {
                Ok(cubin) => println!(
                    "ok    {arch}  {:<18} {:>6.2} s  {:>8} bytes",
                    file.name,
                    start.elapsed().as_secs_f64(),
                    cubin.len()
                ),
                Err(e @ CudaError::Compile { .. }) => {
                    println!("FAIL  {arch}  {}", file.name);
                    eprintln!("{e}");
                    return ExitCode::from(1);
                }
                Err(e) => {
                    eprintln!("nvrtc-check: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    }
    println!("all kernels compiled in {:.2} s", total.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}
