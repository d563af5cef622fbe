//! Bad LLaVA data: a corrupt image and a malformed record are errors naming the record and the
//! path by default; with `--skip-bad-samples` the run completes and reports both skips. Text-only
//! and multi-turn records train alongside image records. A loss that stops being finite ends the
//! run with a message that names the step and the last good checkpoint.

use clap::Parser;
use serde_json::{json, Value};
use std::path::Path;
use train::options::TrainOptions;
use train::shapes::{write_llava, ShapesConfig};

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    t: TrainOptions,
}

fn options(data: &Path, out: &Path) -> TrainOptions {
    let mut o = Wrap::parse_from(["train", "--device", "cpu"]).t;
    o.data = data.display().to_string();
    o.global_batch = Some(4);
    o.steps = Some(3);
    o.out = Some(out.to_owned());
    o
}

/// 12 shapes records, then a multi-turn text-only record, then the two bad ones: a record whose
/// second message is not from the model, and one whose image is not an image.
fn bad_data_set(dir: &Path) -> std::path::PathBuf {
    let json = write_llava(
        &ShapesConfig {
            image_size: 32,
            seed: 3,
        },
        0,
        12,
        dir,
    )
    .unwrap();
    let mut records: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    records.push(json!({"id": "chat", "conversations": [
        {"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"},
        {"from": "human", "value": "Say no."}, {"from": "gpt", "value": "no"}]}));
    records.push(json!({"id": "malformed", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "human", "value": "again"}]}));
    std::fs::write(dir.join("images/corrupt.png"), b"this is not a png").unwrap();
    records.push(
        json!({"id": "corrupt", "image": "images/corrupt.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "nothing"}]}),
    );
    std::fs::write(&json, serde_json::to_string(&records).unwrap()).unwrap();
    json
}

#[test]
fn bad_samples_fail_by_default_and_are_skipped_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let json = bad_data_set(dir.path());
    let err = train::trainer::train(&options(&json, &dir.path().join("a")))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("record 13 (id malformed)") && err.contains("data.json"),
        "{err}"
    );

    // With the malformed record fixed, the corrupt image is the first error, named by its path.
    let mut records: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let fixed = records.remove(13);
    let only_image = dir.path().join("only_image.json");
    std::fs::write(&only_image, serde_json::to_string(&records).unwrap()).unwrap();
    let err = train::trainer::train(&options(&only_image, &dir.path().join("b")))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("record 13 (id corrupt)") && err.contains("corrupt.png"),
        "{err}"
    );
    drop(fixed);

    let mut o = options(&json, &dir.path().join("c"));
    o.skip_bad_samples = true;
    // One step over all 13 good records: the text-only, multi-turn one included.
    o.global_batch = Some(13);
    o.steps = Some(2);
    let summary = train::trainer::train(&o).unwrap();
    let skipped: Vec<usize> = summary.skipped.iter().map(|s| s.index).collect();
    assert_eq!(skipped, vec![13, 14]);
    assert!(summary.final_loss.is_finite());
}

#[test]
fn a_non_finite_loss_stops_with_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let json = write_llava(
        &ShapesConfig {
            image_size: 32,
            seed: 1,
        },
        0,
        16,
        dir.path(),
    )
    .unwrap();
    let mut o = options(&json, &dir.path().join("run"));
    o.lr = Some(10.0);
    o.warmup_ratio = Some(0.0);
    o.steps = Some(10);
    o.checkpoint_every = 1;
    o.max_grad_norm = 0.0;
    let err = train::trainer::train(&o)
        .err()
        .expect("a learning rate of 10 without clipping must blow up");
    let msg = err.to_string();
    assert!(msg.contains("non-finite training at step"), "{msg}");
    let train::error::TrainError::NonFinite { step, checkpoint, .. } = err else {
        panic!("{msg}")
    };
    let checkpoint = checkpoint.expect("a checkpoint before the bad step");
    assert!(msg.contains(&checkpoint.display().to_string()));
    let state = train::checkpoint::read_state(&checkpoint).unwrap();
    assert_eq!(state.step, step - 1);
    assert!(state.loss.is_finite());
}

/// A data set whose last record's image path is `image` (relative to `data/`), next to a real PNG
/// outside `data/`.
fn escaping_data_set(dir: &Path, image: &str) -> std::path::PathBuf {
    let data = dir.join("data");
    let json = write_llava(
        &ShapesConfig {
            image_size: 32,
            seed: 3,
        },
        0,
        4,
        &data,
    )
    .unwrap();
    let mut records: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let inside = records[0]["image"].as_str().unwrap().to_owned();
    std::fs::copy(data.join(&inside), dir.join("outside.png")).unwrap();
    records.push(json!({"id": "escape", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "a file"}]}));
    std::fs::write(&json, serde_json::to_string(&records).unwrap()).unwrap();
    json
}

#[test]
fn image_paths_that_leave_the_image_folder_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside.png").display().to_string();
    for (case, image) in [("dotdot", "../outside.png"), ("absolute", outside.as_str())] {
        let root = dir.path().join(case);
        std::fs::create_dir_all(&root).unwrap();
        let json = escaping_data_set(
            &root,
            &image.replace(dir.path().to_str().unwrap(), root.to_str().unwrap()),
        );
        let err = train::trainer::train(&options(&json, &root.join("out")))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("record 4 (id escape)")
                && err.contains("outside")
                && err.contains("--images-anywhere"),
            "{case}: {err}"
        );
        // Said on purpose, it is allowed.
        let mut o = options(&json, &root.join("anywhere"));
        o.images_anywhere = true;
        o.steps = Some(1);
        train::trainer::train(&o).unwrap();
    }
    #[cfg(unix)]
    {
        let root = dir.path().join("link");
        std::fs::create_dir_all(&root).unwrap();
        let json = escaping_data_set(&root, "images/link.png");
        std::os::unix::fs::symlink(root.join("outside.png"), root.join("data/images/link.png")).unwrap();
        let err = train::trainer::train(&options(&json, &root.join("out")))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("record 4 (id escape)") && err.contains("is a link to"),
            "{err}"
        );
    }
}

#[test]
fn records_with_odd_image_tags_get_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let json = write_llava(
        &ShapesConfig {
            image_size: 32,
            seed: 3,
        },
        0,
        2,
        dir.path(),
    )
    .unwrap();
    let mut records: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let image = records[0]["image"].clone();
    let turn = |q: &str| json!([{"from": "human", "value": q}, {"from": "gpt", "value": "yes"}]);
    records.push(json!({"id": "untagged", "image": image, "conversations": turn("What?")}));
    records.push(json!({"id": "twice", "image": image, "conversations": turn("<image><image>What?")}));
    records.push(json!({"id": "no-image", "conversations": turn("<image>\nWhat?")}));
    std::fs::write(&json, serde_json::to_string(&records).unwrap()).unwrap();
    let data = train::data::LlavaData::load(&json, dir.path(), false, false).unwrap();
    assert_eq!(data.notes.len(), 3, "{:?}", data.notes);
    for (note, (id, what)) in data.notes.iter().zip([
        ("untagged", "no <image> tag"),
        ("twice", "more than one <image> tag"),
        ("no-image", "but no image"),
    ]) {
        assert!(
            note.contains(&format!("(id {id})")) && note.contains(what),
            "{note}"
        );
    }
}
