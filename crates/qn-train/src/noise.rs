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

impl NoiseConfig {
    /// The noise probability (0 for `None`).
    pub fn rate(&self) -> f64 {
        match *self {
            NoiseConfig::None => 0.0,
            NoiseConfig::BlockDrop { p, .. }
            | NoiseConfig::Pq { p, .. }
            | NoiseConfig::Scalar { p, .. } => p,
        }
    }

    /// Checks the settings and that the block size fits the layer `name` of `layout` (whole kernels
    /// for a k x k conv, a divisor of the input channels for a 1x1 conv), naming what is wrong.
    pub fn validate_for(&self, name: &str, layout: &BlockLayout) -> Result<()> {
        let p = self.rate();
        if !(0.0..=1.0).contains(&p) {
            return Err(crate::Error::config(
                "noise p",
                format!("{p} is not a probability in [0, 1]"),
            ));
        }
        let block_size = match *self {
            NoiseConfig::None => return Ok(()),
            NoiseConfig::BlockDrop { block_size, .. } => block_size,
            NoiseConfig::Pq {
                block_size,
                n_centroids,
                ..
            } => {
                if !(1..=1 << 16).contains(&n_centroids) {
                    return Err(crate::Error::config(
                        "noise k",
                        format!("{n_centroids} centroids is outside 1..=65536"),
                    ));
                }
                block_size
            }
            NoiseConfig::Scalar {
                bits,
                block_size,
                observer,
                granularity,
                ..
            } => {
                let cfg = ScalarConfig::new(bits)?
                    .with_observer(observer)
                    .with_granularity(granularity);
                qn_kernels::scalar::ParamView::new(name, layout.shape(), cfg.granularity)?;
                block_size
            }
        };
        layout.with_block_size(name, block_size)?;
        Ok(())
    }
}

/// One noise of a layer's chain, with its cached quantizers.
#[derive(Debug)]
struct NoiseStage {
    config: NoiseConfig,
    /// Cached PQ codes / scalar parameters and the refresh interval (`step / update_every`) they
    /// were computed for.
    codes: Option<(u64, PqCodes)>,
    params: Option<(u64, QParams)>,
}

/// Where the run stands, as the trainer tells a layer: masks are a function of (layer seed, global
/// optimizer step, micro-batch index, position in the chain) and of nothing else, so weight tying,
/// an extra forward pass or gradient accumulation never shift a later mask, and a resumed run draws
/// exactly the masks of an uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NoiseStep {
    /// Global optimizer step.
    pub step: u64,
    /// Micro-batch within the step (gradient accumulation).
    pub micro: u32,
}

/// The mutable part of a layer's noise: the chain of noises (applied in order, each to the previous
/// one's output, e.g. scalar noise then block drop), the seed and the step the trainer set.
#[derive(Debug)]
pub(crate) struct NoiseState {
    stages: Vec<NoiseStage>,
    seed: u64,
    at: NoiseStep,
}

impl NoiseState {
    pub(crate) fn new(config: NoiseConfig, seed: u64) -> Self {
        let mut s = Self {
            stages: Vec::new(),
            seed,
            at: NoiseStep::default(),
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

    /// The layer's noise seed.
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    /// Sets the step the next training forward passes draw their masks for. Cached PQ centroids and
    /// scalar ranges are recomputed when the step enters a new `update_every` interval.
    pub(crate) fn set_step(&mut self, at: NoiseStep) {
        self.at = at;
    }

    /// The step set by the trainer.
    pub(crate) fn step(&self) -> NoiseStep {
        self.at
    }

    /// A seed for other randomness of the layer at the current step (activation noise), distinct
    /// from every mask seed.
    pub(crate) fn aux_seed(&self, stream: u64) -> u64 {
        mask_seed(self.seed ^ 0xA5A5_5A5A_C3C3_3C3C, self.at, stream as usize)
    }

    /// When the chain is exactly one block drop: the mask [`Self::apply`] would draw, so that a layer
    /// can fuse the drop into its matmul.
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
        let seed = mask_seed(self.seed, self.at, 0);
        let layout = layout.with_block_size(name, block_size)?;
        let p = NoiseRate::new(p)?;
        Ok(Some((
            BlockMask::sample(&layout, p, &mut ChaCha8Rng::seed_from_u64(seed)),
            p,
        )))
    }

    /// The noisy weight for a training forward pass at the current step; `weight` is never modified.
    pub(crate) fn apply(
        &mut self,
        name: &str,
        weight: &Tensor,
        layout: &BlockLayout,
    ) -> Result<Tensor> {
        let at = self.at;
        let mut w = weight.clone();
        for (i, stage) in self.stages.iter_mut().enumerate() {
            let seed = mask_seed(self.seed, at, i);
            w = stage.apply(
                name,
                &w,
                layout,
                at.step,
                &mut ChaCha8Rng::seed_from_u64(seed),
            )?;
        }
        Ok(w)
    }
}

/// The refresh interval a step falls in (`update_every = 0`: computed once, never refreshed).
fn interval(step: u64, every: usize) -> u64 {
    if every == 0 {
        0
    } else {
        step / every as u64
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
                let due = interval(step, update_every);
                if self.codes.as_ref().is_none_or(|(at, _)| *at != due) {
                    let cfg = KMeansConfig::new(n_centroids).with_iters(10).with_seed(due);
                    let codes = encode(&weight.detach(), &layout, &cfg, &mut |_| {})
                        .map_err(|e| e.for_tensor(name))?;
                    self.codes = Some((due, codes));
                }
                let mask = BlockMask::sample(&layout, NoiseRate::new(p)?, rng);
                pq_noise(weight, &self.codes.as_ref().expect("just set").1, &mask)?
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
                let due = interval(step, update_every);
                if self.params.as_ref().is_none_or(|(at, _)| *at != due) {
                    let cfg = ScalarConfig::new(bits)?
                        .with_observer(observer)
                        .with_granularity(granularity);
                    let params = observe(&weight.detach(), &cfg).map_err(|e| e.for_tensor(name))?;
                    self.params = Some((due, params));
                }
                let mask = BlockMask::sample(&layout, NoiseRate::new(p)?, rng);
                scalar_noise(weight, &self.params.as_ref().expect("just set").1, &mask)?
            }
        })
    }
}

/// The seed of the masks of chain stage `i` at `at`: a function of nothing else.
fn mask_seed(seed: u64, at: NoiseStep, i: usize) -> u64 {
    seed ^ at.step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
        ^ (at.micro as u64 + 1)
            .wrapping_mul(0xA076_1D64_78BD_642F)
            .rotate_left(17)
}
