//! The one error type of this crate.

/// Errors of reading or writing `.qnz` files. Every message names the file, tensor or field at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error (shown in the message, so not also chained as a source: a diagnostic that
        /// prints the chain would say it twice).
        source: std::io::Error,
    },
    /// The bytes are not a valid `.qnz` file (truncated, bit-flipped, inconsistent).
    #[error("corrupt .qnz: {0}")]
    Corrupt(String),
    /// The file was written by a newer version of the format.
    #[error("format version {found} is newer than the {supported} this reader understands; upgrade quant-noise-rs")]
    NewerVersion {
        /// Version in the file.
        found: u32,
        /// Newest version this reader reads.
        supported: u32,
    },
    /// A tensor handed to the writer is inconsistent.
    #[error("tensor `{tensor}`: {reason}")]
    Invalid {
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// What [`Reader::open`](crate::Reader::open) reports for a file whose bytes are refused
    /// (corrupt, or a newer version): the path, then the reason.
    #[error("{path}: {error}")]
    InFile {
        /// The file.
        path: String,
        /// Why its bytes were refused (shown in the message, so not also chained as a source).
        error: Box<Error>,
    },
    /// No tensor of that name is in the file.
    #[error("no tensor named `{0}` in the file")]
    NotFound(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
    Error::Corrupt(msg.into())
}
