//! Training and evaluation examples and where they come from: easy-VQA ([`crate::easy_vqa`]), the
//! built-in "shapes" set (generated on the fly from a seed) or a LLaVA-format JSON file with an
//! image folder.
//!
//! A LLaVA file is a JSON list of records `{"id", "image"?, "conversations": [{"from": "human",
//! "value": "<image>\n..."}, {"from": "gpt", "value": "..."}, ...]}`: turns alternate, starting
//! with the human and ending with the model; a record without `"image"` is text-only. Every record
//! and every image is checked when the file is loaded (images are decoded, in parallel), so that a
//! bad sample is reported before training starts, with its index, id and path; with
//! `skip_bad_samples` it is counted and left out instead.

use crate::shapes::ShapesConfig;
use emma::prompt::Conversation;
use image::RgbImage;
use rayon::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// An example ready to be batched: its image (none for text-only samples) and conversation.
pub struct Example {
    /// Where the example came from (its record id).
    pub id: String,
    /// The image, if any.
    pub image: Option<RgbImage>,
    /// The conversation; every turn answered.
    pub conversation: Conversation,
    /// The question type the evaluation groups answers by (none: by the question's first words).
    pub kind: Option<String>,
}

/// A data set problem, naming the file, record index, id and image path at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The data file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a JSON list.
    #[error("{}: not a LLaVA JSON list of records: {detail}", path.display())]
    NotAList {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A record or its image is unusable.
    #[error("{}: record {index} (id {id}): {detail}", path.display())]
    BadSample {
        /// The data file.
        path: PathBuf,
        /// The record's position in the list (from 0).
        index: usize,
        /// The record's id, or `?` when it has none.
        id: String,
        /// What is wrong (with the image path when it is the image).
        detail: String,
    },
    /// The data set has no usable examples.
    #[error("{0}: no usable examples")]
    Empty(String),
    /// An image cannot be decoded.
    #[error("{}: {detail} (--skip-bad-samples leaves its questions out)", path.display())]
    BadImage {
        /// The image file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A downloaded file is not the published one.
    #[error("{}: sha256 {got}, expected {expected}; delete it to download it again", path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The published digest.
        expected: String,
        /// The file's digest.
        got: String,
    },
    /// A data set cannot be fetched or is not where it was said to be.
    #[error("{0}")]
    Fetch(String),
}

/// A [`DataError::Read`] for `path`, to pass to `map_err`.
pub(crate) fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError {
    let path = path.to_owned();
    move |source| DataError::Read { path, source }
}

/// A source of examples, indexed from 0.
pub trait Dataset: Send + Sync {
    /// Number of examples.
    fn len(&self) -> usize;
    /// Whether there are no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Example `index` (< `len()`), its image decoded.
    fn get(&self, index: usize) -> Result<Example, DataError>;
    /// What the data set is, for messages.
    fn describe(&self) -> String;
    /// The indices of the open questions (answered by a word other than yes or no) whose type
    /// is one of `kinds` (`colour`, `shape`), when the data set tells question types;
    /// `--open-first` trains on them before the epochs.
    fn open_questions(&self, kinds: &[&str]) -> Option<Vec<usize>> {
        let _ = kinds;
        None
    }
    /// The images with the classes their questions name, when the data set has such labels;
    /// the vision warm-up ([`crate::vision_warmup`]) trains on them.
    fn labelled_images(&self) -> Option<LabelledImages> {
        None
    }
}

/// Images with class labels per label set, for the vision warm-up.
pub struct LabelledImages {
    /// The label sets (`colour`, `shape`), each with its class names in a fixed order.
    pub tasks: Vec<(String, Vec<String>)>,
    /// Every image with its class per label set (`None` where no question names one).
    pub images: Vec<(RgbImage, Vec<Option<usize>>)>,
}

impl LabelledImages {
    /// The same images with only the label sets `names` (in that order), or an error naming the
    /// first unknown one and the known ones.
    pub fn select(self, names: &[&str]) -> Result<LabelledImages, String> {
        let picks: Vec<usize> = names
            .iter()
            .map(|n| {
                self.tasks.iter().position(|(t, _)| t == n).ok_or_else(|| {
                    let known: Vec<&str> = self.tasks.iter().map(|(t, _)| t.as_str()).collect();
                    format!("no label set '{n}' (the data has {})", known.join(", "))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(LabelledImages {
            tasks: picks.iter().map(|&i| self.tasks[i].clone()).collect(),
            images: self
                .images
                .into_iter()
                .map(|(img, labels)| (img, picks.iter().map(|&i| labels[i]).collect()))
                .collect(),
        })
    }
}

/// `count` examples of the shapes set starting at example `first`.
pub struct ShapesData {
    /// The generator.
    pub config: ShapesConfig,
    /// The first example index.
    pub first: u64,
    /// The number of examples.
    pub count: usize,
}

impl Dataset for ShapesData {
    fn len(&self) -> usize {
        self.count
    }

    fn get(&self, index: usize) -> Result<Example, DataError> {
        let ex = self.config.example(self.first + index as u64);
        Ok(Example {
            id: format!("shapes-{}", ex.index),
            image: Some(ex.image),
            conversation: Conversation::single(ex.question, Some(ex.answer)),
            kind: None,
        })
    }

    fn describe(&self) -> String {
        format!(
            "shapes (seed {}, examples {}..{})",
            self.config.seed,
            self.first,
            self.first + self.count as u64
        )
    }
}

/// One checked record of a LLaVA file.
struct Record {
    id: String,
    index: usize,
    image: Option<PathBuf>,
    conversation: Conversation,
}

/// A sample left out by `skip_bad_samples`, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// The record's position in the list.
    pub index: usize,
    /// The full error message.
    pub reason: String,
}

/// A checked LLaVA-format data set.
pub struct LlavaData {
    path: PathBuf,
    records: Vec<Record>,
    /// The records left out as bad (only with `skip_bad_samples`).
    pub skipped: Vec<Skipped>,
    /// Records that load but look wrong (an `<image>` tag missing or repeated): one line each.
    pub notes: Vec<String>,
}

impl LlavaData {
    /// Reads and checks `json` (images relative to `image_folder`, and inside it unless
    /// `images_anywhere`): every record parsed, every image decoded. A bad record or image is an
    /// error, or, with `skip_bad_samples`, left out and listed in [`LlavaData::skipped`].
    pub fn load(
        json: &Path,
        image_folder: &Path,
        skip_bad_samples: bool,
        images_anywhere: bool,
    ) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(json).map_err(read_err(json))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| DataError::NotAList {
            path: json.to_owned(),
            detail: e.to_string(),
        })?;
        let Value::Array(items) = value else {
            return Err(DataError::NotAList {
                path: json.to_owned(),
                detail: "the top level is not a list".to_owned(),
            });
        };
        let checked: Vec<Result<Record, DataError>> = items
            .par_iter()
            .enumerate()
            .map(|(index, item)| check_record(json, (image_folder, images_anywhere), index, item))
            .collect();
        let mut records = Vec::with_capacity(checked.len());
        let mut skipped = Vec::new();
        let notes: Vec<String> = records_notes(json, &items);
        for (index, r) in checked.into_iter().enumerate() {
            match r {
                Ok(rec) => records.push(rec),
                Err(e) if skip_bad_samples => skipped.push(Skipped {
                    index,
                    reason: e.to_string(),
                }),
                Err(e) => return Err(e),
            }
        }
        if records.is_empty() {
            return Err(DataError::Empty(json.display().to_string()));
        }
        Ok(LlavaData {
            path: json.to_owned(),
            records,
            skipped,
            notes,
        })
    }
}

impl Dataset for LlavaData {
    fn len(&self) -> usize {
        self.records.len()
    }

    fn get(&self, index: usize) -> Result<Example, DataError> {
        let r = &self.records[index];
        let image = match &r.image {
            Some(p) => Some(emma::image::load_image(p).map_err(|e| DataError::BadSample {
                path: self.path.clone(),
                index: r.index,
                id: r.id.clone(),
                detail: e.to_string(),
            })?),
            None => None,
        };
        Ok(Example {
            id: r.id.clone(),
            image,
            conversation: r.conversation.clone(),
            kind: None,
        })
    }

    fn describe(&self) -> String {
        format!("{} ({} records)", self.path.display(), self.records.len())
    }
}

/// A line for each record whose `<image>` tags do not match its image: a record with an image
/// whose first message has no tag (the image still goes first), one with more than one tag, or
/// one with a tag and no image (the tag is dropped).
fn records_notes(json: &Path, items: &[Value]) -> Vec<String> {
    let mut notes = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let has_image = matches!(item.get("image"), Some(Value::String(_)));
        let messages: Vec<&str> = item
            .get("conversations")
            .and_then(Value::as_array)
            .map(|turns| turns.iter().filter_map(|t| t.get("value")?.as_str()).collect())
            .unwrap_or_default();
        let tags: usize = messages.iter().map(|m| m.matches("<image>").count()).sum();
        let first_tagged = messages.first().is_some_and(|m| m.contains("<image>"));
        let problem = match (has_image, tags) {
            (true, 0) => "has an image but no <image> tag (the image goes before the first message)",
            (true, 1) if !first_tagged => {
                "has its <image> tag outside the first message (the image goes before it)"
            }
            (_, 2..) => "has more than one <image> tag (one image is used, before the first message)",
            (false, 1..) => "has an <image> tag but no image (the tag is dropped)",
            _ => continue,
        };
        let id = item.get("id").map_or_else(
            || "?".to_owned(),
            |v| v.as_str().map_or_else(|| v.to_string(), str::to_owned),
        );
        notes.push(format!("{} record {index} (id {id}) {problem}", json.display()));
    }
    notes
}

/// Parses record `index` and decodes its image once to check it; the image path must stay inside
/// `folder` unless `anywhere`.
fn check_record(
    json: &Path,
    (folder, anywhere): (&Path, bool),
    index: usize,
    item: &Value,
) -> Result<Record, DataError> {
    let id = item.get("id").map_or_else(
        || "?".to_owned(),
        |v| v.as_str().map_or_else(|| v.to_string(), str::to_owned),
    );
    let bad = |detail: String| DataError::BadSample {
        path: json.to_owned(),
        index,
        id: id.clone(),
        detail,
    };
    if !item.is_object() {
        return Err(bad("not a JSON object".to_owned()));
    }
    let Some(turns) = item.get("conversations").and_then(Value::as_array) else {
        return Err(bad("no \"conversations\" list".to_owned()));
    };
    if turns.is_empty() || turns.len() % 2 != 0 {
        return Err(bad(format!(
            "{} messages; a conversation is one or more human/gpt pairs",
            turns.len()
        )));
    }
    let mut messages = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let expected = if i % 2 == 0 { "human" } else { "gpt" };
        let from = turn.get("from").and_then(Value::as_str);
        let value = turn.get("value").and_then(Value::as_str);
        match (from, value) {
            (Some(_), Some(v)) if emma::prompt::control_token_in(v).is_some() => {
                let token = emma::prompt::control_token_in(v).unwrap_or_default();
                return Err(bad(format!(
                    "message {i} contains the control token {token}, which would end or open a turn"
                )));
            }
            (Some(f), Some(v)) if f == expected => messages.push(v.to_owned()),
            _ => {
                return Err(bad(format!(
                    "message {i} must be {{\"from\": \"{expected}\", \"value\": string}}, got {turn}"
                )))
            }
        }
    }
    let conversation = Conversation {
        turns: messages
            .chunks(2)
            .map(|pair| (pair[0].clone(), Some(pair[1].clone())))
            .collect(),
    };
    let image = match item.get("image") {
        None | Some(Value::Null) => None,
        Some(Value::String(rel)) => {
            let path = if anywhere {
                folder.join(rel)
            } else {
                nn::paths::inside(folder, rel).map_err(|reason| {
                    bad(format!(
                        "image {reason} (--images-anywhere allows images elsewhere)"
                    ))
                })?
            };
            if !path.is_file() {
                return Err(bad(format!("image {} does not exist", path.display())));
            }
            emma::image::load_image(&path).map_err(|e| bad(e.to_string()))?;
            Some(path)
        }
        Some(other) => return Err(bad(format!("\"image\" must be a string, got {other}"))),
    };
    Ok(Record {
        id,
        index,
        image,
        conversation,
    })
}
