//! The encoder's elementwise pieces built from candle ops that all have a backward (candle's fused
//! `layer_norm` / `softmax_last_dim` have none, so a model on them trains only what follows them),
//! and dropout whose masks are a function of (seed, step, micro-batch, site) so that a resumed run
//! draws the same masks.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

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

/// The inverted-dropout mask of `n` elements: `0` with probability `p`, else `1/(1-p)`, from a
/// ChaCha8 stream seeded by `seed`, one 32-bit draw per element compared with `p · 2³²`. The
/// stream is cut into chunks that threads fill at once, each seeking to its chunk's word in the
/// stream, so the mask is the one that drawing the words one at a time gives (a test pins this),
/// whatever the thread count.
pub fn dropout_mask(seed: u64, n: usize, p: f64) -> Vec<f32> {
    // Draws per task: a whole number of ChaCha blocks (16 words), enough to amortise a task.
    const CHUNK: usize = 1 << 16;
    let rng = ChaCha8Rng::seed_from_u64(seed);
    let keep = 1.0 / (1.0 - p) as f32;
    let threshold = (p * 4_294_967_296.0) as u64;
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut rng = rng.clone();
        rng.set_word_pos((c * CHUNK) as u128);
        let mut draws = [0u32; 1024];
        for part in out.chunks_mut(draws.len()) {
            let draws = &mut draws[..part.len()];
            rng.fill(draws);
            for (m, &d) in part.iter_mut().zip(draws.iter()) {
                *m = if (d as u64) < threshold { 0.0 } else { keep };
            }
        }
    });
    mask
}

/// Inverted dropout at rate `p` with a mask drawn from `(seed, step, site)`: one graph node whose
/// backward multiplies by the same mask (as a product of tensors, candle would also compute and
/// accumulate a gradient for the constant mask).
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
    let mask = dropout_mask(mask_seed(seed, at, site), x.elem_count(), p);
    if !super::fused::fused_ok(x) {
        return dropout_reference(x, mask);
    }
    x.contiguous()?.apply_op1(DropoutOp {
        mask: Arc::new(mask),
    })
}

/// `dropout(x) + residual` as one graph node (the sublayer output's dropout and the residual
/// connection of a transformer layer): its backward hands `g ⊙ mask` to `x` and `g` itself to the
/// residual, where the two nodes it replaces zero-filled and accumulated four gradients.
pub fn dropout_add(
    x: &Tensor,
    residual: &Tensor,
    p: f64,
    seed: u64,
    at: NoiseStep,
    site: u64,
) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return x + residual;
    }
    let mask = dropout_mask(mask_seed(seed, at, site), x.elem_count(), p);
    if !super::fused::fused_ok(x) || x.dims() != residual.dims() || residual.dtype() != x.dtype() {
        return dropout_reference(x, mask)? + residual;
    }
    x.contiguous()?.apply_op2(
        &residual.contiguous()?,
        DropoutOp {
            mask: Arc::new(mask),
        },
    )
}

/// `x ⊙ mask` from plain ops: the twin of the fused dropout.
pub fn dropout_reference(x: &Tensor, mask: Vec<f32>) -> candle_core::Result<Tensor> {
    let mask = Tensor::from_vec(mask, x.dims(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// `x ⊙ mask` (one input) or `x ⊙ mask + residual` (two).
struct DropoutOp {
    mask: Arc<Vec<f32>>,
}

impl DropoutOp {
    fn check(&self, n: usize) -> candle_core::Result<()> {
        if n != self.mask.len() {
            candle_core::bail!(
                "qn-dropout: {n} elements against a mask of {}",
                self.mask.len()
            );
        }
        Ok(())
    }
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "qn-dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::fused::f32s(s, l, CustomOp1::name(self))?;
        self.check(x.len())?;
        let y = x
            .par_iter()
            .with_min_len(1 << 14)
            .zip(self.mask.par_iter())
            .map(|(x, m)| x * m)
            .collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // Dropout is diagonal: its backward is itself.
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

impl CustomOp2 for DropoutOp {
    fn name(&self) -> &'static str {
        "qn-dropout-add"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::fused::f32s(s1, l1, CustomOp2::name(self))?;
        let r = super::fused::f32s(s2, l2, CustomOp2::name(self))?;
        self.check(x.len())?;
        self.check(r.len())?;
        let y = x
            .par_iter()
            .with_min_len(1 << 14)
            .zip(self.mask.par_iter())
            .zip(r.par_iter())
            .map(|((x, m), r)| x * m + r)
            .collect();
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _r: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = g.contiguous()?.apply_op1_no_bwd(self)?;
        Ok((Some(dx), Some(g.clone())))
    }
}

/// The additive attention bias `(b, 1, 1, l)`: 0 where the mask is 1, a large negative elsewhere.
pub fn attention_bias(mask: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let m = mask.to_dtype(dtype)?;
    // Hugging Face uses the dtype's minimum; any value whose exp underflows gives the same result.
    ((m - 1.0)? * 1e30)?.reshape((b, 1, 1, l))
}
