//! easy-VQA from a data folder laid out like the published one (`answers.txt`, `train/` and
//! `test/` with `questions.json` and `images/N.png`), written here: the splits, the checks of
//! bad data (a corrupt PNG, a malformed or inconsistent questions.json, a wrong checksum, a
//! folder that is not easy-VQA), and a short run whose report lands in the run folder.

use clap::Parser;
use serde_json::{json, Value};
use std::path::Path;
use train::data::Dataset;
use train::easy_vqa::{check_sha256, locate, EasyVqaData, Split};
use train::options::TrainOptions;

const ANSWERS: [&str; 13] = [
    "circle",
    "green",
    "red",
    "gray",
    "yes",
    "teal",
    "black",
    "rectangle",
    "yellow",
    "triangle",
    "brown",
    "blue",
    "no",
];

/// Writes a split of `images` images with three questions each (a colour, a shape and a yes/no
/// question).
fn write_split(dir: &Path, images: u64) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let mut questions = Vec::new();
    for id in 0..images {
        let colour = ["red", "blue", "green"][id as usize % 3];
        let shape = ["circle", "rectangle", "triangle"][id as usize % 3];
        let rgb = [[200, 30, 30], [30, 30, 200], [30, 200, 30]][id as usize % 3];
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            if (16..48).contains(&x) && (16..48).contains(&y) {
                image::Rgb(rgb)
            } else {
                image::Rgb([250, 245, 240])
            }
        });
        img.save(dir.join(format!("images/{id}.png"))).unwrap();
        questions.push(json!(["what color is the shape?", colour, id]));
        questions.push(json!(["what shape is in the image?", shape, id]));
        questions.push(json!([format!("is there a {shape}?"), "yes", id]));
    }
    std::fs::write(dir.join("questions.json"), Value::Array(questions).to_string()).unwrap();
}

/// A complete data folder: 12 training and 6 test images.
fn data_folder(root: &Path) -> std::path::PathBuf {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("answers.txt"), ANSWERS.join("\n") + "\n").unwrap();
    write_split(&data.join("train"), 12);
    write_split(&data.join("test"), 6);
    data
}

#[test]
fn splits_hold_out_whole_images_and_carry_question_types() {
    let dir = tempfile::tempdir().unwrap();
    let data = locate(Some(&data_folder(dir.path()))).unwrap();
    let train = EasyVqaData::load(&data, Split::Train, 4, false).unwrap();
    let val = EasyVqaData::load(&data, Split::Validation, 4, false).unwrap();
    let test = EasyVqaData::load(&data, Split::Test, 4, false).unwrap();
    assert_eq!((train.len(), val.len(), test.len()), (24, 12, 18));
    assert!(val.describe().contains("on 4 images"), "{}", val.describe());
    assert!(train.describe().contains("on 8 images"), "{}", train.describe());
    // The validation images are the last ids (8..12), and no training question is about them.
    let image_of = |d: &EasyVqaData, i: usize| -> u64 {
        let id = d.get(i).unwrap().id;
        id.rsplit("image-").next().unwrap().parse().unwrap()
    };
    let val_ids: std::collections::BTreeSet<u64> = (0..val.len()).map(|i| image_of(&val, i)).collect();
    assert_eq!(val_ids, (8..12).collect());
    assert!((0..train.len()).all(|i| image_of(&train, i) < 8));
    let first = val.get(0).unwrap();
    assert_eq!(first.conversation.turns[0].1.as_deref(), Some("green"));
    let kinds: Vec<String> = (0..3).map(|i| val.get(i).unwrap().kind.unwrap()).collect();
    assert_eq!(kinds, ["colour", "shape", "yes/no"]);
}

#[test]
fn bad_data_is_an_error_naming_the_file_or_a_counted_skip() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_folder(dir.path());
    std::fs::write(data.join("train/images/2.png"), b"not a png").unwrap();
    let err = EasyVqaData::load(&data, Split::Train, 4, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("train/images/2.png"), "{err}");
    let skipping = EasyVqaData::load(&data, Split::Train, 4, true).unwrap();
    assert_eq!(skipping.len(), 21);
    assert_eq!(skipping.skipped.len(), 3);
    assert!(
        skipping.skipped[0].reason.contains("image 2"),
        "{}",
        skipping.skipped[0].reason
    );

    std::fs::write(data.join("test/questions.json"), r#"[["what?", "red"]]"#).unwrap();
    let err = EasyVqaData::load(&data, Split::Test, 4, false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("test/questions.json") && err.contains("image id"),
        "{err}"
    );

    std::fs::write(
        data.join("test/questions.json"),
        r#"[["what?", "red", 0], ["what?", "purple", 1]]"#,
    )
    .unwrap();
    let err = EasyVqaData::load(&data, Split::Test, 4, false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("record 1") && err.contains("purple") && err.contains("answers.txt"),
        "{err}"
    );

    std::fs::remove_dir_all(data.join("test/images")).unwrap();
    let err = locate(Some(&data)).err().unwrap().to_string();
    assert!(
        err.contains("test/images is missing") && err.contains("pip download"),
        "{err}"
    );
}

#[test]
fn a_wheel_with_the_wrong_checksum_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let wheel = dir.path().join(train::easy_vqa::WHEEL);
    std::fs::write(&wheel, b"not the published wheel").unwrap();
    let err = check_sha256(&wheel).err().unwrap().to_string();
    assert!(err.contains(&wheel.display().to_string()), "{err}");
    assert!(err.contains(train::easy_vqa::WHEEL_SHA256), "{err}");
}

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    t: TrainOptions,
}

#[test]
fn a_short_run_writes_its_test_report_by_question_type() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_folder(dir.path());
    let out = dir.path().join("run");
    let mut o = Wrap::parse_from(["train", "--device", "cpu", "--val-images", "4"]).t;
    o.data_dir = Some(data);
    o.global_batch = Some(4);
    o.steps = Some(2);
    o.vision_warmup = Some(3);
    o.eval_max_new_tokens = 3;
    o.out = Some(out.clone());
    let summary = train::trainer::train(&o).unwrap();
    let (report, file) = summary.eval.unwrap();
    assert_eq!(file, out.join("eval.json"));
    assert_eq!(report.examples, 18);
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert!(json["data"].as_str().unwrap().contains("test"), "{json}");
    for kind in ["colour", "shape", "yes/no"] {
        let t = &json["by_type"][kind];
        assert_eq!(t["examples"], 6, "{json}");
        // Each colour and shape answer occurs twice in six questions; "yes" six times.
        let majority = if kind == "yes/no" { 1.0 } else { 1.0 / 3.0 };
        assert!(
            (t["majority_accuracy"].as_f64().unwrap() - majority).abs() < 1e-9,
            "{json}"
        );
    }
    assert_eq!(json["majority_answer"], "yes");

    // The checkpoint at the last step answered the validation slice, and loss.png was drawn.
    let metrics = train::metrics::read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.len(), 2);
    assert_eq!(metrics[0].val_accuracy, None);
    let acc = metrics[1]
        .val_accuracy
        .expect("no validation accuracy at the checkpoint");
    assert!((0.0..=1.0).contains(&acc), "{acc}");
    let png = image::open(out.join("loss.png")).unwrap();
    assert_eq!((png.width(), png.height()), train::loss_plot::SIZE);
    std::fs::remove_file(out.join("loss.png")).unwrap();
    assert_eq!(
        train::loss_plot::draw_loss_png(&out).unwrap(),
        out.join("loss.png")
    );
    let err = train::loss_plot::draw_loss_png(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("metrics.jsonl"), "{err}");
}

#[test]
fn the_tiny_preset_begins_with_one_pass_over_the_open_questions() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_folder(dir.path());
    let train = EasyVqaData::load(&data, Split::Train, 4, false).unwrap();
    let open = train.open_questions(&["colour", "shape"]).unwrap();
    let shapes_only = train.open_questions(&["shape"]).unwrap();
    assert_eq!(shapes_only.len(), 8);
    assert!(shapes_only
        .iter()
        .all(|&i| train.get(i).unwrap().kind.as_deref() == Some("shape")));
    // Each image has a colour, a shape and a yes/no question.
    assert_eq!(open.len(), 16);
    assert!(open
        .iter()
        .all(|&i| train.get(i).unwrap().kind.as_deref() != Some("yes/no")));
    let steps = |extra: &[&str]| {
        let args = ["train", "--device", "cpu", "--val-images", "4", "--epochs", "1"];
        let mut o = Wrap::parse_from(args.iter().chain(extra)).t;
        o.data_dir = Some(data.clone());
        o.global_batch = Some(4);
        o.vision_warmup = Some(0);
        o.eval_max_new_tokens = 2;
        o.out = Some(dir.path().join(format!("run{}", extra.len())));
        train::trainer::train(&o).unwrap().steps
    };
    // 24 training questions in batches of 4: by default 2 steps on the 8 shape questions, then
    // an epoch of 6.
    assert_eq!(steps(&[]), 8);
    assert_eq!(steps(&["--no-open-first"]), 6);
    // All 16 open questions: 4 steps, then the epoch.
    assert_eq!(steps(&["--open-first-kinds", "colour,shape"]), 10);
    let bad = Wrap::parse_from(["train", "--open-first-kinds", "shape,size"]).t;
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("--open-first-kinds \"size\""), "{err}");
    let shapes = Wrap::parse_from(["train", "--data", "shapes", "--open-first"]).t;
    let err = shapes.validate().unwrap_err().to_string();
    assert!(err.contains("--open-first applies to easy-VQA"), "{err}");
}

#[test]
fn the_tiny_preset_warms_up_its_towers_on_easy_vqa_then_freezes_them() {
    let opts = |args: &[&str]| Wrap::parse_from(["train"].iter().chain(args)).t;
    let tiny = opts(&[]);
    assert_eq!(tiny.recipe().vision_warmup, 2500);
    assert_eq!(tiny.recipe().vision_warmup_lr, 2e-3);
    assert_eq!(tiny.vision_warmup_labels, ["colour", "shape"]);
    assert!(tiny.vision_frozen(false));
    assert!(!opts(&["--train-vision"]).vision_frozen(false));
    let none = opts(&["--vision-warmup", "0"]);
    assert_eq!(none.recipe().vision_warmup, 0);
    assert!(!none.vision_frozen(false));
    // No labels to warm up on: the random towers are trained.
    let shapes = opts(&["--data", "shapes"]);
    assert_eq!(shapes.recipe().vision_warmup, 0);
    assert!(!shapes.vision_frozen(false));
    // The paper presets keep their frozen pretrained towers and have no warm-up.
    let paper = opts(&["--preset", "emma-v1-2.8b"]);
    assert_eq!(paper.recipe().vision_warmup, 0);
    assert!(paper.vision_frozen(true));
    let err = opts(&["--vision-warmup-lr", "0"])
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("--vision-warmup-lr 0"), "{err}");
}

#[test]
fn the_vision_warmup_learns_the_images_labels_and_changes_only_the_towers() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_folder(dir.path());
    let train = EasyVqaData::load(&data, Split::Train, 4, false).unwrap();
    let labelled = train.labelled_images().unwrap();
    let names = |t: usize| labelled.tasks[t].1.clone();
    assert_eq!(labelled.tasks[0].0, "colour");
    assert_eq!(names(0), ["blue", "green", "red"]);
    assert_eq!(labelled.tasks[1].0, "shape");
    assert_eq!(names(1), ["circle", "rectangle", "triangle"]);
    // Images 0..8 are the training split; image i is red/blue/green and circle/rectangle/triangle
    // by i % 3 (see `write_split`).
    assert_eq!(labelled.images.len(), 8);
    for (i, (_, labels)) in labelled.images.iter().enumerate() {
        let colour = ["red", "blue", "green"][i % 3];
        let shape = ["circle", "rectangle", "triangle"][i % 3];
        assert_eq!(labels[0].map(|c| names(0)[c].clone()).as_deref(), Some(colour));
        assert_eq!(labels[1].map(|c| names(1)[c].clone()).as_deref(), Some(shape));
    }

    let cfg = emma::config::EmmaConfig::named("tiny").unwrap();
    let start = emma::model::Emma::random(&cfg, 0, tensor::DType::F32, true)
        .unwrap()
        .store()
        .tensors();
    let warm = |steps| {
        train::vision_warmup::warm_up_vision(
            &cfg,
            start.clone(),
            &labelled,
            steps,
            (1e-3, 0.01),
            7,
            tensor::Device::Cpu,
        )
        .unwrap()
    };
    let (_, first) = warm(1);
    let (after, last) = warm(60);
    // Two 3-way read-outs start near 2 ln 3 = 2.2; the colours tell these images apart.
    assert!(first.last_loss > 1.5, "first step's loss {}", first.last_loss);
    assert!(
        last.last_loss < 0.5 * first.last_loss,
        "loss {} after 60 steps",
        last.last_loss
    );
    assert_eq!(after.len(), start.len());
    let changed: Vec<&String> = start
        .iter()
        .filter(|(name, t)| t.to_vec_f64() != after[*name].to_vec_f64())
        .map(|(name, _)| name)
        .collect();
    let outside: Vec<_> = changed
        .iter()
        .filter(|n| !train::vision_warmup::warms_up(n))
        .collect();
    assert!(
        outside.is_empty(),
        "changed outside the towers (the projector trained along starts again): {outside:?}"
    );
    // The image tokens come from the towers' second-to-last layer (as in the paper), so the last
    // layer gets no gradient; the patch embeddings must have learned.
    for must in [
        "siglip.embeddings.patch_embedding",
        "dinov2.embeddings.patch_embeddings",
    ] {
        assert!(
            changed.iter().any(|n| n.contains(must)),
            "{must} not trained: {changed:?}"
        );
    }
    assert!(start.keys().any(|k| !train::vision_warmup::warms_up(k)));

    // Towers frozen for the run after it (`--freeze-vision`) still learn in the warm-up.
    let mut frozen_cfg = cfg.clone();
    frozen_cfg.vision.frozen = true;
    let (frozen_after, _) = train::vision_warmup::warm_up_vision(
        &frozen_cfg,
        start.clone(),
        &labelled,
        3,
        (1e-3, 0.01),
        7,
        tensor::Device::Cpu,
    )
    .unwrap();
    let patch = "vision.siglip.embeddings.patch_embedding.weight";
    assert!(start.contains_key(patch), "no {patch}");
    assert_ne!(start[patch].to_vec_f64(), frozen_after[patch].to_vec_f64());

    let shape_only = train.labelled_images().unwrap().select(&["shape"]).unwrap();
    assert_eq!(shape_only.tasks, labelled.tasks[1..]);
    let shape_labels: Vec<_> = labelled.images.iter().map(|(_, l)| vec![l[1]]).collect();
    let selected: Vec<_> = shape_only.images.iter().map(|(_, l)| l.clone()).collect();
    assert_eq!(selected, shape_labels);
    let err = train.labelled_images().unwrap().select(&["size"]).err().unwrap();
    assert_eq!(err, "no label set 'size' (the data has colour, shape)");

    let shapes = Wrap::parse_from(["train", "--data", "shapes", "--vision-warmup", "5"]).t;
    let err = shapes.validate().unwrap_err().to_string();
    assert!(err.contains("--vision-warmup applies to easy-VQA"), "{err}");
}
