//! A training run killed with SIGKILL in the middle and continued with `--resume` ends with the
//! same weights and the same loss curve as a run that was never interrupted.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const ARGS: &[&str] = &[
    "--data",
    "shapes",
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
    common::kill_at_checkpoint(&mut child, &first_checkpoint, &killed, Duration::from_secs(120));

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

/// Breaks something in a checkpoint folder.
type Damage = fn(&Path);

/// Copies a directory tree.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_previous_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let short = ["--steps", "20", "--keep", "4"];
    let whole = dir.path().join("whole");
    assert!(train(&whole, &short).status().unwrap().success());
    // The run as a kill after step 10 would have left it: checkpoints at steps 5 and 10.
    let stopped = dir.path().join("stopped");
    for step in ["00000005", "00000010"] {
        let ckpt = format!("checkpoints/step-{step}");
        copy_tree(&whole.join(&ckpt), &stopped.join(&ckpt));
    }
    std::fs::copy(whole.join("metrics.jsonl"), stopped.join("metrics.jsonl")).unwrap();
    let newest = Path::new("checkpoints/step-00000010");
    assert!(stopped.join(newest).join("state.json").is_file());

    let damages: [(&str, Damage); 4] = [
        ("bad state.json", |d| {
            std::fs::write(d.join("state.json"), "{ not json").unwrap()
        }),
        ("step mismatch", |d| {
            let text = std::fs::read_to_string(d.join("state.json")).unwrap();
            let mut state: serde_json::Value = serde_json::from_str(&text).unwrap();
            state["step"] = 9.into();
            std::fs::write(d.join("state.json"), state.to_string()).unwrap();
        }),
        ("truncated model", |d| {
            let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
            std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
        }),
        ("missing optimizer shard", |d| {
            std::fs::remove_file(d.join("optimizer-rank0.safetensors")).unwrap()
        }),
    ];
    let read = |p: &Path| std::fs::read(p).unwrap();
    for (i, (what, damage)) in damages.iter().enumerate() {
        let run = dir.path().join(format!("damaged-{i}"));
        copy_tree(&stopped, &run);
        damage(&run.join(newest));
        let resumed = train(&run, &[&short[..], &["--resume"]].concat())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&resumed.stderr);
        assert!(resumed.status.success(), "{what}: {stderr}");
        assert!(
            stderr.contains("step-00000010 is unusable")
                && stderr.contains("resuming from the newest good checkpoint"),
            "{what}: {stderr}"
        );
        assert_eq!(
            read(&whole.join("final/model.safetensors")),
            read(&run.join("final/model.safetensors")),
            "{what}: final weights differ from the uninterrupted run's"
        );
        assert!(
            run.join("checkpoints/.step-00000010.rejected").is_dir(),
            "{what}: not set aside"
        );
    }

    // Nothing good at all: an error that says what was found.
    let run = dir.path().join("none-good");
    copy_tree(&stopped, &run);
    for step in ["00000005", "00000010"] {
        std::fs::write(run.join(format!("checkpoints/step-{step}/state.json")), "{").unwrap();
    }
    let out = train(&run, &[&short[..], &["--resume"]].concat())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no usable checkpoint") && stderr.contains("malformed state"),
        "{stderr}"
    );
}

#[test]
fn overwrite_keeps_the_earlier_run_until_the_new_one_has_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let first = ["--steps", "10"];
    assert!(train(&out, &first).status().unwrap().success());
    std::fs::write(out.join("checkpoints/notes.txt"), "mine").unwrap();
    let snapshot = |out: &Path| {
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let mut stack = vec![out.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(out).unwrap().display().to_string();
                    files.push((rel, std::fs::read(&p).unwrap()));
                }
            }
        }
        files.sort();
        files
    };
    let before = snapshot(&out);
    // A new run that blows up before its first checkpoint leaves the earlier run as it was.
    let failing = [
        "--steps",
        "10",
        "--overwrite",
        "--lr",
        "10",
        "--max-grad-norm",
        "0",
        "--warmup-ratio",
        "0",
        "--checkpoint-every",
        "1000",
    ];
    let run = train(&out, &failing).stderr(Stdio::piped()).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(
        stderr.contains("earlier run's outputs are back in place"),
        "{stderr}"
    );
    assert_eq!(
        snapshot(&out),
        before,
        "the failed --overwrite run changed the earlier run's files"
    );
    // A new run that succeeds replaces the checkpoints, and leaves files it did not write.
    assert!(train(&out, &["--steps", "5", "--overwrite"])
        .status()
        .unwrap()
        .success());
    let names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"step-00000005".to_owned()), "{names:?}");
    assert!(!names.contains(&"step-00000010".to_owned()), "{names:?}");
    assert_eq!(
        std::fs::read_to_string(out.join("checkpoints/notes.txt")).unwrap(),
        "mine"
    );
    assert!(!out.join(train::replaced::ASIDE_DIR).exists());
}
