//! Fake-quantization, integer codes and dequantization as candle tensor ops (any device).

use candle_core::{DType, Tensor};

use super::QParams;
use crate::{Error, Result};

/// A tensor stored as integer codes: `value = (code - zero_point) * scale`.
#[derive(Debug, Clone)]
pub struct QuantizedTensor {
    /// `u8` codes in `qmin..=qmax`, the original shape.
    pub codes: Tensor,
    /// Scales and zero points.
    pub params: QParams,
}

pub(crate) fn check_shape(weight: &Tensor, params: &QParams) -> Result<()> {
    if weight.dims() != params.view.shape() {
        return Err(Error::shape(
            "weight",
            format!(
                "shape {:?} does not match the quantization parameters' shape {:?}",
                weight.dims(),
                params.view.shape()
            ),
        ));
    }
    Ok(())
}

/// Codes as `f32`, in the 3-D view: `clamp(round(x / scale) + zp, qmin, qmax)`.
fn codes_f32(weight: &Tensor, params: &QParams) -> Result<Tensor> {
    check_shape(weight, params)?;
    let v = weight.to_dtype(DType::F32)?.reshape(&params.view.view())?;
    let q = v
        .broadcast_div(&params.scale)?
        .round()?
        .broadcast_add(&params.zero_point)?
        .clamp(params.config.qmin() as f32, params.config.qmax() as f32)?;
    Ok(q)
}

fn from_codes_f32(q: &Tensor, params: &QParams) -> Result<Tensor> {
    Ok(q.broadcast_sub(&params.zero_point)?
        .broadcast_mul(&params.scale)?
        .reshape(params.view.shape())?)
}

/// Rounds `weight` onto the grid and back to `f32` (no gradient flows through the rounding; see
/// [`crate::noise::scalar_noise`] for the straight-through form).
pub fn fake_quantize(weight: &Tensor, params: &QParams) -> Result<Tensor> {
    let q = codes_f32(&weight.detach(), params)?;
    from_codes_f32(&q, params)
}

/// Quantizes `weight` to `u8` codes.
pub fn quantize(weight: &Tensor, params: &QParams) -> Result<QuantizedTensor> {
    let q = codes_f32(&weight.detach(), params)?;
    Ok(QuantizedTensor {
        codes: q.to_dtype(DType::U8)?.reshape(params.view.shape())?,
        params: params.clone(),
    })
}

/// Rebuilds `f32` values from codes.
pub fn dequantize(q: &QuantizedTensor) -> Result<Tensor> {
    let codes = q
        .codes
        .to_dtype(DType::F32)?
        .reshape(&q.params.view.view())?;
    from_codes_f32(&codes, &q.params)
}
