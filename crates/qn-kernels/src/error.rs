//! The one error type of this crate.
//!
//! Every message names what is wrong (the tensor, the field, the value) so that a caller can print it
//! as a one-line diagnostic.

/// Errors returned by the quantizers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed. (Its message is shown, not chained as a source, so that a printed
    /// error chain does not repeat it.)
    #[error("{0}")]
    Candle(candle_core::Error),

    /// A tensor's shape does not fit the requested layout or quantizer.
    #[error("tensor `{tensor}`: {reason}")]
    Shape {
        /// The name of the tensor (or a description when it has none).
        tensor: String,
        /// What does not fit.
        reason: String,
    },

    /// A configuration value is outside its valid range.
    #[error("invalid {field}: {reason}")]
    Config {
        /// The configuration field.
        field: &'static str,
        /// Why the value is rejected.
        reason: String,
    },

    /// The input holds a NaN or an infinity, which no quantizer can represent.
    #[error("tensor `{tensor}` holds a non-finite value at flat index {index}")]
    NonFinite {
        /// The name of the tensor.
        tensor: String,
        /// The first offending flat index.
        index: usize,
    },
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The same error naming `tensor` where it named a placeholder (kernels see anonymous tensors and
    /// call them `weight`): callers put the real name in instead of wrapping the message, so that a
    /// diagnostic names one tensor once.
    pub fn for_tensor(self, tensor: &str) -> Self {
        match self {
            Error::Shape { reason, .. } => Error::Shape {
                tensor: tensor.to_string(),
                reason,
            },
            Error::NonFinite { index, .. } => Error::NonFinite {
                tensor: tensor.to_string(),
                index,
            },
            other => other,
        }
    }

    pub(crate) fn shape(tensor: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Shape {
            tensor: tensor.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            field,
            reason: reason.into(),
        }
    }
}

/// Checks that every value is finite, naming the tensor and the first bad index otherwise.
pub(crate) fn ensure_finite(tensor: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite {
            tensor: tensor.to_string(),
            index,
        }),
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}
