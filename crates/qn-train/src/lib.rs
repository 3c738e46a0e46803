//! # qn-train — training with quantization noise
//!
//! Candle layers whose weights receive quantization noise in training mode (Fan, Stock et al.,
//! "Training with Quantization Noise for Extreme Model Compression", ICLR 2021; the reference is
//! fairseq's `quant_noise` and `quantization/pq`, whose in-place noise, 1x1-conv mask bug and
//! skipped attention projections this crate does not copy):
//!
//! - [`layers`]: `QLinear`, `QEmbedding` (exact `padding_idx` row), `QConv2d` (any kernel, stride,
//!   padding, groups), each with a float or PQ weight and a [`NoiseConfig`] switchable at run time;
//! - [`PqWeight`]: trainable centroids with fixed assignments; a centroid's gradient is the mean of
//!   its blocks' gradients (or the sum), unused centroids get zero;
//! - [`ActQuant`]: activation quantization (clamp in training, fake-quantize in eval);
//! - [`apply_noise`] / [`vars_without_gradient`]: model-level helpers;
//! - [`trainer`]: AdamW ([`optim`]), warm-up + decay, clipping, JSON-lines metrics, atomic
//!   [`checkpoint`]s with exact resume, and the iterative-PQ stages; [`trainer::export_qnz`] writes the
//!   compressed model.
//!
//! ```
//! use candle_core::{DType, Device, ModuleT, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use qn_train::{layers::{qlinear, QuantNoiseLayer}, NoiseConfig};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let fc = qlinear(16, 8, true, vb.pp("fc"))?;
//! fc.set_noise(NoiseConfig::BlockDrop { p: 0.1, block_size: 4 }, 0)?;
//! let x = Tensor::randn(0f32, 1.0, (2, 16), &Device::Cpu)?;
//! // Masks are a function of (layer seed, step, micro-batch): the trainer sets the step.
//! fc.qweight().set_noise_step(qn_train::NoiseStep { step: 7, micro: 0 });
//! let noisy = fc.forward_t(&x, true)?;   // some weight blocks dropped, the rest scaled by 1/0.9
//! let exact = fc.forward_t(&x, false)?;  // eval mode: no noise
//! assert_eq!(noisy.dims(), exact.dims());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod act_quant;
pub mod allocator;
mod apply;
pub mod checkpoint;
pub mod data;
pub mod distill;
mod error;
pub mod layers;
pub mod mlp;
mod model;
mod noise;
mod noise_spec;
pub mod optim;
mod pq_weight;
mod qweight;
pub mod trainer;

pub use act_quant::{ActQuant, ActQuantConfig};
pub use apply::{apply_noise, apply_noise_spec, layer_seed, set_noise_step, vars_without_gradient};
pub use error::{Error, Result};
pub use model::{named_vars, QuantModel};
pub use noise::{NoiseConfig, NoiseStep};
pub use noise_spec::NoiseSpec;
pub use pq_weight::{CentroidGrad, PqWeight};
pub use qweight::{Calibration, QWeight, WeightState};

pub use qn_kernels as kernels;
