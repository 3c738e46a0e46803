//! Convolution kernels that candle lacks at training speed, and 1x1 convolutions from codes.
//!
//! candle runs a grouped convolution as one convolution per group, so a depthwise convolution
//! (`groups = channels`, the core of MobileNet/EfficientNet blocks) costs as many small
//! convolutions as it has channels, forward and backward. [`depthwise_conv2d`] is one fused CPU op
//! (rayon over blocks of 16 channels laid out channels-last, so every tap is one vector
//! multiply-add whatever the plane size or stride) with a hand-written backward that computes both
//! gradients in one pass; [`depthwise_conv2d_reference`] is its plain-tensor twin (zero padding,
//! then candle's grouped `conv2d`), which it is tested against and which runs on other devices.
//!
//! [`pointwise_conv_pq`] and [`pointwise_conv_scalar`] run a product-quantized or int-N 1x1
//! convolution from its codes, a tile of decoded output channels at a time, on the activations as
//! they lie (channels first); [`pointwise_conv_reference`] is their twin.
//!
//! Padding is explicit per side because TensorFlow-trained weights expect "SAME" padding, which is
//! asymmetric for even strides ([`same_padding`]).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_kernels::conv::{depthwise_conv2d, depthwise_conv2d_reference, same_padding, Padding2d};
//!
//! let x = Tensor::randn(0f32, 1.0, (2, 8, 15, 15), &Device::Cpu)?;
//! let w = Tensor::randn(0f32, 1.0, (8, 1, 3, 3), &Device::Cpu)?;
//! let (top, bottom) = same_padding(15, 3, 2);
//! let pad = Padding2d { top, bottom, left: top, right: bottom };
//! let fast = depthwise_conv2d(&x, &w, 2, pad)?;
//! let plain = depthwise_conv2d_reference(&x, &w, 2, pad)?;
//! assert_eq!(fast.dims(), &[2, 8, 8, 8]);
//! let diff = (fast - plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-5);
//! # Ok::<(), qn_kernels::Error>(())
//! ```

mod depthwise;
mod depthwise_blocked;
mod pointwise;

pub use depthwise::{
    depthwise_conv2d, depthwise_conv2d_reference, depthwise_conv2d_with, DepthwiseKernel,
};
pub use pointwise::{pointwise_conv_pq, pointwise_conv_reference, pointwise_conv_scalar};

/// Zero padding on each side of an image, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Padding2d {
    /// Rows above.
    pub top: usize,
    /// Rows below.
    pub bottom: usize,
    /// Columns on the left.
    pub left: usize,
    /// Columns on the right.
    pub right: usize,
}

impl Padding2d {
    /// The same padding on every side (PyTorch's `padding = p`).
    pub fn symmetric(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }

    /// TensorFlow's "SAME" padding for an `h x w` input, a square `kernel` and `stride`.
    pub fn same(h: usize, w: usize, kernel: usize, stride: usize) -> Self {
        let (top, bottom) = same_padding(h, kernel, stride);
        let (left, right) = same_padding(w, kernel, stride);
        Self {
            top,
            bottom,
            left,
            right,
        }
    }
}

/// TensorFlow's "SAME" padding along one axis of length `len`: the output has `ceil(len / stride)`
/// positions, and the padding that needs is split with the smaller half first (so stride 2 on an
/// even length pads only after the end for k = 3). Returns `(before, after)`.
pub fn same_padding(len: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let stride = stride.max(1);
    let out = len.div_ceil(stride);
    let needed = ((out.saturating_sub(1)) * stride + kernel).saturating_sub(len);
    (needed / 2, needed - needed / 2)
}

/// Output length of a convolution along one axis (`None` when the kernel does not fit).
pub(crate) fn out_len(
    len: usize,
    before: usize,
    after: usize,
    k: usize,
    s: usize,
) -> Option<usize> {
    let padded = len + before + after;
    if padded < k || s == 0 {
        None
    } else {
        Some((padded - k) / s + 1)
    }
}
