//! Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling.

use rand::Rng as _;
use tensor::Rng;

/// How tokens are picked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (ties: the lowest id).
    Greedy,
    /// Sample from softmax(logits / temperature), restricted to the smallest set of most
    /// likely tokens whose probability reaches `top_p`.
    TopP {
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Nucleus mass in (0, 1].
        top_p: f64,
    },
}

/// Picks a token id from `logits` (one row, the vocabulary).
pub fn pick(logits: &[f32], sampling: Sampling, rng: &mut Rng) -> u32 {
    match sampling {
        Sampling::Greedy => argmax(logits),
        Sampling::TopP { temperature, top_p } => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let mut probs: Vec<(u32, f64)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, ((l as f64 - max) / temperature).exp()))
                .collect();
            let total: f64 = probs.iter().map(|p| p.1).sum();
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut kept = 0.0;
            let mut cut = probs.len();
            for (i, p) in probs.iter().enumerate() {
                kept += p.1 / total;
                if kept >= top_p {
                    cut = i + 1;
                    break;
                }
            }
            let nucleus = &probs[..cut];
            let mass: f64 = nucleus.iter().map(|p| p.1).sum();
            let mut r = rng.gen_range(0.0..mass);
            for &(id, p) in nucleus {
                if r < p {
                    return id;
                }
                r -= p;
            }
            nucleus[nucleus.len() - 1].0
        }
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::{pick, Sampling};
    use tensor::seeded_rng;

    #[test]
    fn greedy_and_a_tight_nucleus_take_the_best_token() {
        let logits = [0.1f32, 3.0, 2.9, -1.0];
        let mut rng = seeded_rng(0);
        assert_eq!(pick(&logits, Sampling::Greedy, &mut rng), 1);
        let tight = Sampling::TopP {
            temperature: 1.0,
            top_p: 1e-6,
        };
        assert!((0..50).all(|_| pick(&logits, tight, &mut rng) == 1));
    }

    #[test]
    fn sampling_follows_the_probabilities() {
        let logits = [0.0f32, (3.0f32).ln()];
        let mut rng = seeded_rng(1);
        let s = Sampling::TopP {
            temperature: 1.0,
            top_p: 1.0,
        };
        let ones = (0..4000).filter(|_| pick(&logits, s, &mut rng) == 1).count();
        assert!((ones as f64 / 4000.0 - 0.75).abs() < 0.03, "{ones}");
    }
}
