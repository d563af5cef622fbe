//! `train --nproc-per-node`: real worker processes on this machine. Training on two processes
//! repeats training on two threads bit for bit; the workers of `train rendezvous` agree on one
//! id; a worker killed mid-run, or failing, fails the launch with every rank named, within
//! seconds rather than at the end of the run.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn train() -> Command {
    Command::new(env!("CARGO_BIN_EXE_train"))
}

/// A six-step shapes run into `out`, launched as given.
fn shapes_run(cmd: &mut Command, out: &Path) -> Output {
    cmd.args([
        "--data",
        "shapes",
        "--device",
        "cpu",
        "--shapes-train",
        "64",
        "--shapes-eval",
        "0",
    ])
    .args([
        "--global-batch",
        "8",
        "--steps",
        "6",
        "--checkpoint-every",
        "3",
        "--out",
    ])
    .arg(out)
    .env_remove("WORLD_SIZE")
    .output()
    .unwrap()
}

#[test]
fn two_processes_train_exactly_like_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let (procs, threads) = (dir.path().join("processes"), dir.path().join("threads"));
    let p = shapes_run(train().args(["--nproc-per-node", "2"]), &procs);
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    let t = shapes_run(train().args(["--ranks", "2"]), &threads);
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    let read = |dir: &Path, file: &str| std::fs::read(dir.join(file)).unwrap();
    assert!(
        read(&procs, "final/model.safetensors") == read(&threads, "final/model.safetensors"),
        "the final weights differ"
    );
    // Each process wrote its own optimizer shard; they equal the threads' shards.
    for shard in ["optimizer-rank0.safetensors", "optimizer-rank1.safetensors"] {
        let file = format!("checkpoints/step-00000006/{shard}");
        assert!(read(&procs, &file) == read(&threads, &file), "{file} differs");
    }
    let losses = |dir: &Path| -> Vec<f64> {
        let metrics = train::metrics::read_metrics(&dir.join("metrics.jsonl")).unwrap();
        metrics.iter().map(|m| m.loss).collect()
    };
    assert_eq!(losses(&procs).len(), 6);
    assert_eq!(losses(&procs), losses(&threads));
    // Only rank 0 reports.
    let said = String::from_utf8_lossy(&p.stdout);
    assert_eq!(said.matches("trained 6 steps").count(), 1, "{said}");
}

#[test]
fn a_killed_worker_fails_the_launch_and_is_named_everywhere() {
    let started = Instant::now();
    let mut launcher = train()
        .args([
            "--nproc-per-node",
            "3",
            "rendezvous",
            "--timeout",
            "60",
            "--hold",
            "60",
        ])
        .env_remove("WORLD_SIZE")
        .env_remove("MASTER_PORT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(launcher.stdout.take().unwrap()).lines();
    let mut ranks: Vec<(String, String)> = Vec::new(); // (rank, id)
    let mut victim = None;
    while ranks.len() < 3 {
        let line = lines
            .next()
            .expect("the workers ended before all printed their id")
            .unwrap();
        let (who, id) = line.split_once(": id ").unwrap_or_else(|| panic!("{line}"));
        if who.starts_with("rank 1 of 3") {
            let pid = who.rsplit("pid ").next().unwrap().trim_end_matches(')');
            victim = Some(pid.to_owned());
        }
        ranks.push((who.to_owned(), id.to_owned()));
    }
    assert!(
        ranks.iter().all(|(_, id)| id == &ranks[0].1 && id.len() == 256),
        "{ranks:?}"
    );
    let victim = victim.expect("rank 1 printed its pid");
    assert!(Command::new("kill")
        .args(["-9", &victim])
        .status()
        .unwrap()
        .success());
    let status = launcher.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut launcher.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !status.success(),
        "the launch succeeded with a worker killed:\n{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the launch took {:?}: the others held on instead of noticing",
        started.elapsed()
    );
    assert!(
        err.contains(&format!("rank 1 (pid {victim}) was killed by signal 9")),
        "{err}"
    );
    assert!(err.contains("rank 1 left the run"), "{err}");
    for other in ["rank 0 (pid", "rank 2 (pid"] {
        assert!(err.contains(other), "{other} missing in: {err}");
    }
}

#[test]
fn workers_that_fail_fail_the_launch() {
    let dir = tempfile::tempdir().unwrap();
    let out = train()
        .args(["--nproc-per-node", "2", "--data"])
        .arg(dir.path().join("missing.json"))
        .args(["--device", "cpu", "--out"])
        .arg(dir.path().join("run"))
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("missing.json"), "{err}");
    assert!(
        err.contains("rank 0 (pid") && err.contains("exited with status 1"),
        "{err}"
    );
}

#[test]
fn a_multi_process_run_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, resumed) = (dir.path().join("whole"), dir.path().join("resumed"));
    let run = |out: &Path, extra: &[&str]| {
        let o = shapes_run(train().args(["--nproc-per-node", "2"]).args(extra), out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&whole, &[]);
    run(&resumed, &[]);
    // As if killed between the checkpoints of steps 3 and 6.
    std::fs::remove_dir_all(resumed.join("checkpoints/step-00000006")).unwrap();
    std::fs::remove_dir_all(resumed.join("final")).unwrap();
    run(&resumed, &["--resume"]);
    let weights = |dir: &Path| std::fs::read(dir.join("final/model.safetensors")).unwrap();
    assert!(
        weights(&whole) == weights(&resumed),
        "the resumed run ended elsewhere"
    );
}
