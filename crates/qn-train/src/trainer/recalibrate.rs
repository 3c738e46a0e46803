//! Buffers (batch-norm running statistics) re-estimated without noise at the end of a noisy stage.
//!
//! Running statistics accumulate during training, so after a stage with block drop they describe
//! noised activations (a tenth of the blocks zeroed, the rest scaled by 1/0.9), while evaluation
//! and the exported model run without noise. On EfficientNet-Lite0 that cost more than half of the
//! noise model's accuracy gap (BENCHMARKS.md); re-estimating the statistics with the noise off
//! recovers it. A network trained from scratch needs the same after any stage
//! (`TrainConfig::recalibrate_always`): with momentum 0.01 its statistics still carry its first
//! steps' activations. Weights do not change: there is no backward.

use candle_core::Tensor;

use super::TrainConfig;
use crate::data::Dataset;
use crate::{NoiseStep, QuantModel, Result};

/// Batch-index offset of the recalibration batches, away from the training batches of any run
/// length so that they do not repeat the last steps' batches.
const FIRST_BATCH: usize = 1 << 30;

/// Runs `cfg.recalibrate_batches` noise-free training-mode forward passes when the model has
/// buffers and some layer has noise (or `cfg.recalibrate_always`); returns whether it did. Each
/// layer's noise (with its caches) is set aside and put back, so later stages see it unchanged.
pub(crate) fn recalibrate(
    model: &dyn QuantModel,
    train: &Dataset,
    cfg: &TrainConfig,
    global_step: usize,
) -> Result<bool> {
    if cfg.recalibrate_batches == 0 || model.buffers().is_empty() {
        return Ok(false);
    }
    let layers = model.layers();
    if !cfg.recalibrate_always && layers.iter().all(|l| l.qweight().noises().is_empty()) {
        return Ok(false);
    }
    let saved: Vec<_> = layers.iter().map(|l| l.qweight().take_noise()).collect();
    let run = || -> Result<()> {
        for b in 0..cfg.recalibrate_batches {
            model.set_step(NoiseStep {
                step: (global_step + b) as u64,
                micro: u32::MAX,
            });
            let (x, _) = train.batch(FIRST_BATCH + b, cfg.batch_size, cfg.seed)?;
            let _: Tensor = model.forward_t(&x.detach(), true)?;
        }
        Ok(())
    };
    let result = run();
    for (l, noise) in layers.iter().zip(saved) {
        l.qweight().put_noise(noise);
    }
    result.map(|()| true)
}
