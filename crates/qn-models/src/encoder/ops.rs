//! The encoder's elementwise pieces built from candle ops that all have a backward (candle's fused
//! `layer_norm` / `softmax_last_dim` have none, so a model on them trains only what follows them),
//! and dropout whose masks are a function of (seed, step, micro-batch, site) so that a resumed run
//! draws the same masks.

use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::Activation;
use qn_train::NoiseStep;

/// LayerNorm over the last dimension: the fused kernel on the CPU, the plain-op twin elsewhere.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if super::fused::fused_ok(x) {
        super::fused::layer_norm(x, w, b, eps)
    } else {
        layer_norm_reference(x, w, b, eps)
    }
}

/// Softmax over the last dimension: fused on the CPU, the plain-op twin elsewhere.
pub fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    if super::fused::fused_ok(x) {
        super::fused::softmax_last_dim(x)
    } else {
        softmax_reference(x)
    }
}

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension (biased variance, as PyTorch),
/// from plain ops.
pub fn layer_norm_reference(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

/// Softmax over the last dimension, max-subtracted, from plain ops.
pub fn softmax_reference(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// The feed-forward activation.
pub fn activate(x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::GeluErf if super::fused::fused_ok(x) => super::fused::gelu_erf(x),
        Activation::GeluErf => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
    }
}

/// The seed of a dropout mask: a function of the run's seed, the step and micro-batch, and the
/// dropout site, so that a resumed run draws the same masks.
pub fn mask_seed(seed: u64, at: NoiseStep, site: u64) -> u64 {
    seed ^ at.step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (at.micro as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ site.wrapping_mul(0x1656_67B1_9E37_79F9)
}

/// Inverted dropout at rate `p` with a mask drawn from `(seed, step, site)`.
pub fn dropout(
    x: &Tensor,
    p: f64,
    seed: u64,
    at: NoiseStep,
    site: u64,
) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let n = x.elem_count();
    let mut rng = ChaCha8Rng::seed_from_u64(mask_seed(seed, at, site));
    let keep = 1.0 / (1.0 - p) as f32;
    // A 32-bit threshold: one draw per element, no float conversion.
    let threshold = (p * 4_294_967_296.0) as u64;
    let mask: Vec<f32> = (0..n)
        .map(|_| {
            if (rng.random::<u32>() as u64) < threshold {
                0.0
            } else {
                keep
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.dims(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// The additive attention bias `(b, 1, 1, l)`: 0 where the mask is 1, a large negative elsewhere.
pub fn attention_bias(mask: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let m = mask.to_dtype(dtype)?;
    // Hugging Face uses the dtype's minimum; any value whose exp underflows gives the same result.
    ((m - 1.0)? * 1e30)?.reshape((b, 1, 1, l))
}
