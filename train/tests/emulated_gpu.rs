//! A short training run on the emulated GPU (`EMMA_GPU=emulate`, `--device cuda`) follows the
//! CPU run step for step: every kernel, GEMM and optimizer step of the device path runs.

use std::path::Path;
use std::process::Command;

/// The per-step losses of a two-step f32 run on `device`, or `None` (after one line) when the
/// emulator has no C++ compiler.
fn losses(device: &str, out: &Path) -> Option<Vec<f64>> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_train"));
    cmd.args([
        "--data",
        "shapes",
        "--device",
        device,
        "--precision",
        "f32",
        "--steps",
        "2",
    ])
    .args(["--shapes-train", "8", "--shapes-eval", "0", "--global-batch", "4"])
    .arg("--out")
    .arg(out)
    .env("EMMA_GPU", "emulate");
    let run = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    if !run.status.success() {
        if stderr.contains("no C++ compiler") {
            println!("skipped: {}", stderr.lines().last().unwrap_or(""));
            return None;
        }
        panic!("train --device {device} failed:\n{stderr}");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    Some(
        metrics
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect(),
    )
}

#[test]
fn a_short_run_on_the_emulated_gpu_follows_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let Some(gpu) = losses("cuda", &dir.path().join("gpu")) else {
        return;
    };
    let cpu = losses("cpu", &dir.path().join("cpu")).unwrap();
    assert_eq!(gpu.len(), 2);
    for (c, g) in cpu.iter().zip(&gpu) {
        assert!(((c - g) / c).abs() < 1e-5, "cpu {c} vs emulated gpu {g}");
    }
}
