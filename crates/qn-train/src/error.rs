//! The error type of qn-train.

/// Errors of the training layers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A quantizer failed.
    #[error(transparent)]
    Kernels(#[from] qn_kernels::Error),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A layer was configured or used inconsistently.
    #[error("layer `{layer}`: {reason}")]
    Layer {
        /// The layer's name.
        layer: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result alias of qn-train.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(c) => c,
            other => candle_core::Error::Msg(other.to_string()),
        }
    }
}
