//! Activation quantization, as in the paper: clamp to the observed range while training (so the
//! network learns within it), fake-quantize to int-N in eval mode (what deployment computes).

use std::sync::Mutex;

use candle_core::{DType, Tensor};
use qn_kernels::scalar::{fake_quantize, observe_range, ParamView, ScalarConfig};

use crate::Result;

/// Settings of an activation quantizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActQuantConfig {
    /// Bits of the eval-time grid (2..=8).
    pub bits: u8,
    /// Weight of the running range in its exponential moving average (0: last batch only).
    pub momentum: f64,
}

impl Default for ActQuantConfig {
    fn default() -> Self {
        Self {
            bits: 8,
            momentum: 0.9,
        }
    }
}

/// Per-tensor activation quantizer with a running min/max range.
#[derive(Debug)]
pub struct ActQuant {
    config: ActQuantConfig,
    range: Mutex<Option<(f32, f32)>>,
}

impl ActQuant {
    /// A quantizer that has not observed anything yet.
    pub fn new(config: ActQuantConfig) -> Result<Self> {
        ScalarConfig::new(config.bits)?;
        Ok(Self {
            config,
            range: Mutex::new(None),
        })
    }

    /// The observed range, if any.
    pub fn range(&self) -> Option<(f32, f32)> {
        *self.range.lock().expect("range lock")
    }

    /// Training: updates the range and clamps to it (gradient 1 inside, 0 where clamped). Eval:
    /// fake-quantizes to the range's int-N grid (identity before any training pass).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            let xd = x.detach().to_dtype(DType::F32)?;
            let (lo, hi) = (
                xd.min_all()?.to_scalar::<f32>()?,
                xd.max_all()?.to_scalar::<f32>()?,
            );
            let m = self.config.momentum as f32;
            let (lo, hi) = {
                let mut r = self.range.lock().expect("range lock");
                let new = match *r {
                    None => (lo, hi),
                    Some((l, h)) => (m * l + (1.0 - m) * lo, m * h + (1.0 - m) * hi),
                };
                *r = Some(new);
                new
            };
            let inside = x
                .ge(lo as f64)?
                .mul(&x.le(hi as f64)?)?
                .to_dtype(x.dtype())?;
            let gated = x.mul(&inside)?;
            // Value: the clamped input; gradient: `inside`.
            Ok(((&gated - gated.detach())? + x.clamp(lo, hi)?.detach())?)
        } else {
            let Some((lo, hi)) = self.range() else {
                return Ok(x.clone());
            };
            let cfg = ScalarConfig::new(self.config.bits)?;
            let view = ParamView::new("activation", x.dims(), cfg.granularity)?;
            let params = observe_range(&[lo], &[hi], view, &cfg, x.device())?;
            Ok(fake_quantize(x, &params)?.to_dtype(x.dtype())?)
        }
    }
}
