//! `--precision bf16`: the passes run in bf16 over f32 master weights, and the losses follow the
//! f32 run's within bf16 rounding.

use clap::Parser;
use train::options::TrainOptions;

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    t: TrainOptions,
}

fn first_losses(precision: &str) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Wrap::parse_from(["train", "--data", "shapes", "--device", "cpu"]).t;
    o.shapes_train = 16;
    o.shapes_eval = 0;
    o.global_batch = Some(8);
    o.steps = Some(3);
    o.precision = precision.to_owned();
    o.out = Some(dir.path().to_owned());
    train::trainer::train(&o).unwrap();
    train::metrics::read_metrics(&dir.path().join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|m| m.loss)
        .collect()
}

#[test]
fn bf16_training_follows_f32() {
    let (f32_losses, bf16_losses) = (first_losses("f32"), first_losses("bf16"));
    assert_eq!(bf16_losses.len(), 3);
    for (a, b) in f32_losses.iter().zip(&bf16_losses) {
        assert!(b.is_finite() && ((a - b) / a).abs() < 2e-2, "f32 {a} vs bf16 {b}");
    }
}
