//! Activation quantization, as fairseq's `ActivationQuantizer` does it: in training, a fraction `p`
//! of the outputs (all of them with the default `p = 1`) is replaced by its int-N fake-quantized
//! value with a straight-through gradient (1 where the rounded code lies inside the grid, 0 where it
//! is clamped), and the rest is clamped to the grid's range; in eval every output is fake-quantized,
//! which is what an int-N deployment computes. The range is a running min/max (exponential moving
//! average over training batches).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_train::{ActQuant, ActQuantConfig};
//! let q = ActQuant::new(ActQuantConfig { bits: 4, ..Default::default() })?;
//! let x = Tensor::new(&[[-1f32, -0.3, 0.2, 1.0]], &Device::Cpu)?;
//! let y = q.forward_t(&x, true, 0)?; // observes [-1, 1] and snaps to its 16-level grid
//! let v = y.flatten_all()?.to_vec1::<f32>()?;
//! assert!(v.iter().zip([-1f32, -0.3, 0.2, 1.0]).all(|(a, b)| (a - b).abs() <= 2.0 / 15.0));
//! # Ok::<(), qn_train::Error>(())
//! ```

use std::sync::Mutex;

use candle_core::{DType, Tensor};
use qn_kernels::noise::straight_through_gate;
use qn_kernels::scalar::{fake_quantize, observe_range, ParamView, QParams, ScalarConfig};
use rand::{Rng, SeedableRng};

use crate::Result;

/// Settings of an activation quantizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActQuantConfig {
    /// Bits of the grid (2..=8).
    pub bits: u8,
    /// Weight of the running range in its exponential moving average (0: last batch only).
    pub momentum: f64,
    /// Fraction of the outputs fake-quantized in training (the rest is clamped).
    pub p: f64,
}

impl Default for ActQuantConfig {
    fn default() -> Self {
        Self {
            bits: 8,
            momentum: 0.9,
            p: 1.0,
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
        if !(0.0..=1.0).contains(&config.p) || !(0.0..=1.0).contains(&config.momentum) {
            return Err(crate::Error::config(
                "activation quantization",
                format!(
                    "p = {} and momentum = {} must both lie in [0, 1]",
                    config.p, config.momentum
                ),
            ));
        }
        Ok(Self {
            config,
            range: Mutex::new(None),
        })
    }

    /// The observed range, if any.
    pub fn range(&self) -> Option<(f32, f32)> {
        *self.range.lock().expect("range lock")
    }

    fn params(&self, lo: f32, hi: f32, x: &Tensor) -> Result<QParams> {
        let cfg = ScalarConfig::new(self.config.bits)?;
        let view = ParamView::new("activation", x.dims(), cfg.granularity)?;
        observe_range(&[lo], &[hi], view, &cfg, x.device()).map_err(crate::Error::from)
    }

    /// Training: updates the range, then fake-quantizes a fraction `p` of `x` (drawn from `seed`)
    /// with a straight-through gradient and clamps the rest. Eval: fake-quantizes all of `x` to the
    /// range's grid (identity before any training pass).
    pub fn forward_t(&self, x: &Tensor, train: bool, seed: u64) -> Result<Tensor> {
        if !train {
            let Some((lo, hi)) = self.range() else {
                return Ok(x.clone());
            };
            return Ok(fake_quantize(x, &self.params(lo, hi, x)?)?.to_dtype(x.dtype())?);
        }
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
        let params = self.params(lo, hi, x)?;
        let q = fake_quantize(x, &params)?.to_dtype(x.dtype())?;
        let gate = straight_through_gate(x, &params)?;
        let gated = x.mul(&gate)?;
        // Value `q`, gradient `gate`: `gated - gated.detach()` is exactly zero.
        let noised = ((&gated - gated.detach())? + q.detach())?;
        if self.config.p >= 1.0 {
            return Ok(noised);
        }
        let (clo, chi) = params.clamp_range()?;
        let clamped = x.clamp(
            clo.flatten_all()?.to_vec1::<f32>()?[0],
            chi.flatten_all()?.to_vec1::<f32>()?[0],
        )?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let flags: Vec<u8> = (0..x.elem_count())
            .map(|_| (rng.random::<f64>() < self.config.p) as u8)
            .collect();
        let mask = Tensor::from_vec(flags, x.dims(), x.device())?;
        Ok(mask.where_cond(&noised, &clamped)?)
    }
}
