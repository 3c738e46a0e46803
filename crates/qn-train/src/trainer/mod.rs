//! Staged training with quantization noise and iterative PQ (the paper's compression schedule).
//!
//! A run is a [`StagePlan`]: a list of stages. A stage first product-quantizes the layers its regex
//! names (k-means, with a progress bar), then rebuilds the optimizer over everything still
//! trainable — float layers, every layer's centroids, biases — and trains its steps. A stage without
//! layers is plain training (with whatever noise the layers carry).
//!
//! The run's length is the plan's; [`RunOutput::stop_at`] pauses it at a global step with a
//! checkpoint, [`RunOutput::cancel`] (a flag a Ctrl-C handler sets) stops it after the current step
//! with a checkpoint, and calling [`run_stages`] again with the same directory continues. Checkpoints hold
//! the position, every variable, the PQ assignments, the optimizer moments, the per-stage results
//! and the run's [`fingerprint`]; batches and noise masks depend only on the seed and the step, so a
//! killed run resumes to the same final weights as an uninterrupted one, and `metrics.jsonl` holds
//! each step once.
//!
//! The modules: [`plan`] (what to run), `run` (the loop, shared by every model kind),
//! [`checkpoint`](crate::checkpoint) (save/restore), [`fingerprint`], `metrics`, `ipq` (the k-means
//! step) and `export` (the `.qnz`).
//!
//! ```
//! use candle_core::Device;
//! use qn_train::{mlp::Mlp, data::Dataset, trainer::*};
//! let dev = Device::Cpu;
//! let x = candle_core::Tensor::randn(0f32, 1.0, (64, 8), &dev)?;
//! let y = candle_core::Tensor::zeros(64, candle_core::DType::U32, &dev)?;
//! let data = Dataset::new(x, y);
//! let mut model = Mlp::seeded(8, 16, 2, 0, &dev)?;
//! let cfg = TrainConfig { batch_size: 16, ..TrainConfig::default() };
//! let report = run_stages(&mut model, &data, &data, &StagePlan::float(5), &cfg, &RunOutput::default())?;
//! assert_eq!(report.steps, 5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod budget;
mod export;
pub mod fingerprint;
mod ipq;
mod metrics;
pub mod plan;
mod recalibrate;
mod run;

pub use export::{export_qnz, export_qnz_with, planned_size};
pub use fingerprint::{fingerprint, Fingerprint};
pub use ipq::int8_centroids;
pub use plan::{Stage, StageOverride, StagePlan};
pub use run::{accuracy, cross_entropy, run_stages, run_stages_with_teacher, LOCK_FILE};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use crate::distill::Distill;
use crate::optim::{AdamWParams, Schedule};
use crate::{CentroidGrad, Error, Result};

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW settings (weight decay on weights only by default).
    pub adamw: AdamWParams,
    /// Warm-up steps at the start of each stage.
    pub warmup: usize,
    /// Decay after warm-up, over each stage.
    pub schedule: Schedule,
    /// Gradient clipping (global L2 norm).
    pub max_grad_norm: Option<f64>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub grad_accum: usize,
    /// Evaluate every this many steps (0: only at stage ends).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at stage ends and pauses), when a directory is
    /// given.
    pub checkpoint_every: usize,
    /// Seed of batches and noise.
    pub seed: u64,
    /// Show a progress bar.
    pub progress: bool,
    /// Centroid gradient rule of PQ layers.
    pub centroid_grad: CentroidGrad,
    /// k-means iterations when a stage quantizes.
    pub kmeans_iters: usize,
    /// Regex of variable names the optimizer leaves alone (e.g. `embeddings\.`); `None`: train all.
    pub frozen: Option<String>,
    /// At the end of a stage trained with noise, this many noise-free training-mode forward
    /// passes (no backward) re-estimate the model's buffers (batch-norm running statistics), which
    /// were gathered on noised activations and are off at evaluation: see BENCHMARKS.md,
    /// EfficientNet-Lite0 on Fashion-MNIST. 0: never; models without buffers are never touched.
    pub recalibrate_batches: usize,
    /// Recalibrate after a noise-free stage too: a network trained from scratch, whose running
    /// statistics (momentum 0.01) still remember the activations of its first steps after a few
    /// hundred steps — measured: EfficientNet-B0 after 400 steps from scratch, 9.9 % on
    /// Fashion-MNIST with its running statistics, 73.1 % once recalibrated (BENCHMARKS.md).
    pub recalibrate_always: bool,
    /// Train on the teacher logits the training set carries ([`crate::data::Dataset::teacher`]).
    pub distill: Option<Distill>,
    /// Learning rate of PQ centroids (`None`: [`Self::lr`], as every other variable).
    pub centroid_lr: Option<f64>,
    /// Training rows run through the model before a stage quantizes, so that each layer's
    /// codebook minimises its output error on them (activation-aware k-means; embeddings weigh
    /// their rows by how often they are read). 0: plain k-means on the weights.
    pub calibration_rows: usize,
    /// With `calibration_rows`: also weigh embedding rows by how often the calibration reads them
    /// (else embeddings get plain k-means).
    pub calibrate_embeddings: bool,
    /// Weight β of hidden-state distillation: each step adds β times the mean over layers of the
    /// MSE between the student's hidden states and a teacher's
    /// ([`run_stages_with_teacher`]). 0: off.
    pub hidden_distill: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            adamw: AdamWParams::default(),
            warmup: 0,
            schedule: Schedule::Linear,
            max_grad_norm: Some(1.0),
            batch_size: 64,
            grad_accum: 1,
            eval_every: 0,
            checkpoint_every: 0,
            seed: 0,
            progress: false,
            centroid_grad: CentroidGrad::Mean,
            kmeans_iters: 20,
            frozen: None,
            recalibrate_batches: 0,
            recalibrate_always: false,
            distill: None,
            centroid_lr: None,
            calibration_rows: 0,
            calibrate_embeddings: true,
            hidden_distill: 0.0,
        }
    }
}

impl TrainConfig {
    /// Checks every setting, naming the first that is out of range.
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::config(
                    field,
                    format!("{v} is not a positive number"),
                ))
            }
        };
        positive("lr", self.lr)?;
        if let Some(c) = self.centroid_lr {
            positive("centroid_lr", c)?;
        }
        if let Some(d) = &self.distill {
            d.validate()?;
        }
        if !(self.hidden_distill.is_finite() && (0.0..=1e6).contains(&self.hidden_distill)) {
            return Err(Error::config(
                "hidden_distill",
                format!("{} is not a weight in [0, 1e6]", self.hidden_distill),
            ));
        }
        if self.lr > 10.0 {
            return Err(Error::config(
                "lr",
                format!("{} is implausibly large", self.lr),
            ));
        }
        if let Some(m) = self.max_grad_norm {
            positive("max_grad_norm", m)?;
        }
        let a = &self.adamw;
        for (f, v) in [("beta1", a.beta1), ("beta2", a.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(f, format!("{v} is outside [0, 1)")));
            }
        }
        positive("eps", a.eps)?;
        if !(a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
            return Err(Error::config(
                "weight_decay",
                format!("{} is not a non-negative number", a.weight_decay),
            ));
        }
        for (f, v) in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("kmeans_iters", self.kmeans_iters),
        ] {
            if v == 0 {
                return Err(Error::config(f, "must be at least 1"));
            }
        }
        if let Some(f) = &self.frozen {
            regex::Regex::new(f).map_err(|e| Error::config("frozen", e.to_string()))?;
        }
        Ok(())
    }

    /// Whether the optimizer leaves variable `name` alone.
    pub fn is_frozen(&self, name: &str) -> bool {
        self.frozen
            .as_ref()
            .and_then(|f| regex::Regex::new(f).ok())
            .is_some_and(|r| r.is_match(name))
    }
}

/// Where a run writes, and where it pauses.
#[derive(Debug, Clone, Default)]
pub struct RunOutput {
    /// Directory for checkpoints and metrics (none: nothing written, no resume).
    pub dir: Option<PathBuf>,
    /// Pause at this global step: write a checkpoint and return (a later call with a larger value,
    /// or none, continues). Not part of the run's fingerprint.
    pub stop_at: Option<usize>,
    /// Set from elsewhere (a Ctrl-C handler) to stop early without losing work: the run finishes
    /// the step it is in, writes a checkpoint and returns with [`RunReport::interrupted`]; a later
    /// call continues from there. Checked between steps only — a stage's k-means runs to its end
    /// and is followed by one step, so that the checkpoint never has to hold a half-begun stage.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl RunOutput {
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    }
}

/// What a run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    /// Evaluation accuracy at the end of each finished stage (kept in checkpoints, so a resumed run
    /// reports every stage).
    pub stage_accuracy: Vec<f64>,
    /// Global steps done.
    pub steps: usize,
    /// Whether the run returned before finishing: paused at `stop_at`, or interrupted.
    pub stopped: bool,
    /// Whether it stopped because [`RunOutput::cancel`] was set (the checkpoint holds every
    /// finished step).
    pub interrupted: bool,
    /// Things the caller should tell the user (layers left float because they are too small for
    /// their codebook).
    pub warnings: Vec<String>,
}

pub(crate) fn progress_bar(show: bool, len: usize, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    ProgressBar::new(len as u64)
        .with_style(
            ProgressStyle::with_template(
                "{msg:30} {bar:30} {pos}/{len} [{elapsed_precise} < {eta}]",
            )
            .expect("valid template"),
        )
        .with_message(what.to_string())
}
