//! Which blocks of a weight are noised on one forward pass.

use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::{layout::BlockLayout, Error, Result};

/// A noise probability in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct NoiseRate(f64);

impl NoiseRate {
    /// Validates `p`.
    pub fn new(p: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::config(
                "noise rate",
                format!("p = {p} is outside [0, 1]"),
            ));
        }
        Ok(Self(p))
    }

    /// The probability.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// One Bernoulli draw per block of a [`BlockLayout`]: `true` = noised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMask {
    layout: BlockLayout,
    /// Row-major `(rows, blocks_per_row)`.
    noised: Vec<bool>,
}

impl BlockMask {
    /// Draws each block independently with probability `p`.
    pub fn sample(layout: &BlockLayout, p: NoiseRate, rng: &mut impl Rng) -> Self {
        // One 32-bit draw per block against a fixed-point threshold (half the generator output of
        // an f64 draw; P(noised) = threshold / 2^32, exact to 2^-32).
        let threshold = (p.get() * 4_294_967_296.0) as u64;
        let noised = (0..layout.n_blocks())
            .map(|_| (rng.next_u32() as u64) < threshold)
            .collect();
        Self {
            layout: layout.clone(),
            noised,
        }
    }

    /// A given mask, row-major `(rows, blocks_per_row)`.
    pub fn from_vec(layout: &BlockLayout, noised: Vec<bool>) -> Result<Self> {
        if noised.len() != layout.n_blocks() {
            return Err(Error::shape(
                "mask",
                format!("{} entries for {} blocks", noised.len(), layout.n_blocks()),
            ));
        }
        Ok(Self {
            layout: layout.clone(),
            noised,
        })
    }

    /// The layout the mask was drawn for.
    pub fn layout(&self) -> &BlockLayout {
        &self.layout
    }

    /// Row-major per-block flags.
    pub fn noised(&self) -> &[bool] {
        &self.noised
    }

    /// Fraction of noised blocks.
    pub fn noised_fraction(&self) -> f64 {
        self.noised.iter().filter(|&&b| b).count() as f64 / self.noised.len().max(1) as f64
    }

    /// Per-element values in the weight's row-major order: `noised` inside noised blocks, `kept`
    /// elsewhere.
    pub fn expand<T: Copy>(&self, noised: T, kept: T) -> Vec<T> {
        let bs = self.layout.block_size();
        let mut out = Vec::with_capacity(self.layout.numel());
        for &flag in &self.noised {
            let v = if flag { noised } else { kept };
            out.extend(std::iter::repeat_n(v, bs));
        }
        out
    }

    /// The mask as a weight-shaped tensor holding `noised` / `kept` in `dtype` on `device`. On the
    /// CPU it is expanded in one host pass; elsewhere the per-block values are uploaded and expanded
    /// on the device, so only `1 / block_size` of the weight's size crosses the bus.
    pub fn to_tensor_with(
        &self,
        noised: f32,
        kept: f32,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = self.layout.shape();
        let t = if device.is_cpu() {
            Tensor::from_vec(self.expand(noised, kept), shape, device)?
        } else {
            let per_block: Vec<f32> = self
                .noised
                .iter()
                .map(|&b| if b { noised } else { kept })
                .collect();
            let per_block = Tensor::from_vec(
                per_block,
                (self.layout.rows(), self.layout.blocks_per_row()),
                device,
            )?;
            self.layout.expand_block_values(&per_block)?
        };
        Ok(if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        })
    }

    /// The mask expanded to the weight's shape (1 = noised) in `dtype` on `device`.
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        if dtype == DType::U8 && device.is_cpu() {
            return Ok(Tensor::from_vec(
                self.expand(1u8, 0u8),
                self.layout.shape(),
                device,
            )?);
        }
        self.to_tensor_with(1.0, 0.0, dtype, device)
    }
}
