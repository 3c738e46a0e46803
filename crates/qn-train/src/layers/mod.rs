//! Quant-noise layers: `QLinear`, `QEmbedding`, `QConv2d`, built like candle's layers (a plain
//! struct, a constructor taking a `VarBuilder`, `ModuleT`) and sharing [`QuantNoiseLayer`].

mod conv2d;
mod embedding;
mod linear;

pub use conv2d::{qconv2d, QConv2d};
pub use embedding::{qembedding, QEmbedding};
pub use linear::{qlinear, QLinear};

use candle_core::Var;
use qn_kernels::pq::{KMeansConfig, PqCodes};

use crate::{noise::NoiseConfig, pq_weight::CentroidGrad, qweight::QWeight, Result};

/// What every quant-noise layer offers to the model-level helpers and the iPQ stages.
pub trait QuantNoiseLayer {
    /// The layer's weight.
    fn qweight(&self) -> &QWeight;
    /// The layer's weight, mutably (to swap it to PQ).
    fn qweight_mut(&mut self) -> &mut QWeight;
    /// Trainable variables other than the weight (the bias).
    fn other_vars(&self) -> Vec<Var>;

    /// The layer's name.
    fn name(&self) -> &str {
        self.qweight().name()
    }
    /// Sets the layer's training noise (checked against the layer first).
    fn set_noise(&self, config: NoiseConfig, seed: u64) -> Result<()> {
        self.qweight().set_noise(config, seed)
    }
    /// Every trainable variable: weight or centroids, then the others.
    fn vars(&self) -> Vec<Var> {
        let mut v = self.qweight().vars();
        v.extend(self.other_vars());
        v
    }
    /// Swaps the weight to PQ codes.
    fn quantize_pq(
        &mut self,
        block_size: usize,
        kmeans: &KMeansConfig,
        reduction: CentroidGrad,
    ) -> Result<PqCodes> {
        self.qweight_mut()
            .quantize_pq(block_size, kmeans, reduction)
    }
}
