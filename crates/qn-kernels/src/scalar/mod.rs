//! Scalar int-N quantization (N = 2..=8): observers, fake-quantization, real codes.
//!
//! The grid is always `qmin = 0 ..= qmax = 2^bits - 1` (16 levels for int4, never a 0..255 grid for
//! fewer bits). Parameters can be per tensor, per channel along any axis, or per group of consecutive
//! inputs, with an affine or symmetric scheme, observed by min-max or by a histogram search that picks
//! the clipping range with the least L2 error (the idea of PyTorch's `HistogramObserver`).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_kernels::scalar::{observe, fake_quantize, quantize, dequantize, ScalarConfig, Granularity};
//!
//! let w = Tensor::randn(0f32, 0.02, (64, 128), &Device::Cpu)?;
//! let cfg = ScalarConfig::int4().with_granularity(Granularity::PerChannel { axis: 0 });
//! let params = observe(&w, &cfg)?;
//! let q = quantize(&w, &params)?;            // u8 codes in 0..=15, plus scales and zero points
//! let back = dequantize(&q)?;
//! let fq = fake_quantize(&w, &params)?;      // the same values, without the detour through codes
//! let diff = (back - fq)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-6);
//! # Ok::<(), qn_kernels::Error>(())
//! ```

mod config;
mod histogram;
mod matmul;
mod ops;
mod params;

pub use config::{Granularity, ObserverKind, ScalarConfig, Scheme};
pub use histogram::{histogram_range, Histogram};
pub(crate) use matmul::{matrix_dims, with_row_decoder};
pub use matmul::{
    scalar_gather_rows, scalar_matmul, scalar_matmul_reference, scalar_matmul_with, SCALAR_MAX_ROWS,
};
pub(crate) use ops::check_shape;
pub use ops::{dequantize, fake_quantize, quantize, QuantizedTensor};
pub use params::{observe, observe_range, ParamView, QParams};
