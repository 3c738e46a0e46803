//! The crate's error type: every message names the file, tensor, field or hub id it is about.

use std::path::Path;

/// What went wrong loading, tokenizing or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("file `{path}`: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A configuration field is missing, malformed or unsupported.
    #[error("{file}: field `{field}`: {reason}")]
    Config {
        /// The configuration file (or `--option`).
        file: String,
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
    /// Weights are missing, unexpected or mis-shaped.
    #[error("weights `{file}`: {reason}")]
    Weights {
        /// The weight file.
        file: String,
        /// Why (names the tensors).
        reason: String,
    },
    /// A hub id could not be resolved.
    #[error("model `{id}`: {reason}")]
    Hub {
        /// The hub id.
        id: String,
        /// Why (names the cache path).
        reason: String,
    },
    /// A dataset row or label is malformed.
    #[error("dataset `{file}`: {reason}")]
    Dataset {
        /// The data file.
        file: String,
        /// Why (names the line).
        reason: String,
    },
    /// Tokenization failed or the input does not fit the model.
    #[error("input: {0}")]
    Input(String),
    /// From the training layers.
    #[error(transparent)]
    Train(#[from] qn_train::Error),
    /// A tensor operation failed.
    #[error("tensor operation: {0}")]
    Candle(String),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e.to_string())
    }
}

impl Error {
    pub(crate) fn file(path: &Path, reason: impl ToString) -> Self {
        Error::File {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
    pub(crate) fn config(file: &Path, field: &str, reason: impl ToString) -> Self {
        Error::Config {
            file: file.display().to_string(),
            field: field.to_string(),
            reason: reason.to_string(),
        }
    }
    pub(crate) fn weights(file: &Path, reason: impl ToString) -> Self {
        Error::Weights {
            file: file.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
