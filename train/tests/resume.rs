//! A training run killed with SIGKILL in the middle and continued with `--resume` ends with the
//! same weights and the same loss curve as a run that was never interrupted.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ARGS: &[&str] = &[
    "--shapes-train",
    "96",
    "--shapes-eval",
    "0",
    "--global-batch",
    "8",
    "--steps",
    "40",
    "--checkpoint-every",
    "5",
    "--device",
    "cpu",
];

fn train(out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_train"));
    cmd.args(ARGS).arg("--out").arg(out).args(extra);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    cmd
}

#[test]
fn a_killed_run_resumes_to_the_same_weights_and_losses() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, killed) = (dir.path().join("whole"), dir.path().join("killed"));
    assert!(train(&whole, &[]).status().unwrap().success());

    let mut child = train(&killed, &[]).spawn().unwrap();
    let first_checkpoint = killed.join("checkpoints/step-00000005/state.json");
    let start = Instant::now();
    while !first_checkpoint.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run finished before it could be killed");
    assert!(
        !killed.join("final").exists(),
        "the killed run must not have finished"
    );

    // Without --resume the earlier run's checkpoints are not silently overwritten.
    assert!(!train(&killed, &[]).status().unwrap().success());
    assert!(train(&killed, &["--resume"]).status().unwrap().success());

    let read = |p: &Path| std::fs::read(p).unwrap();
    assert_eq!(
        read(&whole.join("final/model.safetensors")),
        read(&killed.join("final/model.safetensors")),
        "final weights differ"
    );
    let metrics = |p: &Path| String::from_utf8(read(&p.join("metrics.jsonl"))).unwrap();
    let (a, b) = (metrics(&whole), metrics(&killed));
    assert_eq!(a.lines().count(), 40);
    assert_eq!(a, b, "loss curves differ");
}
