//! The error type of qn-train. Each variant names what is at fault — a layer, a file, a dataset, a
//! setting, a checkpoint — so that a caller can print it as one line.

/// Errors of the training layers and the trainer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A quantizer failed.
    #[error(transparent)]
    Kernels(#[from] qn_kernels::Error),
    /// A tensor operation failed. (Its message is shown, not chained as a source, so that a printed
    /// error chain does not repeat it.)
    #[error("{0}")]
    Candle(candle_core::Error),
    /// A layer was configured or used inconsistently.
    #[error("layer `{layer}`: {reason}")]
    Layer {
        /// The layer's name.
        layer: String,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read or written, or is not what it should be.
    #[error("file {path}: {reason}")]
    File {
        /// The file or directory.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A dataset is malformed or does not fit the model.
    #[error("dataset {dataset}: {reason}")]
    Dataset {
        /// The dataset (its path or name).
        dataset: String,
        /// What is wrong.
        reason: String,
    },
    /// A setting (a training option, a stage-plan field, a noise spec) is out of range.
    #[error("{field}: {reason}")]
    Config {
        /// The setting, as the user wrote it (`batch_size`, `stage "ffn": steps`, ...).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint cannot be resumed by this run.
    #[error("checkpoint in {dir}: {reason}")]
    Checkpoint {
        /// The run directory.
        dir: String,
        /// Why it cannot be resumed.
        reason: String,
    },
}

/// Result alias of qn-train.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn file(path: &std::path::Path, reason: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn dataset(dataset: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Dataset {
            dataset: dataset.into(),
            reason: reason.into(),
        }
    }
}

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(c) => c,
            // `Msg` displays as the message alone, so the text is not repeated when printed.
            other => candle_core::Error::Msg(other.to_string()),
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}
