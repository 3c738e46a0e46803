//! Noise primitives for training with quantization noise (Fan et al., 2021).
//!
//! On each forward pass a random subset of a weight's blocks is distorted and the rest is left
//! exact. Three distortions, each built from an explicit [`BlockMask`] so that a caller (or a test)
//! can replay the same draw:
//!
//! - [`block_drop`]: dropped blocks become zero, kept blocks are scaled by `1/(1-p)` so that the
//!   expectation is the weight itself (the paper's cheap proxy for PQ);
//! - [`scalar_noise`]: noised elements (or blocks) take their fake-quantized value, with a
//!   straight-through gradient that is 1 where the rounded code lies inside the grid and 0 where it
//!   was clamped (PyTorch's fake-quantize rule);
//! - [`pq_noise`]: noised blocks take their current nearest centroid (the paper's φ_PQ), with a
//!   straight-through gradient.
//!
//! No function mutates its input: the noisy weight is a new tensor built from the untouched
//! parameter, so repeated noise can neither compound nor decay the stored weight.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_kernels::{layout::BlockLayout, noise::{block_drop, BlockMask, NoiseRate}};
//! use rand::SeedableRng;
//!
//! let w = Tensor::ones((4, 8), candle_core::DType::F32, &Device::Cpu)?;
//! let layout = BlockLayout::linear("fc.weight", w.dims(), 4)?;
//! let p = NoiseRate::new(0.5)?;
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
//! let mask = BlockMask::sample(&layout, p, &mut rng);
//! let noisy = block_drop(&w, &mask, p)?;
//! // Every value is 0 (dropped) or 2 (kept, scaled by 1 / (1 - 0.5)).
//! for v in noisy.flatten_all()?.to_vec1::<f32>()? {
//!     assert!(v == 0.0 || v == 2.0);
//! }
//! # Ok::<(), qn_kernels::Error>(())
//! ```

mod block_drop_op;
mod mask;
mod ops;
mod scalar_op;

pub use mask::{BlockMask, NoiseRate};
pub use ops::{
    block_drop, block_drop_matmul, block_drop_matmul_bias, block_drop_matmul_reference,
    block_drop_reference, linear_matmul, linear_matmul_bias, pq_noise, scalar_noise,
    scalar_noise_reference, straight_through_gate,
};
