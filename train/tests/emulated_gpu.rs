//! Short training runs on the emulated GPU (`EMMA_GPU=emulate`, `--device cuda`) follow the CPU
//! run step for step: every kernel, GEMM and optimizer step of the device path runs, with the
//! master weights, gradients and AdamW moments on the device. One rank keeps them there for the
//! whole run; two ranks (threads on `cuda:0` and `cuda:1`) each update their shard on their
//! device and exchange through the host, and reach the same weights. A two-rank bf16 run killed
//! after a checkpoint and resumed ends bit-identical to one never interrupted: the device kernels
//! sum in a fixed order (no atomics), so a device run repeats exactly. Two processes (one per
//! emulated device, as `--nproc-per-node` starts them) train bit for bit like two threads.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tensor::Tensor;

/// Two steps of batch 4 on the shapes data.
const TWO_STEPS: &[&str] = &[
    "--data",
    "shapes",
    "--steps",
    "2",
    "--shapes-train",
    "8",
    "--shapes-eval",
    "0",
    "--global-batch",
    "4",
];

/// `train args --out out` with the emulated GPU (launcher flags, when any, first in `args`).
fn emulated(args: &[&str], out: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_train"));
    cmd.args(args).arg("--out").arg(out).env("EMMA_GPU", "emulate");
    cmd
}

/// Runs `cmd` to its end: its output, or `None` (after one line) when the emulator has no C++
/// compiler.
fn finished(cmd: &mut Command) -> Option<Output> {
    let done = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    if !done.status.success() && stderr.contains("no C++ compiler") {
        println!("skipped: {}", stderr.lines().last().unwrap_or(""));
        return None;
    }
    Some(done)
}

/// The per-step losses and final weights of a two-step f32 run on `device` with `ranks`
/// ranks, or `None` (after one line) when the emulator has no C++ compiler.
fn run(device: &str, ranks: usize, out: &Path) -> Option<(Vec<f64>, BTreeMap<String, Tensor>)> {
    let ranks = ranks.to_string();
    let mut args = TWO_STEPS.to_vec();
    args.extend(["--device", device, "--precision", "f32", "--ranks", &ranks]);
    let done = finished(&mut emulated(&args, out))?;
    assert!(
        done.status.success(),
        "train --device {device} --ranks {ranks} failed:\n{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let metrics = train::metrics::read_metrics(&out.join("metrics.jsonl")).unwrap();
    let weights = tensor::safetensors::load(out.join("final/model.safetensors")).unwrap();
    Some((metrics.iter().map(|m| m.loss).collect(), weights))
}

/// ‖a − b‖ / ‖a − start‖: how far apart two runs' weights ended, relative to how far they
/// moved.
fn relative_difference(
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
    start: &BTreeMap<String, Tensor>,
) -> f64 {
    let (mut moved, mut diff) = (0.0f64, 0.0f64);
    for (k, t) in a {
        let (x, y, s) = (t.to_vec_f64(), b[k].to_vec_f64(), start[k].to_vec_f64());
        for i in 0..x.len() {
            assert!(y[i].is_finite(), "{k} is not finite");
            moved += (x[i] - s[i]).powi(2);
            diff += (x[i] - y[i]).powi(2);
        }
    }
    assert!(moved > 0.0);
    (diff / moved).sqrt()
}

#[test]
fn runs_on_the_emulated_gpu_follow_the_cpu_with_the_state_on_the_devices() {
    let dir = tempfile::tempdir().unwrap();
    let Some((gpu, gpu_weights)) = run("cuda", 1, &dir.path().join("gpu")) else {
        return;
    };
    let (cpu, cpu_weights) = run("cpu", 1, &dir.path().join("cpu")).unwrap();
    let (two, two_weights) = run("cuda", 2, &dir.path().join("gpu2")).unwrap();
    let cfg = emma::config::EmmaConfig::preset("tiny").unwrap();
    let start = emma::checkpoint::from_pretrained_parts(&cfg, &Default::default(), 0, false)
        .unwrap()
        .store()
        .tensors();
    for losses in [&gpu, &two] {
        assert_eq!(losses.len(), 2);
        for (c, g) in cpu.iter().zip(losses) {
            assert!(((c - g) / c).abs() < 1e-5, "cpu {c} vs emulated gpu {g}");
        }
    }
    for (what, weights) in [("one rank", &gpu_weights), ("two ranks", &two_weights)] {
        let rel = relative_difference(&cpu_weights, weights, &start);
        println!("{what} on the emulated GPU: weight change differs from the CPU's by {rel:.2e}");
        assert!(
            rel < 1e-4,
            "{what}: weights differ from the CPU run's by {rel:.2e}"
        );
    }
}

/// A two-rank bf16 run on the emulated devices, checkpointing every 2 of 6 steps, into `out`.
fn sharded_run(out: &Path, extra: &[&str]) -> Command {
    let mut args = vec!["--data", "shapes", "--device", "cuda", "--ranks", "2"];
    args.extend([
        "--shapes-train",
        "24",
        "--shapes-eval",
        "0",
        "--global-batch",
        "4",
    ]);
    args.extend(["--steps", "6", "--checkpoint-every", "2"]);
    args.extend(extra);
    let mut cmd = emulated(&args, out);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

#[test]
fn a_killed_sharded_run_on_the_emulated_gpus_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, killed) = (dir.path().join("whole"), dir.path().join("killed"));
    let Some(done) = finished(&mut sharded_run(&whole, &[])) else {
        return;
    };
    assert!(
        done.status.success(),
        "the uninterrupted run failed:\n{}",
        String::from_utf8_lossy(&done.stderr)
    );

    let mut child = sharded_run(&killed, &[]).stderr(Stdio::null()).spawn().unwrap();
    let checkpoint = killed.join("checkpoints/step-00000002/state.json");
    common::kill_at_checkpoint(&mut child, &checkpoint, &killed, Duration::from_secs(600));
    let resumed = sharded_run(&killed, &["--resume"]).output().unwrap();
    assert!(
        resumed.status.success(),
        "the resumed run failed:\n{}",
        String::from_utf8_lossy(&resumed.stderr)
    );

    let read = |p: &Path| std::fs::read(p).unwrap();
    assert!(
        read(&whole.join("final/model.safetensors")) == read(&killed.join("final/model.safetensors")),
        "final weights differ"
    );
    let metrics = |p: &Path| String::from_utf8(read(&p.join("metrics.jsonl"))).unwrap();
    let (a, b) = (metrics(&whole), metrics(&killed));
    assert_eq!(a.lines().count(), 6);
    assert_eq!(a, b, "loss curves differ");
}

#[test]
fn two_processes_on_the_emulated_gpus_train_exactly_like_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let run = |launch: &[&str], out: &Path| {
        let mut args = launch.to_vec();
        args.extend(TWO_STEPS);
        args.extend(["--device", "cuda"]);
        finished(&mut emulated(&args, out))
    };
    let (procs, threads) = (dir.path().join("processes"), dir.path().join("threads"));
    let Some(done) = run(&["--nproc-per-node", "2"], &procs) else {
        return;
    };
    let failed =
        |what: &str, done: &Output| format!("{what} failed:\n{}", String::from_utf8_lossy(&done.stderr));
    assert!(done.status.success(), "{}", failed("two processes", &done));
    let done = run(&["--ranks", "2"], &threads).unwrap();
    assert!(done.status.success(), "{}", failed("two threads", &done));
    // Each process runs on its LOCAL_RANK's device; the bf16 weights, shards and losses agree.
    let read = |dir: &Path, file: &str| std::fs::read(dir.join(file)).unwrap();
    for file in [
        "final/model.safetensors",
        "checkpoints/step-00000002/optimizer-rank1.safetensors",
        "metrics.jsonl",
    ] {
        assert!(read(&procs, file) == read(&threads, file), "{file} differs");
    }
}
