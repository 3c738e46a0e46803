//! The weight of a quant-noise layer: float or PQ state, plus its noise.

use std::sync::Mutex;

use candle_core::{Tensor, Var};
use qn_kernels::{
    layout::{BlockLayout, LayerKind},
    noise::{BlockMask, NoiseRate},
    pq::{encode, KMeansConfig, PqCodes},
    scalar::{dequantize, observe, quantize, QuantizedTensor, ScalarConfig},
};

use crate::{
    noise::{NoiseConfig, NoiseState},
    pq_weight::{CentroidGrad, PqWeight},
    Error, Result,
};

/// Float or product-quantized storage.
#[derive(Debug, Clone)]
pub enum WeightState {
    /// A trainable float weight.
    Float(Var),
    /// Trainable centroids and fixed assignments.
    Pq(PqWeight),
    /// Int-N codes with their scales (frozen: post-training scalar quantization).
    Scalar(QuantizedTensor),
}

/// A layer's weight with its noise. Noise never writes to the stored weight: every training forward
/// builds a new noisy tensor from it.
#[derive(Debug)]
pub struct QWeight {
    name: String,
    layout: BlockLayout,
    state: WeightState,
    noise: Mutex<NoiseState>,
    /// A row kept exactly (an embedding's padding row): no noise, no gradient, survives PQ.
    frozen_row: Option<(usize, Tensor)>,
}

impl QWeight {
    /// A float weight of a `kind` layer.
    pub fn new(name: &str, kind: LayerKind, weight: Var) -> Result<Self> {
        let layout = BlockLayout::new(name, kind, weight.dims(), 1)?;
        Ok(Self {
            name: name.to_string(),
            layout,
            state: WeightState::Float(weight),
            noise: Mutex::new(NoiseState::new(NoiseConfig::None, 0)),
            frozen_row: None,
        })
    }

    pub(crate) fn freeze_row(&mut self, row: usize) -> Result<()> {
        if row >= self.layout.rows() {
            return Err(self.err(format!(
                "row {row} is out of range for {} rows",
                self.layout.rows()
            )));
        }
        let value = self.stored()?.get(row)?.detach().copy()?;
        self.frozen_row = Some((row, value));
        Ok(())
    }

    /// The row kept exactly (an embedding's padding row) and its value.
    pub fn frozen_row(&self) -> Option<(usize, &Tensor)> {
        self.frozen_row.as_ref().map(|(r, v)| (*r, v))
    }

    fn err(&self, reason: String) -> Error {
        Error::Layer {
            layer: self.name.clone(),
            reason,
        }
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The weight's shape and kind (block size 1).
    pub fn layout(&self) -> &BlockLayout {
        &self.layout
    }

    /// Float or PQ.
    pub fn state(&self) -> &WeightState {
        &self.state
    }

    /// Sets the noise of training-mode forward passes; `seed` makes the masks reproducible.
    pub fn set_noise(&self, config: NoiseConfig, seed: u64) {
        *self.noise.lock().expect("noise lock") = NoiseState::new(config, seed);
    }

    /// Adds a noise after the current ones (noises compose: each acts on the previous one's output).
    pub fn add_noise(&self, config: NoiseConfig) {
        self.noise.lock().expect("noise lock").push(config);
    }

    /// The first noise of the chain (`None` when there is none).
    pub fn noise(&self) -> NoiseConfig {
        self.noises().first().copied().unwrap_or(NoiseConfig::None)
    }

    /// The whole chain of noises, applied in order.
    pub fn noises(&self) -> Vec<NoiseConfig> {
        self.noise.lock().expect("noise lock").configs()
    }

    /// Continues the noise from training step `step` (used when resuming).
    pub fn set_noise_step(&self, step: u64) {
        self.noise.lock().expect("noise lock").set_step(step);
    }

    /// Replaces the weight by given PQ state (used when restoring a checkpoint).
    pub fn set_pq(&mut self, pq: PqWeight) -> Result<()> {
        if pq.layout().shape() != self.layout.shape() {
            return Err(self.err(format!(
                "PQ shape {:?} differs from {:?}",
                pq.layout().shape(),
                self.layout.shape()
            )));
        }
        self.state = WeightState::Pq(pq);
        Ok(())
    }

    /// Training forward passes seen since the noise was set.
    pub fn noise_step(&self) -> u64 {
        self.noise.lock().expect("noise lock").step()
    }

    /// The weight without noise.
    pub fn stored(&self) -> Result<Tensor> {
        match &self.state {
            WeightState::Float(v) => Ok(v.as_tensor().clone()),
            WeightState::Pq(p) => p.weight(),
            WeightState::Scalar(q) => Ok(dequantize(q)?),
        }
    }

    /// The weight a forward pass uses: noisy in training mode (float state only), exact otherwise.
    pub fn weight_t(&self, train: bool) -> Result<Tensor> {
        let stored = self.stored()?;
        let w = match (&self.state, train) {
            (WeightState::Float(_), true) => {
                self.noise
                    .lock()
                    .expect("noise lock")
                    .apply(&self.name, &stored, &self.layout)?
            }
            _ => stored,
        };
        match &self.frozen_row {
            None => Ok(w),
            Some((row, value)) => {
                let rows = self.layout.rows();
                let mut flags = vec![0u8; rows];
                flags[*row] = 1;
                let mask = Tensor::from_vec(flags, rows, w.device())?;
                let shape = w.dims().to_vec();
                let w2 = w.reshape((rows, ()))?;
                let cols = w2.dim(1)?;
                let mask = mask.reshape((rows, 1))?.broadcast_as((rows, cols))?;
                let frozen = value.reshape((1, cols))?.broadcast_as((rows, cols))?;
                Ok(mask.where_cond(&frozen, &w2)?.reshape(shape)?)
            }
        }
    }

    /// For a float weight whose only noise is block drop, in training mode: the exact float weight
    /// and this step's mask (the step advances), so the caller can fuse the drop into its matmul.
    pub(crate) fn fused_block_drop(
        &self,
        train: bool,
    ) -> Result<Option<(Tensor, BlockMask, NoiseRate)>> {
        let WeightState::Float(v) = &self.state else {
            return Ok(None);
        };
        if !train || self.frozen_row.is_some() {
            return Ok(None);
        }
        let taken = self
            .noise
            .lock()
            .expect("noise lock")
            .take_block_drop(&self.name, &self.layout)?;
        Ok(taken.map(|(mask, p)| (v.as_tensor().clone(), mask, p)))
    }

    /// Replaces the float weight by PQ codes learned with k-means; the float variable stops being
    /// trainable and the centroids start.
    pub fn quantize_pq(
        &mut self,
        block_size: usize,
        kmeans: &KMeansConfig,
        reduction: CentroidGrad,
    ) -> Result<PqCodes> {
        let WeightState::Float(v) = &self.state else {
            return Err(self.err("is already product-quantized".into()));
        };
        let layout = self.layout.with_block_size(&self.name, block_size)?;
        let codes = encode(&v.as_tensor().detach(), &layout, kmeans, &mut |_| {})?;
        self.state = WeightState::Pq(PqWeight::from_codes(&codes, reduction)?);
        Ok(codes)
    }

    /// Replaces the float weight by int-N codes (e.g. int8 per channel after training); the weight
    /// stops being trainable.
    pub fn quantize_scalar(&mut self, config: &ScalarConfig) -> Result<()> {
        let WeightState::Float(v) = &self.state else {
            return Err(self.err("is not a float weight".into()));
        };
        let w = v.as_tensor().detach();
        let q = quantize(&w, &observe(&w, config)?)?;
        self.state = WeightState::Scalar(q);
        Ok(())
    }

    /// The variables an optimizer should update.
    pub fn vars(&self) -> Vec<Var> {
        match &self.state {
            WeightState::Float(v) => vec![v.clone()],
            WeightState::Pq(p) => vec![p.centroids().clone()],
            WeightState::Scalar(_) => Vec::new(),
        }
    }
}
