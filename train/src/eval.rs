//! Answer accuracy on held-out examples: the model answers the last question of each
//! conversation by greedy generation, and the answer counts when it equals the reference after
//! normalisation. The baseline is the best constant answer: the most common reference answer of
//! the same examples, given to every question.

use crate::data::Dataset;
use crate::error::{Result, TrainError};
use emma::generate::{generate, GenerateOptions};
use emma::model::Emma;
use emma::prompt::Conversation;
use emma::sampling::Sampling;
use emma::tokenizer::Tokenizer;
use indicatif::ProgressBar;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// The answers of one question type.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TypeScore {
    /// Answers equal to the reference.
    pub correct: usize,
    /// Questions of this type.
    pub examples: usize,
    /// The most common reference answer of this type.
    pub majority_answer: String,
    /// How many references of this type equal it.
    pub majority_count: usize,
}

impl TypeScore {
    /// `correct / examples`.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.examples.max(1) as f64
    }

    /// The accuracy of always giving this type's majority answer.
    pub fn majority_accuracy(&self) -> f64 {
        self.majority_count as f64 / self.examples.max(1) as f64
    }
}

/// The outcome of an evaluation.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// What was evaluated.
    pub data: String,
    /// Examples evaluated.
    pub examples: usize,
    /// Answers equal to the reference.
    pub correct: usize,
    /// The most common reference answer (normalised).
    pub majority_answer: String,
    /// How many references equal it.
    pub majority_count: usize,
    /// A few `(question, reference, answer)` triples, for a look.
    pub samples: Vec<(String, String, String)>,
    /// Scores by question type (the data set's own types, else the question's first two words).
    pub by_type: BTreeMap<String, TypeScore>,
    /// Every answer, in the data set's order (written by [`EvalReport::save_answers`], not into
    /// the report).
    #[serde(skip)]
    pub answers: Vec<Answered>,
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

    /// The accuracy of the best constant answer per question type: what a model that reads the
    /// question's type but not the image can reach.
    pub fn type_majority_accuracy(&self) -> f64 {
        let count: usize = self.by_type.values().map(|t| t.majority_count).sum();
        count as f64 / self.examples.max(1) as f64
    }

    /// One line per question type: `  colour: 41/120 (34.2%; majority "red" 15.0%)`.
    pub fn breakdown(&self) -> String {
        self.by_type
            .iter()
            .map(|(k, t)| {
                format!(
                    "  {k}: {}/{} ({:.1}%; majority \"{}\" {:.1}%)\n",
                    t.correct,
                    t.examples,
                    100.0 * t.accuracy(),
                    t.majority_answer,
                    100.0 * t.majority_accuracy()
                )
            })
            .collect()
    }

    /// The one-line summary `accuracy 83.1% on ... (majority baseline 24.0%: ...)`.
    pub fn summary(&self) -> String {
        format!(
            "accuracy {:.1}% on {} (majority baseline {:.1}%: always \"{}\"; per-question-type \
             majority {:.1}%; {} examples)",
            100.0 * self.accuracy(),
            self.data,
            100.0 * self.majority_accuracy(),
            self.majority_answer,
            100.0 * self.type_majority_accuracy(),
            self.examples
        )
    }

    /// Writes the report as JSON (accuracies included) to `path`, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json_err = |e: serde_json::Error| TrainError::Io {
            path: path.to_owned(),
            source: e.into(),
        };
        let mut v = serde_json::to_value(self).map_err(json_err)?;
        v["accuracy"] = self.accuracy().into();
        v["majority_accuracy"] = self.majority_accuracy().into();
        v["type_majority_accuracy"] = self.type_majority_accuracy().into();
        for (k, t) in &self.by_type {
            v["by_type"][k]["accuracy"] = t.accuracy().into();
            v["by_type"][k]["majority_accuracy"] = t.majority_accuracy().into();
        }
        let bytes = serde_json::to_vec_pretty(&v).map_err(json_err)?;
        emma::fsutil::write_atomic(path, &bytes)?;
        Ok(())
    }

    /// Writes every answer as one JSON line (`question`, `kind`, `want`, `got`, `right`) to
    /// `path`, atomically, for looking at the errors.
    pub fn save_answers(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        for a in &self.answers {
            let mut v = serde_json::to_value(a).map_err(|e| TrainError::Io {
                path: path.to_owned(),
                source: e.into(),
            })?;
            v["right"] = (a.want == a.got).into();
            bytes.extend(v.to_string().into_bytes());
            bytes.push(b'\n');
        }
        emma::fsutil::write_atomic(path, &bytes)?;
        Ok(())
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

/// The most common key of `counts` and its count (ties: the first in order).
fn majority(counts: &BTreeMap<String, usize>) -> (String, usize) {
    counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(k, &n)| (k.clone(), n))
        .unwrap_or_default()
}

/// One answered question.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Answered {
    /// The question as asked.
    pub question: String,
    /// Its type.
    pub kind: String,
    /// The reference answer, normalised.
    pub want: String,
    /// The model's answer, normalised.
    pub got: String,
}

/// Answers the last question of example `i` of `data` by greedy generation.
fn answer(
    model: &Emma,
    tok: &Tokenizer,
    data: &dyn Dataset,
    i: usize,
    opts: &GenerateOptions,
) -> Result<Option<Answered>> {
    let ex = data.get(i)?;
    let mut turns = ex.conversation.turns.clone();
    let Some((question, Some(reference))) = turns.pop() else {
        return Ok(None);
    };
    turns.push((question.clone(), None));
    let conversation = Conversation { turns };
    let out = generate(model, tok, ex.image.as_ref(), &conversation, opts)?;
    let kind = ex.kind.unwrap_or_else(|| {
        normalise(&question.replace("<image>", ""))
            .split(' ')
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    });
    Ok(Some(Answered {
        question,
        kind,
        want: normalise(&reference),
        got: normalise(&out.text),
    }))
}

/// Evaluates `model` on every example of `data` (examples answered in parallel); `progress` (if
/// any) advances per example.
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
    let answered: Vec<Option<Answered>> = (0..data.len())
        .into_par_iter()
        .map(|i| {
            let a = answer(model, tok, data, i, &opts);
            if let Some(p) = progress {
                p.inc(1);
            }
            a
        })
        .collect::<Result<_>>()?;
    let mut correct = 0;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut samples = Vec::new();
    let mut by_type: BTreeMap<String, (usize, usize, BTreeMap<String, usize>)> = BTreeMap::new();
    let answers: Vec<Answered> = answered.into_iter().flatten().collect();
    for a in &answers {
        let right = usize::from(a.want == a.got);
        correct += right;
        let t = by_type.entry(a.kind.clone()).or_default();
        t.0 += right;
        t.1 += 1;
        *t.2.entry(a.want.clone()).or_default() += 1;
        *counts.entry(a.want.clone()).or_default() += 1;
        if samples.len() < 8 {
            samples.push((a.question.clone(), a.want.clone(), a.got.clone()));
        }
    }
    let (majority_answer, majority_count) = majority(&counts);
    Ok(EvalReport {
        data: data.describe(),
        examples: counts.values().sum(),
        correct,
        majority_answer,
        majority_count,
        samples,
        by_type: by_type
            .into_iter()
            .map(|(k, (correct, examples, answers))| {
                let (majority_answer, majority_count) = majority(&answers);
                let score = TypeScore {
                    correct,
                    examples,
                    majority_answer,
                    majority_count,
                };
                (k, score)
            })
            .collect(),
        answers,
    })
}

#[cfg(test)]
mod tests {
    use super::{normalise, Answered, EvalReport};

    #[test]
    fn answers_are_written_one_json_line_each_with_whether_they_are_right() {
        let answered = |want: &str, got: &str| Answered {
            question: format!("is it {want}?"),
            kind: "yes/no".to_owned(),
            want: want.to_owned(),
            got: got.to_owned(),
        };
        let report = EvalReport {
            data: "two questions".to_owned(),
            examples: 2,
            correct: 1,
            majority_answer: "yes".to_owned(),
            majority_count: 1,
            samples: Vec::new(),
            by_type: Default::default(),
            answers: vec![answered("yes", "yes"), answered("no", "yes")],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("answers.jsonl");
        report.save_answers(&path).unwrap();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["right"], true);
        assert_eq!(lines[1]["right"], false);
        assert_eq!(lines[1]["want"], "no");
        assert_eq!(lines[1]["question"], "is it no?");
    }

    #[test]
    fn normalising_ignores_case_punctuation_and_spacing() {
        assert_eq!(normalise("  Dark   Blue. "), "dark blue");
        assert_eq!(normalise("Yes!"), "yes");
        assert_ne!(normalise("two"), normalise("three"));
    }
}
