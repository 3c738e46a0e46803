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
        let noised = (0..layout.n_blocks())
            .map(|_| rng.random::<f64>() < p.get())
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

    /// The mask expanded to the weight's shape (1 = noised) in `dtype` on `device`.
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let flags: Vec<u8> = self.noised.iter().map(|&b| b as u8).collect();
        let per_block = Tensor::from_vec(
            flags,
            (self.layout.rows(), self.layout.blocks_per_row()),
            device,
        )?;
        let per_block = if dtype == DType::U8 {
            per_block
        } else {
            per_block.to_dtype(dtype)?
        };
        self.layout.expand_block_values(&per_block)
    }
}
