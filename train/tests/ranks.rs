//! Data parallelism and gradient accumulation change how a global batch is split, not what is
//! learned: two ranks with half the micro-batch, and one rank accumulating two halves, reach the
//! weights of one rank taking the whole batch at once (to float rounding). Recomputing the
//! language model's blocks in the backward pass (`--recompute`) changes nothing either.

use std::collections::BTreeMap;
use tensor::Tensor;
use train::options::TrainOptions;

fn options(out: &std::path::Path, ranks: usize, micro: usize, recompute: bool) -> TrainOptions {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        t: TrainOptions,
    }
    let mut o = Wrap::parse_from(["train", "--data", "shapes", "--device", "cpu"]).t;
    o.shapes_train = 64;
    o.shapes_eval = 0;
    o.global_batch = Some(8);
    o.steps = Some(6);
    o.ranks = ranks;
    o.micro_batch = Some(micro);
    o.recompute = recompute;
    o.out = Some(out.to_owned());
    o
}

fn final_weights(ranks: usize, micro: usize, recompute: bool) -> (BTreeMap<String, Tensor>, f64) {
    let dir = tempfile::tempdir().unwrap();
    let summary = train::trainer::train(&options(dir.path(), ranks, micro, recompute)).unwrap();
    let weights = tensor::safetensors::load(summary.final_model.join("model.safetensors")).unwrap();
    (weights, summary.final_loss)
}

#[test]
fn two_ranks_and_accumulation_match_one_rank() {
    let (one, loss_one) = final_weights(1, 8, false);
    let cfg = emma::config::EmmaConfig::preset("tiny").unwrap();
    let start = emma::checkpoint::from_pretrained_parts(&cfg, &Default::default(), 0, false)
        .unwrap()
        .store()
        .tensors();
    for (ranks, micro, recompute) in [(2, 4, false), (1, 4, false), (2, 2, false), (2, 4, true)] {
        let (other, loss) = final_weights(ranks, micro, recompute);
        assert!(
            (loss - loss_one).abs() < 1e-5 * loss_one.abs(),
            "loss {loss} vs {loss_one}"
        );
        let mut moved = 0.0f64;
        let mut diff = 0.0f64;
        for (k, a) in &one {
            let (a, b, s) = (a.to_vec_f64(), other[k].to_vec_f64(), start[k].to_vec_f64());
            for i in 0..a.len() {
                moved += (a[i] - s[i]).powi(2);
                diff += (a[i] - b[i]).powi(2);
            }
        }
        let rel = (diff / moved).sqrt();
        eprintln!(
            "{ranks} rank(s) x micro {micro}, recompute {recompute}: weight change differs by \
             {rel:.2e} (relative)"
        );
        assert!(
            moved > 0.0 && rel < 1e-4,
            "{ranks} ranks x {micro}: relative difference {rel}"
        );
    }
}
