//! The bridge from quantized tensors to `.qnz` records ([`qn_format::Payload`]).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_kernels::{export, scalar};
//!
//! let w = Tensor::randn(0f32, 1.0, (8, 16), &Device::Cpu)?;
//! let q = scalar::quantize(&w, &scalar::observe(&w, &scalar::ScalarConfig::int4())?)?;
//! let mut file = qn_format::Writer::new();
//! file.add("w", w.dims(), &export::scalar_payload(&q)?).unwrap();
//! # Ok::<(), qn_kernels::Error>(())
//! ```

use candle_core::DType;
use qn_format::{header::CodebookKind, Codebook, Payload};

use crate::{layout::LayerKind, pq::PqCodes, scalar::QuantizedTensor, Result};

/// Int-N codes, scales and zero points as a scalar record.
pub fn scalar_payload(q: &QuantizedTensor) -> Result<Payload> {
    let flat = |t: &candle_core::Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
    Ok(Payload::Scalar {
        bits: q.params.config.bits,
        scheme: q.params.config.scheme.into(),
        granularity: q.params.config.granularity.into(),
        codes: q.codes.flatten_all()?.to_vec1::<u8>()?,
        scales: flat(&q.params.scale)?,
        zero_points: flat(&q.params.zero_point)?
            .iter()
            .map(|&z| z as u8)
            .collect(),
    })
}

/// The format's name for a layer kind.
pub fn format_layer_kind(kind: LayerKind) -> qn_format::header::LayerKind {
    match kind {
        LayerKind::Linear => qn_format::header::LayerKind::Linear,
        LayerKind::Embedding => qn_format::header::LayerKind::Embedding,
        LayerKind::Conv2d => qn_format::header::LayerKind::Conv2d,
    }
}

/// Centroids (stored as `codebook`) and assignments as a PQ record.
pub fn pq_payload(codes: &PqCodes, codebook: CodebookKind) -> Result<Payload> {
    let centroids = codes
        .centroids
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(Payload::Pq {
        layer: format_layer_kind(codes.layout.kind()),
        block_size: codes.layout.block_size(),
        k: codes.k(),
        codebook: Codebook::from_f32(&centroids, codebook),
        assignments: codes
            .assignments
            .to_u32()
            .iter()
            .map(|&a| a as u16)
            .collect(),
    })
}
