//! Noise configuration of a layer, switchable at run time, and the per-layer state it needs.

use qn_kernels::{
    layout::BlockLayout,
    noise::{block_drop, pq_noise, scalar_noise, BlockMask, NoiseRate},
    pq::{encode, KMeansConfig, PqCodes},
    scalar::{observe, Granularity, ObserverKind, QParams, ScalarConfig},
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use candle_core::Tensor;

use crate::Result;

/// What distortion a layer's weight receives in training mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoiseConfig {
    /// Ordinary training.
    None,
    /// Blocks dropped with probability `p`, kept ones scaled by `1/(1-p)` (the paper's PQ proxy).
    BlockDrop {
        /// Drop probability.
        p: f64,
        /// Elements per block (see [`BlockLayout`]).
        block_size: usize,
    },
    /// Blocks replaced by their nearest centroid with probability `p` (the paper's exact φ_PQ); the
    /// centroids are re-learned from the current weight every `update_every` training steps.
    Pq {
        /// Noise probability.
        p: f64,
        /// Elements per block.
        block_size: usize,
        /// Number of centroids.
        n_centroids: usize,
        /// Training steps between k-means refreshes.
        update_every: usize,
    },
    /// Elements (or blocks, with `block_size > 1`) replaced by their int-N value with probability
    /// `p`; the quantization parameters are re-observed every `update_every` steps. `p = 1` is
    /// ordinary quantization-aware training.
    Scalar {
        /// Bits.
        bits: u8,
        /// Noise probability.
        p: f64,
        /// 1 for per-element noise, more for blocks.
        block_size: usize,
        /// Range observer.
        observer: ObserverKind,
        /// Parameter granularity.
        granularity: Granularity,
        /// Training steps between observations.
        update_every: usize,
    },
}

/// One noise of a layer's chain, with its cached quantizers.
#[derive(Debug)]
struct NoiseStage {
    config: NoiseConfig,
    codes: Option<PqCodes>,
    params: Option<QParams>,
}

/// The mutable part of a layer's noise: the chain of noises (applied in order, each to the previous
/// one's output, e.g. scalar noise then block drop), the seed and the step count.
#[derive(Debug)]
pub(crate) struct NoiseState {
    stages: Vec<NoiseStage>,
    seed: u64,
    step: u64,
}

impl NoiseState {
    pub(crate) fn new(config: NoiseConfig, seed: u64) -> Self {
        let mut s = Self {
            stages: Vec::new(),
            seed,
            step: 0,
        };
        s.push(config);
        s
    }

    /// Appends a noise to the chain (`None` is ignored).
    pub(crate) fn push(&mut self, config: NoiseConfig) {
        if config != NoiseConfig::None {
            self.stages.push(NoiseStage {
                config,
                codes: None,
                params: None,
            });
        }
    }

    /// The chain, first applied first (empty: no noise).
    pub(crate) fn configs(&self) -> Vec<NoiseConfig> {
        self.stages.iter().map(|s| s.config).collect()
    }

    /// Continues from training step `step` (after a resume). Masks depend only on the seed and the
    /// step, so a resumed run draws exactly the masks of an uninterrupted one; cached PQ centroids and
    /// scalar ranges are re-derived from the current weight at the next forward pass.
    pub(crate) fn set_step(&mut self, step: u64) {
        self.step = step;
        for s in &mut self.stages {
            s.codes = None;
            s.params = None;
        }
    }

    /// Training steps seen (forward passes in training mode).
    pub(crate) fn step(&self) -> u64 {
        self.step
    }

    /// When the chain is exactly one block drop: advances the step like [`Self::apply`] and returns
    /// the mask it would have drawn, so that a layer can fuse the drop into its matmul.
    pub(crate) fn take_block_drop(
        &mut self,
        name: &str,
        layout: &BlockLayout,
    ) -> Result<Option<(BlockMask, NoiseRate)>> {
        let [NoiseStage {
            config: NoiseConfig::BlockDrop { p, block_size },
            ..
        }] = self.stages.as_slice()
        else {
            return Ok(None);
        };
        let (p, block_size) = (*p, *block_size);
        let step = self.step;
        self.step += 1;
        let seed = mask_seed(self.seed, step, 0);
        let layout = layout.with_block_size(name, block_size)?;
        let p = NoiseRate::new(p)?;
        Ok(Some((
            BlockMask::sample(&layout, p, &mut ChaCha8Rng::seed_from_u64(seed)),
            p,
        )))
    }

    /// The noisy weight for one training forward pass; `weight` is never modified.
    pub(crate) fn apply(
        &mut self,
        name: &str,
        weight: &Tensor,
        layout: &BlockLayout,
    ) -> Result<Tensor> {
        let step = self.step;
        self.step += 1;
        let mut w = weight.clone();
        for (i, stage) in self.stages.iter_mut().enumerate() {
            let seed = mask_seed(self.seed, step, i);
            w = stage.apply(name, &w, layout, step, &mut ChaCha8Rng::seed_from_u64(seed))?;
        }
        Ok(w)
    }
}

impl NoiseStage {
    fn apply(
        &mut self,
        name: &str,
        weight: &Tensor,
        layout: &BlockLayout,
        step: u64,
        rng: &mut ChaCha8Rng,
    ) -> Result<Tensor> {
        let refresh = |every: usize| every > 0 && step % every as u64 == 0;
        Ok(match self.config {
            NoiseConfig::None => weight.clone(),
            NoiseConfig::BlockDrop { p, block_size } => {
                let layout = layout.with_block_size(name, block_size)?;
                let p = NoiseRate::new(p)?;
                let mask = BlockMask::sample(&layout, p, rng);
                block_drop(weight, &mask, p)?
            }
            NoiseConfig::Pq {
                p,
                block_size,
                n_centroids,
                update_every,
            } => {
                let layout = layout.with_block_size(name, block_size)?;
                if self.codes.is_none() || refresh(update_every) {
                    let cfg = KMeansConfig::new(n_centroids)
                        .with_iters(10)
                        .with_seed(step);
                    self.codes = Some(encode(&weight.detach(), &layout, &cfg, &mut |_| {})?);
                }
                let mask = BlockMask::sample(&layout, NoiseRate::new(p)?, rng);
                pq_noise(weight, self.codes.as_ref().expect("just set"), &mask)?
            }
            NoiseConfig::Scalar {
                bits,
                p,
                block_size,
                observer,
                granularity,
                update_every,
            } => {
                let layout = layout.with_block_size(name, block_size)?;
                if self.params.is_none() || refresh(update_every) {
                    let cfg = ScalarConfig::new(bits)?
                        .with_observer(observer)
                        .with_granularity(granularity);
                    self.params = Some(observe(&weight.detach(), &cfg)?);
                }
                let mask = BlockMask::sample(&layout, NoiseRate::new(p)?, rng);
                scalar_noise(weight, self.params.as_ref().expect("just set"), &mask)?
            }
        })
    }
}

/// The seed of the masks of chain stage `i` at training step `step`: a function of nothing else, so
/// a resumed run draws the same masks as an uninterrupted one.
fn mask_seed(seed: u64, step: u64, i: usize) -> u64 {
    seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}
