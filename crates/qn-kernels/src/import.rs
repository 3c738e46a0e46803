//! The bridge back from `.qnz` records to quantized tensors — [`PqCodes`] or a
//! [`QuantizedTensor`] — without expanding the weight to `f32`: a model loaded this way computes
//! from its codes ([`crate::pq::PqMatmul`], [`crate::scalar::ScalarMatmul`]).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_kernels::{export, import::{coded_tensor, CodedTensor}, scalar};
//!
//! let w = Tensor::randn(0f32, 1.0, (8, 16), &Device::Cpu)?;
//! let q = scalar::quantize(&w, &scalar::observe(&w, &scalar::ScalarConfig::int4())?)?;
//! let mut file = qn_format::Writer::new();
//! file.add("w", w.dims(), &export::scalar_payload(&q)?).unwrap();
//! let mut bytes = Vec::new();
//! file.write_to(&mut bytes).unwrap();
//! let r = qn_format::Reader::from_bytes(&bytes).unwrap();
//! let view = r.tensor("w").unwrap();
//! let Some(CodedTensor::Scalar(back)) =
//!     coded_tensor("w", &view.entry.shape, view.codes().unwrap(), &Device::Cpu)?
//! else { unreachable!() };
//! let same = (scalar::dequantize(&back)? - scalar::dequantize(&q)?)?.abs()?.max_all()?;
//! assert_eq!(same.to_scalar::<f32>()?, 0.0);
//! # Ok::<(), qn_kernels::Error>(())
//! ```

use candle_core::{Device, Tensor};
use qn_format::{PqIndex, RecordCodes};

use crate::{
    layout::{BlockLayout, LayerKind},
    pq::{Assignments, PqCodes},
    scalar::{ObserverKind, ParamView, QParams, QuantizedTensor, ScalarConfig},
    Result,
};

/// A coded weight, as a record holds it.
#[derive(Debug, Clone)]
pub enum CodedTensor {
    /// Product-quantized.
    Pq(PqCodes),
    /// Int-N codes.
    Scalar(QuantizedTensor),
}

/// The record's codes as a quantized tensor of `shape` named `name` (errors name it), or `None`
/// for a raw record.
pub fn coded_tensor(
    name: &str,
    shape: &[usize],
    codes: RecordCodes,
    device: &Device,
) -> Result<Option<CodedTensor>> {
    match codes {
        RecordCodes::Raw => Ok(None),
        RecordCodes::Pq {
            layer,
            block_size,
            centroids,
            assignments,
        } => {
            let kind = match layer {
                qn_format::header::LayerKind::Linear => LayerKind::Linear,
                qn_format::header::LayerKind::Embedding => LayerKind::Embedding,
                qn_format::header::LayerKind::Conv2d => LayerKind::Conv2d,
            };
            let layout = BlockLayout::new(name, kind, shape, block_size)?;
            let k = centroids.len() / block_size;
            let centroids = Tensor::from_vec(centroids, (k, block_size), device)?;
            let assignments = match assignments {
                PqIndex::U8(v) => Assignments::U8(v),
                PqIndex::U16(v) => Assignments::U16(v),
            };
            Ok(Some(CodedTensor::Pq(
                PqCodes::new(centroids, assignments, layout).map_err(|e| e.for_tensor(name))?,
            )))
        }
        RecordCodes::Scalar {
            bits,
            scheme,
            granularity,
            scales,
            zero_points,
            codes,
        } => {
            let config = ScalarConfig {
                bits,
                scheme: scheme.into(),
                granularity: granularity.into(),
                observer: ObserverKind::MinMax,
            };
            config.validate().map_err(|e| e.for_tensor(name))?;
            let view = ParamView::new(name, shape, config.granularity)?;
            let param = view.param();
            let zero_point: Vec<f32> = zero_points.iter().map(|&z| z as f32).collect();
            Ok(Some(CodedTensor::Scalar(QuantizedTensor {
                codes: Tensor::from_vec(codes, shape, device)?,
                params: QParams {
                    scale: Tensor::from_vec(scales, &param, device)?,
                    zero_point: Tensor::from_vec(zero_point, &param, device)?,
                    view,
                    config,
                },
            })))
        }
    }
}
