//! The three distortions, each returning a new tensor.

use candle_core::{DType, Tensor};

use super::{BlockMask, NoiseRate};
use crate::{
    pq::{assign_nearest_reference, PqCodes},
    scalar::{fake_quantize, QParams},
    Error, Result,
};

fn check(weight: &Tensor, mask: &BlockMask) -> Result<()> {
    if weight.dims() != mask.layout().shape() {
        return Err(Error::shape(
            "weight",
            format!(
                "shape {:?} does not match the mask's layout {:?}",
                weight.dims(),
                mask.layout().shape()
            ),
        ));
    }
    Ok(())
}

/// Zeroes the noised blocks and scales the kept ones by `1/(1-p)`; `p = 1` drops everything.
///
/// On the CPU (f32 / f64) this is one fused op whose backward is the same op on the gradient; other
/// devices and dtypes use [`block_drop_reference`].
pub fn block_drop(weight: &Tensor, mask: &BlockMask, p: NoiseRate) -> Result<Tensor> {
    check(weight, mask)?;
    if p.get() >= 1.0 {
        return Ok(weight.zeros_like()?);
    }
    if !weight.device().is_cpu() || !matches!(weight.dtype(), DType::F32 | DType::F64) {
        return block_drop_reference(weight, mask, p);
    }
    let op = super::block_drop_op::BlockDropOp {
        noised: std::sync::Arc::new(mask.noised().to_vec()),
        cols: mask.layout().cols(),
        block: mask.layout().block_size(),
        scale: 1.0 / (1.0 - p.get()),
    };
    Ok(weight.contiguous()?.apply_op1(op)?)
}

/// `x · block_drop(weight)ᵀ` for `x (m, in)` and a Linear `weight (out, in)`: a noisy linear layer in
/// one op. On the CPU (f32) the dropped weight is never a graph node, which makes the backward about as
/// cheap as a plain linear layer's; elsewhere [`block_drop_matmul_reference`].
pub fn block_drop_matmul(
    x: &Tensor,
    weight: &Tensor,
    mask: &BlockMask,
    p: NoiseRate,
) -> Result<Tensor> {
    check(weight, mask)?;
    if p.get() >= 1.0
        || !weight.device().is_cpu()
        || weight.dtype() != DType::F32
        || x.dtype() != DType::F32
    {
        return block_drop_matmul_reference(x, weight, mask, p);
    }
    Ok(x.contiguous()?
        .apply_op2(&weight.contiguous()?, block_drop_matmul_op(mask, p))?)
}

/// [`block_drop_matmul`] plus an optional bias `(out)` added to every row, in one graph node on the
/// CPU (f32); elsewhere the matmul, then [`crate::bias::add_bias`].
pub fn block_drop_matmul_bias(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    mask: &BlockMask,
    p: NoiseRate,
) -> Result<Tensor> {
    let Some(bias) = bias else {
        return block_drop_matmul(x, weight, mask, p);
    };
    check(weight, mask)?;
    if p.get() >= 1.0 || !fused_bias_ok(x, weight, bias) {
        return crate::bias::add_bias(&block_drop_matmul(x, weight, mask, p)?, bias);
    }
    let op = super::block_drop_op::WithBias(block_drop_matmul_op(mask, p));
    Ok(x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?)
}

/// Whether the fused matmul-plus-bias ops apply: f32 on the CPU, a bias as long as the weight's rows.
fn fused_bias_ok(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    weight.device().is_cpu()
        && [x, weight, bias].iter().all(|t| t.dtype() == DType::F32)
        && weight.rank() == 2
        && bias.dims() == [weight.dims()[0]]
}

fn block_drop_matmul_op(mask: &BlockMask, p: NoiseRate) -> super::block_drop_op::BlockDropMatmulOp {
    super::block_drop_op::BlockDropMatmulOp {
        drop: super::block_drop_op::BlockDropOp {
            noised: std::sync::Arc::new(mask.noised().to_vec()),
            cols: mask.layout().cols(),
            block: mask.layout().block_size(),
            scale: 1.0 / (1.0 - p.get()),
        },
        dropped: Default::default(),
    }
}

/// The plain-tensor twin of [`block_drop_matmul`]: the expanded mask times the weight, then candle's
/// matmul (no fused op anywhere, so a test comparing the two compares independent paths).
pub fn block_drop_matmul_reference(
    x: &Tensor,
    weight: &Tensor,
    mask: &BlockMask,
    p: NoiseRate,
) -> Result<Tensor> {
    Ok(x.matmul(&block_drop_reference(weight, mask, p)?.t()?)?)
}

/// `x · weightᵀ` for `x (m, in)` and `weight (out, in)`: the noise-free twin of
/// [`block_drop_matmul`], with the same backward structure (`dx = g · w`, `dw = gᵀ · x`, no
/// transposed weight node), so that a training step with noise and one without differ only by the
/// noise. Off the CPU or for other dtypes it is candle's `x.matmul(&w.t())`.
pub fn linear_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if !weight.device().is_cpu() || weight.dtype() != DType::F32 || x.dtype() != DType::F32 {
        return Ok(x.matmul(&weight.t()?)?);
    }
    Ok(x.contiguous()?
        .apply_op2(&weight.contiguous()?, super::block_drop_op::LinearMatmulOp)?)
}

/// [`linear_matmul`] plus an optional bias `(out)` added to every row, in one graph node on the
/// CPU (f32); elsewhere the matmul, then [`crate::bias::add_bias`].
pub fn linear_matmul_bias(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let Some(bias) = bias else {
        return linear_matmul(x, weight);
    };
    if !fused_bias_ok(x, weight, bias) {
        return crate::bias::add_bias(&linear_matmul(x, weight)?, bias);
    }
    let op = super::block_drop_op::WithBias(super::block_drop_op::LinearMatmulOp);
    Ok(x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?)
}

/// The plain-tensor twin of [`block_drop`]: `weight * keep` with `keep` the expanded mask.
pub fn block_drop_reference(weight: &Tensor, mask: &BlockMask, p: NoiseRate) -> Result<Tensor> {
    check(weight, mask)?;
    if p.get() >= 1.0 {
        return Ok(weight.zeros_like()?);
    }
    let scale = (1.0 / (1.0 - p.get())) as f32;
    let keep = mask.to_tensor_with(0.0, scale, weight.dtype(), weight.device())?;
    Ok(weight.mul(&keep)?)
}

/// Noised values become exactly `q`; their gradient is `grad_gate` (straight through). Kept values
/// are the weight itself.
fn replace_straight_through(
    weight: &Tensor,
    q: &Tensor,
    grad_gate: &Tensor,
    mask: &BlockMask,
) -> Result<Tensor> {
    // `g - g.detach()` is exactly 0 with derivative `grad_gate`, so the value is exactly `q`.
    let gated = weight.mul(grad_gate)?;
    let noised = (gated.sub(&gated.detach())? + q.detach())?;
    let flags = mask.to_tensor(DType::U8, weight.device())?;
    Ok(flags.where_cond(&noised, weight)?)
}

/// Replaces the noised elements (mask block size 1) or blocks by their fake-quantized value.
///
/// The gradient of a noised value follows PyTorch's fake-quantize rule: it is 1 where the rounded
/// code `round(w / scale) + zero_point` lies inside `qmin..=qmax` and 0 where the code was clamped, so
/// a value up to half a step outside the range still passes its gradient. Out-of-range values are
/// clamped, never reflected.
///
/// On the CPU an `f32` weight goes through one fused op (`scalar_op.rs`); other dtypes and
/// devices, and [`scalar_noise_reference`], use plain tensor ops with the same result.
pub fn scalar_noise(weight: &Tensor, params: &QParams, mask: &BlockMask) -> Result<Tensor> {
    check(weight, mask)?;
    if weight.device().is_cpu() && weight.dtype() == DType::F32 {
        crate::scalar::check_shape(weight, params)?;
        let op = super::scalar_op::ScalarNoiseOp::new(params, mask.expand(1u8, 0u8))?;
        return Ok(weight.contiguous()?.apply_op1(op)?);
    }
    scalar_noise_reference(weight, params, mask)
}

/// [`scalar_noise`] with plain tensor ops on any device: its reference twin.
pub fn scalar_noise_reference(
    weight: &Tensor,
    params: &QParams,
    mask: &BlockMask,
) -> Result<Tensor> {
    check(weight, mask)?;
    let q = fake_quantize(weight, params)?;
    let inside = straight_through_gate(weight, params)?;
    replace_straight_through(weight, &q.to_dtype(weight.dtype())?, &inside, mask)
}

/// 1 where `round(w / scale) + zero_point` lies inside the grid (the gradient passes), 0 where
/// fake-quantization clamps it; in `weight`'s dtype and shape.
pub fn straight_through_gate(weight: &Tensor, params: &QParams) -> Result<Tensor> {
    let v = weight
        .detach()
        .to_dtype(DType::F32)?
        .reshape(&params.view.view())?;
    let code = v
        .broadcast_div(&params.scale)?
        .round()?
        .broadcast_add(&params.zero_point)?;
    let (qmin, qmax) = (params.config.qmin() as f64, params.config.qmax() as f64);
    Ok(code
        .ge(qmin)?
        .mul(&code.le(qmax)?)?
        .to_dtype(weight.dtype())?
        .reshape(weight.dims())?)
}

/// Replaces the noised blocks by their nearest centroid among `codes.centroids` (φ_PQ), with a
/// straight-through gradient. The nearest centroid is searched for the weight's current values.
pub fn pq_noise(weight: &Tensor, codes: &PqCodes, mask: &BlockMask) -> Result<Tensor> {
    check(weight, mask)?;
    let layout = &codes.layout;
    if layout.shape() != mask.layout().shape() || layout.block_size() != mask.layout().block_size()
    {
        return Err(Error::shape(
            "mask",
            "the mask's blocks differ from the codebook's blocks",
        ));
    }
    let sub = layout.to_subvectors(&weight.detach().to_dtype(DType::F32)?)?;
    let (index, _) = nearest(&sub, &codes.centroids)?;
    let q = codes
        .centroids
        .to_dtype(DType::F32)?
        .index_select(&index, 0)?;
    let q = layout.from_subvectors(&q)?.to_dtype(weight.dtype())?;
    let ones = weight.ones_like()?;
    replace_straight_through(weight, &q, &ones, mask)
}

/// Nearest centroid per row: the optimised kernel on the CPU, tensor ops elsewhere.
fn nearest(sub: &Tensor, centroids: &Tensor) -> Result<(Tensor, ())> {
    if !matches!(sub.device(), candle_core::Device::Cpu) {
        let (index, _) = assign_nearest_reference(sub, centroids)?;
        return Ok((index, ()));
    }
    let (k, d) = centroids.dims2()?;
    let table = crate::pq::CentroidTable::new(
        &centroids
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?,
        k,
        d,
    )?;
    let points = sub.flatten_all()?.to_vec1::<f32>()?;
    let n = points.len() / d;
    let mut index = vec![0u32; n];
    let mut partial = vec![0f32; n];
    crate::pq::assign_nearest(&points, &table, &mut index, &mut partial)?;
    Ok((Tensor::from_vec(index, n, sub.device())?, ()))
}
