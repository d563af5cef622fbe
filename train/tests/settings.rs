//! Every numeric setting outside its range, and every option that cannot apply, is refused by
//! name before training starts (nothing is written to --out).

use clap::Parser;
use train::options::TrainOptions;

#[derive(Parser)]
#[command(args_override_self = true)]
struct Wrap {
    #[command(flatten)]
    t: TrainOptions,
}

#[test]
fn settings_out_of_range_are_refused_before_any_work() {
    let cases: &[(&[&str], &str)] = &[
        (&["--lr", "-1"], "--lr -1"),
        (&["--lr", "0"], "--lr 0"),
        (&["--lr", "NaN"], "--lr NaN"),
        (&["--lr", "inf"], "--lr inf"),
        (&["--lr", "30"], "--lr 30"),
        (&["--warmup-ratio", "1"], "--warmup-ratio 1"),
        (&["--warmup-ratio", "-0.1"], "--warmup-ratio -0.1"),
        (&["--weight-decay", "-0.5"], "--weight-decay -0.5"),
        (&["--weight-decay", "NaN"], "--weight-decay NaN"),
        (&["--epochs", "0"], "--epochs 0"),
        (&["--epochs", "-2"], "--epochs -2"),
        (&["--epochs", "inf"], "--epochs inf"),
        (&["--pixel-weight", "-1e-3"], "--pixel-weight -0.001"),
        (&["--max-grad-norm", "-1"], "--max-grad-norm -1"),
        (&["--max-grad-norm", "NaN"], "--max-grad-norm NaN"),
        (&["--steps", "0"], "--steps 0"),
        (&["--max-len", "0"], "--max-len 0"),
        (&["--global-batch", "0"], "--global-batch 0"),
        (&["--micro-batch", "0"], "--micro-batch 0"),
        (&["--ranks", "0"], "--ranks 0"),
        (&["--checkpoint-every", "0"], "--checkpoint-every 0"),
        (&["--keep", "0"], "--keep 0"),
        (&["--eval-max-new-tokens", "0"], "--eval-max-new-tokens 0"),
        (&["--shapes-train", "0"], "--shapes-train 0"),
        (&["--eval-data", "x.json"], "--eval-data applies to LLaVA data"),
        (
            &["--image-folder", "imgs"],
            "--image-folder applies to LLaVA data",
        ),
        (
            &["--skip-bad-samples"],
            "--skip-bad-samples applies to LLaVA data",
        ),
        (&["--data-dir", "evqa"], "--data-dir applies to easy-VQA"),
        (
            &["--eval-split", "validation"],
            "--eval-split applies to easy-VQA",
        ),
        (
            &["--data", "easy-vqa", "--eval-split", "train"],
            "--eval-split train: use validation or test",
        ),
        (
            &["--data", "easy-vqa", "--eval-split", "dev"],
            "unknown split 'dev'",
        ),
        (
            &["--data", "easy-vqa", "--image-folder", "imgs"],
            "--image-folder applies to LLaVA data, not easy-VQA",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (args, expected) in cases {
        let out = dir.path().join("run");
        let argv = [&["train", "--data", "shapes", "--device", "cpu"][..], args].concat();
        let mut o = Wrap::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{args:?} must parse, then be refused: {e}"))
            .t;
        o.out = Some(out.clone());
        let err = train::trainer::train(&o).err().map(|e| e.to_string());
        let err = err.unwrap_or_else(|| panic!("{args:?} was accepted"));
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(
            !out.exists(),
            "{args:?}: the run wrote {} before refusing",
            out.display()
        );
    }
}

#[test]
fn an_out_that_would_replace_an_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    std::fs::create_dir_all(out.join("final")).unwrap();
    std::fs::write(out.join("final/tokenizer.json"), "{}").unwrap();
    let mut o = Wrap::parse_from(["train", "--data", "shapes", "--device", "cpu"]).t;
    o.out = Some(out.clone());
    o.tokenizer = Some(out.join("final/tokenizer.json"));
    let err = train::trainer::train(&o).err().unwrap().to_string();
    assert!(
        err.contains("holds the input") && err.contains("tokenizer.json"),
        "{err}"
    );
    assert!(!out.join("checkpoints").exists());
}
