//! # qn-kernels — the quantizers of quant-noise-rs
//!
//! Everything here is a candle tensor operation on any [`candle_core::Device`] (hot CPU loops have a
//! hand-written kernel with a plain-tensor `*_reference` twin that the tests compare against):
//!
//! - [`scalar`]: int-N (N = 2..=8) quantization per tensor / channel / group, affine or symmetric,
//!   min-max or histogram observers; fake-quantization and real `u8` codes.
//! - [`pq`]: product quantization — k-means with GEMM-form distances, k-means++ or random init,
//!   empty-cluster splitting, deterministic across thread counts; `encode` / `decode`.
//! - [`layout`]: how Linear, Embedding and Conv2d weights are cut into blocks (the paper's order).
//! - [`noise`]: block drop, scalar noise and PQ noise masks used while training.
//! - [`bias`]: a bias add over rows with a fast backward.
//! - [`conv`]: a fused depthwise convolution (candle runs it one channel at a time) and 1x1
//!   convolutions from PQ or int-N codes.
//! - [`tiled`]: decode-then-GEMM a tile of weight rows at a time, the dense path of coded weights.
//! - [`simd`]: elementwise kernels compiled for AVX-512 / AVX2 and picked at run time.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_kernels::{layout::BlockLayout, pq, relative_mse, scalar};
//!
//! let w = Tensor::randn(0f32, 0.02, (128, 256), &Device::Cpu)?;
//! // int8 per output channel.
//! let params = scalar::observe(&w, &scalar::ScalarConfig::int8()
//!     .with_granularity(scalar::Granularity::PerChannel { axis: 0 }))?;
//! let int8 = relative_mse(&w, &scalar::fake_quantize(&w, &params)?)?;
//! // PQ with 4-dim blocks and 256 centroids: 2 bits per weight.
//! let layout = BlockLayout::linear("w", w.dims(), 4)?;
//! let codes = pq::encode(&w, &layout, &pq::KMeansConfig::new(256), &mut |_| {})?;
//! let pq = codes.relative_mse(&w)?;
//! assert!(int8 < 1e-3 && pq < 0.15);
//! # Ok::<(), qn_kernels::Error>(())
//! ```

pub mod bias;
pub mod conv;
pub mod error;
pub mod export;
pub mod import;
pub mod layout;
pub mod noise;
pub mod pq;
pub mod scalar;
pub mod simd;
pub mod tiled;

pub use error::{Error, Result};

use candle_core::{DType, Tensor};

/// `‖a − b‖² / ‖a‖²`, accumulated in `f64`.
pub fn relative_mse(original: &Tensor, approx: &Tensor) -> Result<f64> {
    if original.dims() != approx.dims() {
        return Err(Error::shape(
            "approximation",
            format!(
                "shape {:?} differs from the original's {:?}",
                approx.dims(),
                original.dims()
            ),
        ));
    }
    let a = original.to_dtype(DType::F64)?;
    let b = approx.to_dtype(DType::F64)?;
    let err = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let norm = a.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok(if norm > 0.0 { err / norm } else { err })
}
