//! The one textual noise spec of every training command: `none`, `block:p=0.1[,bs=8]`,
//! `pq:p=0.1[,bs=8,k=256,every=100]`, `scalar:bits=8,p=0.5[,bs=1,every=1,observer=minmax|histogram]`.
//! A block size left out is the paper's default for each layer
//! ([`qn_kernels::layout::default_block_size`]).
//!
//! ```
//! use qn_train::NoiseSpec;
//! let spec: NoiseSpec = "block:p=0.1".parse()?;
//! assert_eq!(spec.to_string(), "block:p=0.1");
//! assert!("block:p=1.5".parse::<NoiseSpec>().is_err());
//! # Ok::<(), qn_train::Error>(())
//! ```

use std::fmt;
use std::str::FromStr;

use qn_kernels::{
    layout::{default_block_size, BlockLayout},
    scalar::{Granularity, ObserverKind},
};

use crate::{Error, NoiseConfig, Result};

/// A noise as the user wrote it; [`Self::resolve`] turns it into one layer's [`NoiseConfig`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoiseSpec {
    /// No noise.
    None,
    /// Block drop at rate `p`.
    Block {
        /// Drop probability.
        p: f64,
        /// Block size (`None`: the paper's default per layer).
        bs: Option<usize>,
    },
    /// φ_PQ: blocks snapped to their nearest of `k` centroids at rate `p`.
    Pq {
        /// Noise probability.
        p: f64,
        /// Block size (`None`: the paper's default per layer).
        bs: Option<usize>,
        /// Centroids.
        k: usize,
        /// Steps between k-means refreshes.
        every: usize,
    },
    /// Int-N fake quantization at rate `p`.
    Scalar {
        /// Bits (2..=8).
        bits: u8,
        /// Noise probability.
        p: f64,
        /// Elements per noised block (1: per element).
        bs: usize,
        /// Steps between range observations.
        every: usize,
        /// Range observer.
        observer: ObserverKind,
    },
}

fn bad(spec: &str, reason: impl fmt::Display) -> Error {
    Error::config(
        format!("noise spec `{spec}`"),
        format!(
            "{reason} (use none, block:p=0.1[,bs=8], pq:p=0.1[,bs=8,k=256,every=100] or \
             scalar:bits=8,p=0.5[,bs=1,every=1,observer=minmax])"
        ),
    )
}

impl FromStr for NoiseSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        if spec == "none" {
            return Ok(NoiseSpec::None);
        }
        let (kind, rest) = spec
            .split_once(':')
            .ok_or_else(|| bad(spec, "no `kind:` prefix"))?;
        let mut fields = std::collections::BTreeMap::new();
        for kv in rest.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(spec, format!("`{kv}` is not key=value")))?;
            if fields.insert(k.trim(), v.trim()).is_some() {
                return Err(bad(spec, format!("`{k}` is given twice")));
            }
        }
        let mut take = |key: &str| fields.remove(key);
        let prob = |v: Option<&str>| -> Result<f64> {
            let v = v.ok_or_else(|| bad(spec, "p is missing"))?;
            let p: f64 = v
                .parse()
                .map_err(|_| bad(spec, format!("p = `{v}` is not a number")))?;
            if !(0.0..=1.0).contains(&p) {
                return Err(bad(spec, format!("p = {v} is not a probability in [0, 1]")));
            }
            Ok(p)
        };
        let count = |key: &str, v: Option<&str>, min: usize, max: usize| -> Result<Option<usize>> {
            let Some(v) = v else { return Ok(None) };
            let n: usize = v
                .parse()
                .map_err(|_| bad(spec, format!("{key} = `{v}` is not a whole number")))?;
            if !(min..=max).contains(&n) {
                return Err(bad(spec, format!("{key} = {n} is outside {min}..={max}")));
            }
            Ok(Some(n))
        };
        let out = match kind {
            "block" => NoiseSpec::Block {
                p: prob(take("p"))?,
                bs: count("bs", take("bs"), 1, 1 << 20)?,
            },
            "pq" => NoiseSpec::Pq {
                p: prob(take("p"))?,
                bs: count("bs", take("bs"), 1, 1 << 20)?,
                k: count("k", take("k"), 1, 1 << 16)?.unwrap_or(256),
                every: count("every", take("every"), 1, usize::MAX)?.unwrap_or(100),
            },
            "scalar" => NoiseSpec::Scalar {
                bits: count("bits", take("bits"), 2, 8)?
                    .ok_or_else(|| bad(spec, "bits is missing"))? as u8,
                p: prob(take("p"))?,
                bs: count("bs", take("bs"), 1, 1 << 20)?.unwrap_or(1),
                every: count("every", take("every"), 1, usize::MAX)?.unwrap_or(1),
                observer: match take("observer") {
                    None | Some("minmax") => ObserverKind::MinMax,
                    Some("histogram") => ObserverKind::HISTOGRAM,
                    Some(o) => {
                        return Err(bad(
                            spec,
                            format!("observer `{o}` is not minmax or histogram"),
                        ))
                    }
                },
            },
            other => return Err(bad(spec, format!("`{other}` is not a noise kind"))),
        };
        if let Some(k) = fields.keys().next() {
            return Err(bad(spec, format!("`{k}` is not a field of {kind} noise")));
        }
        Ok(out)
    }
}

impl fmt::Display for NoiseSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bs = |bs: &Option<usize>| bs.map(|b| format!(",bs={b}")).unwrap_or_default();
        match self {
            NoiseSpec::None => write!(f, "none"),
            NoiseSpec::Block { p, bs: b } => write!(f, "block:p={p}{}", bs(b)),
            NoiseSpec::Pq { p, bs: b, k, every } => {
                write!(f, "pq:p={p}{},k={k},every={every}", bs(b))
            }
            NoiseSpec::Scalar {
                bits,
                p,
                bs,
                every,
                observer,
            } => {
                let o = match observer {
                    ObserverKind::MinMax => "minmax",
                    ObserverKind::Histogram { .. } => "histogram",
                };
                write!(
                    f,
                    "scalar:bits={bits},p={p},bs={bs},every={every},observer={o}"
                )
            }
        }
    }
}

impl NoiseSpec {
    /// Why layer `name` gets no noise from this spec although it was selected: φ_PQ needs at
    /// least `k` blocks to fit `k` centroids, and iPQ leaves such a layer float too (the same
    /// rule as `qn compress`'s "stays float" warning). `None` when the noise applies.
    pub fn skip_reason(&self, name: &str, layout: &BlockLayout) -> Option<String> {
        let NoiseSpec::Pq { bs, k, .. } = *self else {
            return None;
        };
        let bs = bs.unwrap_or_else(|| default_block_size(name, layout.kind(), layout.shape()));
        let blocks = layout.with_block_size(name, bs).ok()?.n_blocks();
        (blocks < k).then(|| {
            format!(
                "layer `{name}` gets no PQ noise: its {blocks} blocks of {bs} are fewer than the \
                 {k} centroids (iPQ leaves it float too)"
            )
        })
    }

    /// The noise of layer `name` with weight `layout`: defaults filled in per layer kind, checked
    /// against the layer (a block size that does not fit names the layer). A layer with a
    /// [`Self::skip_reason`] gets [`NoiseConfig::None`].
    pub fn resolve(&self, name: &str, layout: &BlockLayout) -> Result<NoiseConfig> {
        if self.skip_reason(name, layout).is_some() {
            return Ok(NoiseConfig::None);
        }
        let default = || default_block_size(name, layout.kind(), layout.shape());
        let config = match *self {
            NoiseSpec::None => NoiseConfig::None,
            NoiseSpec::Block { p, bs } => NoiseConfig::BlockDrop {
                p,
                block_size: bs.unwrap_or_else(default),
            },
            NoiseSpec::Pq { p, bs, k, every } => NoiseConfig::Pq {
                p,
                block_size: bs.unwrap_or_else(default),
                n_centroids: k,
                update_every: every,
            },
            NoiseSpec::Scalar {
                bits,
                p,
                bs,
                every,
                observer,
            } => NoiseConfig::Scalar {
                bits,
                p,
                block_size: bs,
                observer,
                granularity: Granularity::PerChannel { axis: 0 },
                update_every: every,
            },
        };
        config.validate_for(name, layout)?;
        Ok(config)
    }
}
