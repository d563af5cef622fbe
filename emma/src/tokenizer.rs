//! Text tokenization: a wrapper over Hugging Face's `tokenizers` that loads GPT-NeoX-style
//! `tokenizer.json` files (the tokenizer of the Mamba LMs EMMA builds on) or trains a small
//! byte-level BPE of the same family on a corpus shipped with the crate.

use crate::error::{io_err, EmmaError, Result};
use crate::fsutil::write_atomic;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::{AddedToken, TokenizerImpl};

/// The end-of-text token: it closes every user message and assistant answer and ends generation.
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// The role marker that opens a user message in the chat format.
pub const USER_TOKEN: &str = "<|user|>";
/// The role marker that opens an assistant answer in the chat format.
pub const ASSISTANT_TOKEN: &str = "<|assistant|>";
/// The role marker of a system message.
pub const SYSTEM_TOKEN: &str = "<|system|>";

/// The special tokens of the built-in tokenizer, in id order (ids 0 to 3).
pub const SPECIAL_TOKENS: [&str; 4] = [EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN];

/// The plain English text [`Tokenizer::train_builtin`] learns its merges from.
const BUILTIN_CORPUS: &str = include_str!("../assets/corpus.txt");

/// What [`Tokenizer`] errors name as the source of the built-in tokenizer.
const BUILTIN_NAME: &str = "built-in (trained on emma/assets/corpus.txt)";

/// A byte-level BPE tokenizer with a known end-of-text token.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where the tokenizer came from, for error messages.
    source_name: String,
    eos: u32,
    vocab_size: usize,
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json` (for example GPT-NeoX's, as shipped with the Mamba
    /// LMs). It must define [`EOS_TOKEN`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| EmmaError::Tokenizer {
            source_name: path.display().to_string(),
            detail: format!("not a valid tokenizer.json: {e}"),
        })?;
        Self::new(inner, path.display().to_string())
    }

    /// Trains a byte-level BPE tokenizer (the GPT-NeoX family: NFC normalisation, byte-level
    /// pre-tokenizer, post-processor and decoder) on the small English corpus embedded in the
    /// crate, with the special tokens [`SPECIAL_TOKENS`] at ids 0 to 3 and all 256 bytes in the
    /// base alphabet, so that every string can be encoded.
    ///
    /// `vocab_size` is an upper bound: merges stop when the vocabulary reaches it or when no pair
    /// occurs at least twice in the corpus. It must leave room for the special tokens and the 256
    /// byte tokens. Training is deterministic: the same `vocab_size` always gives the same
    /// vocabulary and merges.
    pub fn train_builtin(vocab_size: usize) -> Result<Self> {
        let base = SPECIAL_TOKENS.len() + 256;
        if vocab_size < base {
            return Err(EmmaError::Tokenizer {
                source_name: BUILTIN_NAME.to_owned(),
                detail: format!(
                    "vocab_size {vocab_size} is too small: the special tokens and bytes alone take {base}"
                ),
            });
        }
        let byte_level = ByteLevel::new(false, true, true);
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(2)
            .special_tokens(
                SPECIAL_TOKENS
                    .iter()
                    .map(|t| AddedToken::from(*t, true))
                    .collect(),
            )
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut tok: TokenizerImpl<BPE, NFC, ByteLevel, ByteLevel, ByteLevel> =
            TokenizerImpl::new(BPE::default());
        tok.with_normalizer(Some(NFC))
            .with_pre_tokenizer(Some(byte_level))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level));
        tok.train(&mut trainer, BUILTIN_CORPUS.lines())
            .map_err(|e| EmmaError::Tokenizer {
                source_name: BUILTIN_NAME.to_owned(),
                detail: format!("training failed: {e}"),
            })?;
        Self::new(tok.into(), BUILTIN_NAME.to_owned())
    }

    /// Wraps a `tokenizers` tokenizer, finding its end-of-text token.
    fn new(inner: tokenizers::Tokenizer, source_name: String) -> Result<Self> {
        let eos = inner.token_to_id(EOS_TOKEN).ok_or_else(|| EmmaError::Tokenizer {
            source_name: source_name.clone(),
            detail: format!("no '{EOS_TOKEN}' token"),
        })?;
        // The chat format's role markers must be single tokens, or prompts would spell them out.
        for marker in [USER_TOKEN, ASSISTANT_TOKEN] {
            if inner.token_to_id(marker).is_none() {
                return Err(EmmaError::Tokenizer {
                    source_name: source_name.clone(),
                    detail: format!("no '{marker}' token, which the chat format needs"),
                });
            }
        }
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1);
        Ok(Tokenizer {
            inner,
            source_name,
            eos,
            vocab_size,
        })
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`, atomically (temporary file,
    /// fsync, rename); [`Tokenizer::from_file`] loads it back.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = self.inner.to_string(true).map_err(|e| EmmaError::Tokenizer {
            source_name: self.source_name.clone(),
            detail: format!("cannot serialize to {}: {e}", path.display()),
        })?;
        write_atomic(path, json.as_bytes())
    }

    /// The token ids of `text`. Special tokens written in the text (such as [`EOS_TOKEN`]) become
    /// their single ids; nothing is added before or after.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| EmmaError::Tokenizer {
                source_name: self.source_name.clone(),
                detail: format!("cannot encode {:?}: {e}", truncate(text)),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included. Ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(EmmaError::Tokenizer {
                source_name: self.source_name.clone(),
                detail: format!(
                    "token id {id} is not in the vocabulary (size {})",
                    self.vocab_size
                ),
            });
        }
        self.inner.decode(ids, false).map_err(|e| EmmaError::Tokenizer {
            source_name: self.source_name.clone(),
            detail: format!("cannot decode {} ids: {e}", ids.len()),
        })
    }

    /// One more than the largest token id: the number of rows an embedding table needs.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Checks that every id this tokenizer can produce is a row of an embedding table of `vocab`
    /// rows.
    pub fn check_fits(&self, vocab: usize) -> Result<()> {
        if self.vocab_size > vocab {
            return Err(EmmaError::Tokenizer {
                source_name: self.source_name.clone(),
                detail: format!(
                    "it has {} tokens but the model's vocabulary has {vocab}",
                    self.vocab_size
                ),
            });
        }
        Ok(())
    }

    /// The id of the end-of-text token [`EOS_TOKEN`].
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The id of `token` (a vocabulary entry in its byte-level form, or a special token), if any.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Where the tokenizer came from: its file, or the built-in corpus.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }
}

/// The start of `text`, short enough for an error message.
fn truncate(text: &str) -> String {
    const MAX: usize = 40;
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn builtin_round_trips_and_knows_special_tokens() {
        let start = Instant::now();
        let tok = Tokenizer::train_builtin(512).unwrap();
        assert!(
            start.elapsed().as_secs_f64() < 2.0,
            "training took {:?}",
            start.elapsed()
        );
        assert!(
            tok.vocab_size() > 256 + 4 && tok.vocab_size() <= 512,
            "{}",
            tok.vocab_size()
        );
        for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_id(t), Some(i as u32), "{t}");
        }
        assert_eq!(tok.eos_id(), 0);
        for text in [
            "How many red circles are to the left of the blue square? 3",
            "Yes",
            "  spaces,\ttabs\nand newlines\n",
            "unseen words: zebra, 日本語, émoji 🎨",
            "",
        ] {
            let ids = tok.encode(text).unwrap();
            assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
        // Corpus words are merged into few tokens; special tokens stay whole.
        assert!(tok.encode(" circle").unwrap().len() <= 2);
        let ids = tok.encode("<|user|>\nyes<|endoftext|>").unwrap();
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&0));
        assert_eq!(tok.decode(&ids).unwrap(), "<|user|>\nyes<|endoftext|>");
    }

    #[test]
    fn builtin_is_deterministic() {
        let a = Tokenizer::train_builtin(400).unwrap();
        for _ in 0..3 {
            let b = Tokenizer::train_builtin(400).unwrap();
            assert_eq!(
                a.inner.to_string(false).unwrap(),
                b.inner.to_string(false).unwrap()
            );
        }
        assert_eq!(a.vocab_size(), 400);
    }

    #[test]
    fn builtin_rejects_tiny_vocab() {
        let err = Tokenizer::train_builtin(100).unwrap_err();
        assert!(err.to_string().contains("vocab_size 100"), "{err}");
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let tok = Tokenizer::train_builtin(400).unwrap();
        tok.save(&path).unwrap();
        let back = Tokenizer::from_file(&path).unwrap();
        assert_eq!(back.vocab_size(), tok.vocab_size());
        assert_eq!(back.eos_id(), tok.eos_id());
        assert_eq!(back.source_name(), path.display().to_string());
        let text = "<|assistant|>\nThe answer is 7.<|endoftext|>";
        assert_eq!(back.encode(text).unwrap(), tok.encode(text).unwrap());
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let err = Tokenizer::from_file(&missing).unwrap_err();
        assert!(matches!(err, EmmaError::Io { .. }) && err.to_string().contains("missing.json"));

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{not json").unwrap();
        let err = Tokenizer::from_file(&bad).unwrap_err();
        assert!(err.to_string().contains("bad.json"), "{err}");

        // A valid tokenizer without the end-of-text token.
        let no_eos = dir.path().join("no_eos.json");
        let plain = tokenizers::Tokenizer::new(BPE::default());
        std::fs::write(&no_eos, plain.to_string(false).unwrap()).unwrap();
        let err = Tokenizer::from_file(&no_eos).unwrap_err();
        assert!(
            err.to_string().contains("no_eos.json") && err.to_string().contains(EOS_TOKEN),
            "{err}"
        );

        // One with the end-of-text token but without the chat format's role markers.
        let no_markers = dir.path().join("no_markers.json");
        let mut eos_only = tokenizers::Tokenizer::new(BPE::default());
        eos_only.add_special_tokens(&[tokenizers::AddedToken::from(EOS_TOKEN, true)]);
        std::fs::write(&no_markers, eos_only.to_string(false).unwrap()).unwrap();
        let err = Tokenizer::from_file(&no_markers).unwrap_err().to_string();
        assert!(
            err.contains("no_markers.json") && err.contains(USER_TOKEN),
            "{err}"
        );
    }

    #[test]
    fn decode_rejects_unknown_ids() {
        let tok = Tokenizer::train_builtin(300).unwrap();
        let err = tok.decode(&[0, 5000]).unwrap_err();
        assert!(err.to_string().contains("5000"), "{err}");
    }
}
