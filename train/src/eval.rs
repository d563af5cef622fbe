//! Answer accuracy on held-out examples: the model answers the last question of each
//! conversation by greedy generation, and the answer counts when it equals the reference after
//! normalisation. The baseline is the best constant answer: the most common reference answer of
//! the same examples, given to every question.

use crate::data::Dataset;
use crate::error::Result;
use emma::generate::{generate, GenerateOptions};
use emma::model::Emma;
use emma::prompt::Conversation;
use emma::sampling::Sampling;
use emma::tokenizer::Tokenizer;
use indicatif::ProgressBar;
use std::collections::BTreeMap;

/// The outcome of an evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    /// Examples evaluated (text-only ones included).
    pub examples: usize,
    /// Answers equal to the reference.
    pub correct: usize,
    /// The most common reference answer (normalised).
    pub majority_answer: String,
    /// How many references equal it.
    pub majority_count: usize,
    /// A few `(question, reference, answer)` triples, for a look.
    pub samples: Vec<(String, String, String)>,
    /// `(correct, examples)` by the question's first two words (a rough question type).
    pub by_question_start: BTreeMap<String, (usize, usize)>,
    /// How many questions the best constant answer per question type gets right: what a model
    /// that reads the question but not the image can reach.
    pub type_majority_count: usize,
}

impl EvalReport {
    /// `correct / examples`.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.examples.max(1) as f64
    }

    /// The accuracy of always giving the majority answer.
    pub fn majority_accuracy(&self) -> f64 {
        self.majority_count as f64 / self.examples.max(1) as f64
    }

    /// The accuracy of the best constant answer per question type.
    pub fn type_majority_accuracy(&self) -> f64 {
        self.type_majority_count as f64 / self.examples.max(1) as f64
    }

    /// One line per question start: `  what colour: 41/120 (34.2%)`.
    pub fn breakdown(&self) -> String {
        self.by_question_start
            .iter()
            .map(|(k, (c, n))| {
                format!(
                    "  {k}: {c}/{n} ({:.1}%)\n",
                    100.0 * *c as f64 / (*n).max(1) as f64
                )
            })
            .collect()
    }

    /// The one-line summary `held-out accuracy 83.1% (majority baseline 24.0%)`.
    pub fn summary(&self) -> String {
        format!(
            "held-out accuracy {:.1}% (majority baseline {:.1}%: always \"{}\"; per-question-type \
             majority {:.1}%; {} examples)",
            100.0 * self.accuracy(),
            100.0 * self.majority_accuracy(),
            self.majority_answer,
            100.0 * self.type_majority_accuracy(),
            self.examples
        )
    }
}

/// Lower case, punctuation removed, whitespace collapsed.
pub fn normalise(answer: &str) -> String {
    answer
        .to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Evaluates `model` on every example of `data`; `progress` (if any) advances per example.
pub fn evaluate(
    model: &Emma,
    tok: &Tokenizer,
    data: &dyn Dataset,
    max_new_tokens: usize,
    progress: Option<&ProgressBar>,
) -> Result<EvalReport> {
    let opts = GenerateOptions {
        max_new_tokens,
        sampling: Sampling::Greedy,
        seed: 0,
    };
    let mut correct = 0;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut samples = Vec::new();
    let mut by_question_start: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut answers_by_type: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for i in 0..data.len() {
        let ex = data.get(i)?;
        let mut turns = ex.conversation.turns.clone();
        let Some((question, Some(reference))) = turns.pop() else {
            continue;
        };
        turns.push((question.clone(), None));
        let conversation = Conversation { turns };
        let out = generate(model, tok, ex.image.as_ref(), &conversation, &opts)?;
        let (want, got) = (normalise(&reference), normalise(&out.text));
        correct += usize::from(want == got);
        let start = normalise(&question.replace("<image>", ""))
            .split(' ')
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        *answers_by_type
            .entry(start.clone())
            .or_default()
            .entry(want.clone())
            .or_default() += 1;
        let kind = by_question_start.entry(start).or_default();
        kind.0 += usize::from(want == got);
        kind.1 += 1;
        if samples.len() < 8 {
            samples.push((question, want.clone(), got));
        }
        *counts.entry(want).or_default() += 1;
        if let Some(p) = progress {
            p.inc(1);
        }
    }
    let (majority_answer, majority_count) = counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(k, &n)| (k.clone(), n))
        .unwrap_or_default();
    Ok(EvalReport {
        examples: counts.values().sum(),
        correct,
        majority_answer,
        majority_count,
        samples,
        by_question_start,
        type_majority_count: answers_by_type
            .values()
            .map(|answers| answers.values().max().copied().unwrap_or(0))
            .sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::normalise;

    #[test]
    fn normalising_ignores_case_punctuation_and_spacing() {
        assert_eq!(normalise("  Dark   Blue. "), "dark blue");
        assert_eq!(normalise("Yes!"), "yes");
        assert_ne!(normalise("two"), normalise("three"));
    }
}
