//! The error type of the `emma` crate's data handling: tokenizers, chat prompts and images.
//!
//! New kinds of failure get their own variant; each names the file, token or input at fault.

use std::path::PathBuf;

/// What went wrong while loading, training or using a tokenizer, building a prompt or reading an
/// image.
#[derive(Debug, thiserror::Error)]
pub enum EmmaError {
    /// A tensor op failed.
    #[error(transparent)]
    Tensor(#[from] tensor::TensorError),
    /// A layer of the model failed (a shape it cannot take, a missing parameter).
    #[error(transparent)]
    Nn(#[from] nn::NnError),
    /// Reading or writing a file failed.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A tokenizer is malformed, lacks a token EMMA needs, or cannot encode or decode an input.
    #[error("tokenizer {source_name}: {detail}")]
    Tokenizer {
        /// Where the tokenizer came from: its file, or the built-in corpus.
        source_name: String,
        /// What is wrong.
        detail: String,
    },
    /// A preset name that is not one of [`crate::config::PRESETS`].
    #[error("unknown preset '{name}' (known: {known})", known = crate::config::PRESETS.join(", "))]
    UnknownPreset {
        /// The name asked for.
        name: String,
    },
    /// A conversation cannot be turned into a prompt.
    #[error("conversation: {0}")]
    Prompt(String),
    /// A picture (a PNG the crate draws) cannot be drawn or written.
    #[error("picture {path}: {detail}", path = path.display())]
    Picture {
        /// The file being drawn.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// An image cannot be decoded, has no pixels, or cannot be preprocessed as asked.
    #[error("image {source_name}: {detail}")]
    Image {
        /// Where the image came from: its file, or a description of the in-memory buffer.
        source_name: String,
        /// What is wrong.
        detail: String,
    },
}

/// Result alias for the `emma` crate's data handling.
pub type Result<T> = std::result::Result<T, EmmaError>;

/// An [`EmmaError::Io`] for `path`, to pass to `map_err`.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> EmmaError {
    let path = path.into();
    move |source| EmmaError::Io { path, source }
}
