//! The weight of a quant-noise layer: float or PQ state, plus its noise.

use std::sync::Mutex;

use candle_core::{Tensor, Var};
use qn_kernels::import::CodedTensor;
use qn_kernels::{
    layout::{BlockLayout, LayerKind},
    noise::{BlockMask, NoiseRate},
    pq::{encode, encode_weighted, BlockMetric, InputMoments, KMeansConfig, PqCodes},
    scalar::{dequantize, observe, quantize, scalar_gather_rows, QuantizedTensor, ScalarConfig},
};

use crate::{
    noise::{NoiseConfig, NoiseState, NoiseStep},
    pq_weight::{CentroidGrad, PqWeight},
    Error, Result,
};

/// How a linear layer multiplies by its weight (see [`QWeight::linear_plan`]).
pub(crate) enum LinearPlan {
    /// The float weight with this step's block-drop mask, for the fused noisy matmul.
    BlockDrop(Tensor, BlockMask, NoiseRate),
    /// The float weight, noise-free.
    Exact(Tensor),
    /// A weight built by [`QWeight::weight_t`] (PQ, scalar, other noises, a frozen row).
    Generic(Tensor),
    /// A product-quantized weight in evaluation on the CPU: the matmul (or the embedding lookup)
    /// runs from its codes; a frozen row is the caller's to apply, as for `Exact`.
    Codes(qn_kernels::pq::PqMatmul),
    /// An int-N weight in evaluation on the CPU: dequantised inside the matmul (or per row read).
    Scalar(QuantizedTensor),
}

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
    /// What the layer measures of its inputs while a calibration runs (none otherwise).
    calibration: Mutex<Option<Calibration>>,
}

/// What a layer measured of its inputs, for activation-aware k-means
/// ([`qn_kernels::pq::kmeans_weighted`]).
#[derive(Debug, Clone)]
pub enum Calibration {
    /// A Linear layer's input second moments.
    Inputs(InputMoments),
    /// How often each row of an embedding was read.
    Rows(Vec<f64>),
}

impl Calibration {
    /// The k-means metric for blocks of `d` of a weight laid out as `layout`; `None` when the
    /// measurements cannot give one (nothing recorded, or `d` does not divide the span kept).
    /// Embedding rows weigh their read count plus one (add-one smoothing: a row the calibration
    /// never read still counts, as it will be read later).
    pub fn metric(&self, layout: &BlockLayout) -> Option<BlockMetric> {
        let (d, rows) = (layout.block_size(), layout.rows());
        match self {
            Calibration::Inputs(m) => m.metric(d, rows),
            Calibration::Rows(counts) => {
                if counts.len() != rows || counts.iter().all(|c| *c == 0.0) {
                    return None;
                }
                let p = layout.cols() / d;
                let mut h = vec![0f32; p * d * d];
                for b in 0..p {
                    for r in 0..d {
                        h[b * d * d + r * d + r] = 1.0;
                    }
                }
                let w = counts.iter().map(|c| (c + 1.0) as f32).collect();
                BlockMetric::new(d, rows, h, Some(w)).ok()
            }
        }
    }
}

impl QWeight {
    /// A float weight of a `kind` layer.
    pub fn new(name: &str, kind: LayerKind, weight: Var) -> Result<Self> {
        // The finest blocks the layer allows: single elements, or whole kernels of a k x k conv.
        let finest = match (kind, weight.dims()) {
            (LayerKind::Conv2d, [_, _, kh, kw]) => kh * kw,
            _ => 1,
        };
        let layout = BlockLayout::new(name, kind, weight.dims(), finest)?;
        Ok(Self {
            name: name.to_string(),
            layout,
            state: WeightState::Float(weight),
            noise: Mutex::new(NoiseState::new(NoiseConfig::None, 0)),
            frozen_row: None,
            calibration: Mutex::new(None),
        })
    }

    /// A weight already quantized (read from a `.qnz`): it runs from its codes in evaluation
    /// and is never expanded to a dense copy unless a training forward asks for it.
    pub fn from_coded(name: &str, kind: LayerKind, coded: CodedTensor) -> Result<Self> {
        let (shape, state) = match coded {
            CodedTensor::Pq(codes) => (
                codes.layout.shape().to_vec(),
                WeightState::Pq(PqWeight::from_owned_codes(codes, CentroidGrad::Mean)?),
            ),
            CodedTensor::Scalar(q) => (q.codes.dims().to_vec(), WeightState::Scalar(q)),
        };
        let finest = match (kind, shape.as_slice()) {
            (LayerKind::Conv2d, [_, _, kh, kw]) => kh * kw,
            _ => 1,
        };
        let layout = BlockLayout::new(name, kind, &shape, finest)?;
        Ok(Self {
            name: name.to_string(),
            layout,
            state,
            noise: Mutex::new(NoiseState::new(NoiseConfig::None, 0)),
            frozen_row: None,
            calibration: Mutex::new(None),
        })
    }

    /// Keeps `row` at its current value (no noise, no gradient, survives quantization).
    pub(crate) fn freeze_row(&mut self, row: usize) -> Result<()> {
        self.check_row(row)?;
        // One row, rebuilt from the codes of a coded weight: never the whole table.
        let value = match &self.state {
            WeightState::Float(v) => v.as_tensor().get(row)?.detach().copy()?,
            WeightState::Pq(p) if self.layout.shape().len() == 2 => {
                let m = p.matmul()?;
                let device = p.centroids().device();
                Tensor::from_vec(m.gather_rows(&[row as u32])?, m.cols(), device)?
            }
            WeightState::Scalar(q) if self.layout.shape().len() == 2 => {
                let values = scalar_gather_rows(q, &[row as u32])?;
                let n = values.len();
                Tensor::from_vec(values, n, q.codes.device())?
            }
            _ => self.stored()?.get(row)?.detach().copy()?,
        };
        self.frozen_row = Some((row, value));
        Ok(())
    }

    /// Keeps `row` at `value` (the exact row a `.qnz` stores beside a quantized embedding).
    pub fn set_frozen_row(&mut self, row: usize, value: Tensor) -> Result<()> {
        self.check_row(row)?;
        let cols = self.layout.shape()[1..].iter().product::<usize>();
        if value.elem_count() != cols {
            return Err(self.err(format!(
                "exact row {row} holds {} values, a row has {cols}",
                value.elem_count()
            )));
        }
        self.frozen_row = Some((row, value.flatten_all()?));
        Ok(())
    }

    fn check_row(&self, row: usize) -> Result<()> {
        if row >= self.layout.rows() {
            return Err(self.err(format!(
                "row {row} is out of range for {} rows",
                self.layout.rows()
            )));
        }
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

    /// The weight's shape and kind (with its finest block size: 1, or a whole kernel).
    pub fn layout(&self) -> &BlockLayout {
        &self.layout
    }

    /// Float or PQ.
    pub fn state(&self) -> &WeightState {
        &self.state
    }

    /// Sets the noise of training-mode forward passes; `seed` makes the masks reproducible. The
    /// config is checked against this weight first (rate, bits, block size — whole kernels for a
    /// k x k conv, a divisor of the input channels for a 1x1 conv), so that a bad setting fails
    /// before any data is read, naming the layer.
    pub fn set_noise(&self, config: NoiseConfig, seed: u64) -> Result<()> {
        config
            .validate_for(&self.name, &self.layout)
            .map_err(|e| self.named(e))?;
        *self.noise.lock().expect("noise lock") = NoiseState::new(config, seed);
        Ok(())
    }

    /// Adds a noise after the current ones (noises compose: each acts on the previous one's output).
    pub fn add_noise(&self, config: NoiseConfig) -> Result<()> {
        config
            .validate_for(&self.name, &self.layout)
            .map_err(|e| self.named(e))?;
        self.noise.lock().expect("noise lock").push(config);
        Ok(())
    }

    fn named(&self, e: Error) -> Error {
        match e {
            Error::Kernels(k) => Error::Kernels(k.for_tensor(&self.name)),
            Error::Config { field, reason } => Error::Layer {
                layer: self.name.clone(),
                reason: format!("{field}: {reason}"),
            },
            other => other,
        }
    }

    /// The first noise of the chain (`None` when there is none).
    pub fn noise(&self) -> NoiseConfig {
        self.noises().first().copied().unwrap_or(NoiseConfig::None)
    }

    /// The whole chain of noises, applied in order.
    pub fn noises(&self) -> Vec<NoiseConfig> {
        self.noise.lock().expect("noise lock").configs()
    }

    /// Sets the noise (with its seed, step and caches) aside, leaving none: for noise-free
    /// training-mode passes; [`Self::put_noise`] puts it back.
    pub(crate) fn take_noise(&self) -> NoiseState {
        let mut lock = self.noise.lock().expect("noise lock");
        let seed = lock.seed();
        std::mem::replace(&mut *lock, NoiseState::new(NoiseConfig::None, seed))
    }

    /// Puts back what [`Self::take_noise`] set aside.
    pub(crate) fn put_noise(&self, noise: NoiseState) {
        *self.noise.lock().expect("noise lock") = noise;
    }

    /// The seed the noise was set with.
    pub fn noise_seed(&self) -> u64 {
        self.noise.lock().expect("noise lock").seed()
    }

    /// Sets the step whose masks the next training forward passes draw (the trainer calls this
    /// before every micro-batch; forward passes never advance it).
    pub fn set_noise_step(&self, at: NoiseStep) {
        self.noise.lock().expect("noise lock").set_step(at);
    }

    /// The step set by [`Self::set_noise_step`].
    pub fn noise_step(&self) -> NoiseStep {
        self.noise.lock().expect("noise lock").step()
    }

    /// A seed for the layer's other randomness at the current step (activation noise).
    pub(crate) fn aux_seed(&self, stream: u64) -> u64 {
        self.noise.lock().expect("noise lock").aux_seed(stream)
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

    /// How a linear layer should multiply by this weight: fused with its block drop (a float weight
    /// whose only noise is block drop, in training), through the noise-free fused matmul (a float
    /// weight with no noise), or with the weight [`Self::weight_t`] builds.
    pub(crate) fn linear_plan(&self, train: bool) -> Result<LinearPlan> {
        if self.frozen_row.is_some() {
            return Ok(LinearPlan::Generic(self.weight_t(train)?));
        }
        self.gather_plan(train)
    }

    /// [`Self::linear_plan`] for a layer that reads rows of the weight (an embedding) and applies
    /// the block-drop mask and the frozen row to the rows it reads: the frozen row is the
    /// caller's to keep (the plan ignores it).
    pub(crate) fn gather_plan(&self, train: bool) -> Result<LinearPlan> {
        let matrix = self.layout.shape().len() == 2;
        match &self.state {
            WeightState::Pq(p) if !train && matrix && p.centroids().device().is_cpu() => {
                return Ok(LinearPlan::Codes(p.matmul()?));
            }
            WeightState::Scalar(q) if !train && matrix && q.codes.device().is_cpu() => {
                return Ok(LinearPlan::Scalar(q.clone()));
            }
            _ => {}
        }
        let WeightState::Float(v) = &self.state else {
            return Ok(LinearPlan::Generic(self.weight_t(train)?));
        };
        let mut noise = self.noise.lock().expect("noise lock");
        if !train || noise.configs().is_empty() {
            return Ok(LinearPlan::Exact(v.as_tensor().clone()));
        }
        match noise.take_block_drop(&self.name, &self.layout)? {
            Some((mask, p)) => Ok(LinearPlan::BlockDrop(v.as_tensor().clone(), mask, p)),
            None => {
                drop(noise);
                Ok(LinearPlan::Generic(self.weight_t(train)?))
            }
        }
    }

    /// How a 1x1 convolution (weight `(out, in, 1, 1)`) in evaluation on the CPU multiplies its
    /// pixels' channel vectors from the codes: `Codes` or `Scalar` over the `(out, in)` matrix the
    /// codes describe. `None` for a float weight, in training, or for any other shape: the caller
    /// convolves with [`Self::weight_t`].
    pub(crate) fn pointwise_plan(&self, train: bool) -> Result<Option<LinearPlan>> {
        let &[out, cin, 1, 1] = self.layout.shape() else {
            return Ok(None);
        };
        if train || self.frozen_row.is_some() {
            return Ok(None);
        }
        match &self.state {
            WeightState::Pq(p) if p.centroids().device().is_cpu() => {
                Ok(p.pointwise_matmul()?.map(LinearPlan::Codes))
            }
            WeightState::Scalar(q) if q.codes.device().is_cpu() => {
                let granularity = q.params.config.granularity;
                let view =
                    qn_kernels::scalar::ParamView::new(&self.name, &[out, cin], granularity)?;
                // The same (scale, zero point) slots must cover the same elements in both shapes.
                if view.view() != q.params.view.view() || view.param() != q.params.view.param() {
                    return Ok(None);
                }
                let mut matrix = q.clone();
                matrix.codes = q.codes.reshape((out, cin))?;
                matrix.params.view = view;
                Ok(Some(LinearPlan::Scalar(matrix)))
            }
            _ => Ok(None),
        }
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

    /// [`Self::quantize_pq`] with the codebook learnt under `metric` (activation-aware k-means);
    /// `None`: plain k-means.
    pub fn quantize_pq_with(
        &mut self,
        block_size: usize,
        kmeans: &KMeansConfig,
        reduction: CentroidGrad,
        metric: Option<&BlockMetric>,
    ) -> Result<PqCodes> {
        let Some(metric) = metric else {
            return self.quantize_pq(block_size, kmeans, reduction);
        };
        let WeightState::Float(v) = &self.state else {
            return Err(self.err("is already product-quantized".into()));
        };
        let layout = self.layout.with_block_size(&self.name, block_size)?;
        let codes = encode_weighted(
            &v.as_tensor().detach(),
            &layout,
            kmeans,
            metric,
            &mut |_| {},
        )?;
        self.state = WeightState::Pq(PqWeight::from_codes(&codes, reduction)?);
        Ok(codes)
    }

    /// Starts measuring the layer's inputs (a Linear's or a 1x1 convolution's input second
    /// moments, an embedding's row counts) on every evaluation forward pass until
    /// [`Self::take_calibration`]. Always true now (kept for callers that check).
    pub fn start_calibration(&self) -> bool {
        let c = match self.layout.kind() {
            // A Conv2d records only when it is a 1x1 kernel at stride 1 (a Linear over pixels);
            // any other leaves the moments empty and gets plain k-means.
            LayerKind::Linear | LayerKind::Conv2d => {
                Calibration::Inputs(InputMoments::new(self.layout.cols()))
            }
            LayerKind::Embedding => Calibration::Rows(vec![0.0; self.layout.rows()]),
        };
        *self.calibration.lock().expect("calibration lock") = Some(c);
        true
    }

    /// Stops measuring and returns what was measured. An exact row (an embedding's padding row,
    /// stored beside the codes) keeps no read count: its reads — every padding token — say nothing
    /// about the rows the codebook must serve.
    pub fn take_calibration(&self) -> Option<Calibration> {
        let mut c = self.calibration.lock().expect("calibration lock").take();
        if let (Some(Calibration::Rows(counts)), Some((row, _))) = (c.as_mut(), &self.frozen_row) {
            if let Some(n) = counts.get_mut(*row) {
                *n = 0.0;
            }
        }
        c
    }

    /// Whether a calibration is recording (so that a layer can skip building its inputs).
    pub(crate) fn is_calibrating(&self) -> bool {
        self.calibration.lock().expect("calibration lock").is_some()
    }

    /// Adds a Linear layer's inputs `(m, in)` when a calibration runs.
    pub(crate) fn record_inputs(&self, x: &Tensor) -> Result<()> {
        let mut c = self.calibration.lock().expect("calibration lock");
        if let Some(Calibration::Inputs(m)) = c.as_mut() {
            let v = x
                .detach()
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            m.add(&v).map_err(|e| self.err(e.to_string()))?;
        }
        Ok(())
    }

    /// Counts the rows an embedding reads when a calibration runs.
    pub(crate) fn record_rows(&self, ids: &Tensor) -> Result<()> {
        let mut c = self.calibration.lock().expect("calibration lock");
        if let Some(Calibration::Rows(counts)) = c.as_mut() {
            for id in ids
                .to_dtype(candle_core::DType::U32)?
                .flatten_all()?
                .to_vec1::<u32>()?
            {
                if let Some(n) = counts.get_mut(id as usize) {
                    *n += 1.0;
                }
            }
        }
        Ok(())
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
