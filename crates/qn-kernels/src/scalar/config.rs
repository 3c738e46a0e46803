//! Scalar quantization settings.

use crate::{Error, Result};

/// How the integer grid is placed over the observed range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `scale = (max - min) / (qmax - qmin)`, zero point chosen so that 0.0 is exact.
    Affine,
    /// Zero point fixed at `2^(bits-1)`, `scale = max|x| / (2^(bits-1) - 1)`: `±max|x|` are both on
    /// the grid.
    Symmetric,
}

/// Which elements share one scale and zero point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// One pair for the whole tensor.
    PerTensor,
    /// One pair per index along `axis` (axis 0 = per output channel).
    PerChannel {
        /// The channel axis.
        axis: usize,
    },
    /// One pair per `size` consecutive inputs of each row (the tensor seen as `(shape[0], rest)`).
    PerGroup {
        /// Elements per group; must divide the row length.
        size: usize,
    },
}

/// How the clipping range is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObserverKind {
    /// The exact minimum and maximum (always including 0).
    MinMax,
    /// A histogram of `bins` bins and a greedy shrink of the range minimising L2 error.
    Histogram {
        /// Number of histogram bins (PyTorch uses 2048).
        bins: usize,
    },
}

impl ObserverKind {
    /// The histogram observer with PyTorch's 2048 bins.
    pub const HISTOGRAM: ObserverKind = ObserverKind::Histogram { bins: 2048 };
}

/// Everything that defines a scalar quantizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalarConfig {
    /// Bits per code, 2..=8.
    pub bits: u8,
    /// Grid placement.
    pub scheme: Scheme,
    /// Which elements share parameters.
    pub granularity: Granularity,
    /// How the range is observed.
    pub observer: ObserverKind,
}

impl ScalarConfig {
    /// An affine, per-tensor, min-max quantizer of `bits` bits.
    pub fn new(bits: u8) -> Result<Self> {
        if !(2..=8).contains(&bits) {
            return Err(Error::config("bits", format!("{bits} is outside 2..=8")));
        }
        Ok(Self {
            bits,
            scheme: Scheme::Affine,
            granularity: Granularity::PerTensor,
            observer: ObserverKind::MinMax,
        })
    }

    /// int8, affine, per tensor, min-max.
    pub fn int8() -> Self {
        Self::new(8).expect("8 bits is valid")
    }

    /// int4, affine, per tensor, min-max.
    pub fn int4() -> Self {
        Self::new(4).expect("4 bits is valid")
    }

    /// The same config with another scheme.
    pub fn with_scheme(mut self, scheme: Scheme) -> Self {
        self.scheme = scheme;
        self
    }

    /// The same config with another granularity.
    pub fn with_granularity(mut self, granularity: Granularity) -> Self {
        self.granularity = granularity;
        self
    }

    /// The same config with another observer.
    pub fn with_observer(mut self, observer: ObserverKind) -> Self {
        self.observer = observer;
        self
    }

    /// Smallest code (always 0).
    pub fn qmin(&self) -> i32 {
        0
    }

    /// Largest code, `2^bits - 1`.
    pub fn qmax(&self) -> i32 {
        (1i32 << self.bits) - 1
    }

    /// Checks bits, observer bins and group size.
    pub fn validate(&self) -> Result<()> {
        Self::new(self.bits)?;
        if let ObserverKind::Histogram { bins } = self.observer {
            if !(16..=1 << 16).contains(&bins) {
                return Err(Error::config(
                    "histogram bins",
                    format!("{bins} is outside 16..=65536"),
                ));
            }
        }
        if let Granularity::PerGroup { size: 0 } = self.granularity {
            return Err(Error::config("group size", "must be at least 1"));
        }
        Ok(())
    }
}

impl From<Granularity> for qn_format::header::Granularity {
    fn from(g: Granularity) -> Self {
        match g {
            Granularity::PerTensor => Self::PerTensor,
            Granularity::PerChannel { axis } => Self::PerChannel { axis },
            Granularity::PerGroup { size } => Self::PerGroup { size },
        }
    }
}

impl From<Scheme> for qn_format::header::Scheme {
    fn from(s: Scheme) -> Self {
        match s {
            Scheme::Affine => Self::Affine,
            Scheme::Symmetric => Self::Symmetric,
        }
    }
}

impl From<qn_format::header::Granularity> for Granularity {
    fn from(g: qn_format::header::Granularity) -> Self {
        match g {
            qn_format::header::Granularity::PerTensor => Self::PerTensor,
            qn_format::header::Granularity::PerChannel { axis } => Self::PerChannel { axis },
            qn_format::header::Granularity::PerGroup { size } => Self::PerGroup { size },
        }
    }
}

impl From<qn_format::header::Scheme> for Scheme {
    fn from(s: qn_format::header::Scheme) -> Self {
        match s {
            qn_format::header::Scheme::Affine => Self::Affine,
            qn_format::header::Scheme::Symmetric => Self::Symmetric,
        }
    }
}
