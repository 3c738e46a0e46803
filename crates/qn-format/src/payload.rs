//! Tensor contents handed to the writer, and their serialisation into record bytes.

use half::f16;

use crate::bitpack::pack;
use crate::header::{
    record_parts, scalar_view, CodebookKind, Encoding, Granularity, LayerKind, RawDType, Scheme,
};
use crate::{Error, Result};

/// A PQ codebook, `k` centroids of the tensor's block size.
#[derive(Debug, Clone, PartialEq)]
pub enum Codebook {
    /// Full precision.
    F32(Vec<f32>),
    /// Half precision (the default: codebooks are small, f16 loses nothing measurable).
    F16(Vec<f16>),
    /// `value = scale * q` with `q` in -127..=127 (the paper's iPQ + int8).
    Int8 {
        /// The shared scale.
        scale: f32,
        /// Quantized centroid values.
        values: Vec<i8>,
    },
}

impl Codebook {
    /// Stores f32 centroids as `kind` (int8 uses the symmetric scale `max|c| / 127`).
    pub fn from_f32(values: &[f32], kind: CodebookKind) -> Self {
        match kind {
            CodebookKind::F32 => Codebook::F32(values.to_vec()),
            CodebookKind::F16 => Codebook::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            CodebookKind::Int8 => {
                let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                let values = values
                    .iter()
                    .map(|&v| (v / scale).round().clamp(-127.0, 127.0) as i8)
                    .collect();
                Codebook::Int8 { scale, values }
            }
        }
    }

    /// The storage kind.
    pub fn kind(&self) -> CodebookKind {
        match self {
            Codebook::F32(_) => CodebookKind::F32,
            Codebook::F16(_) => CodebookKind::F16,
            Codebook::Int8 { .. } => CodebookKind::Int8,
        }
    }

    /// Number of stored values (`K * d`).
    pub fn len(&self) -> usize {
        match self {
            Codebook::F32(v) => v.len(),
            Codebook::F16(v) => v.len(),
            Codebook::Int8 { values, .. } => values.len(),
        }
    }

    /// Whether the codebook is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The centroids as f32, as the decoder sees them.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Codebook::F32(v) => v.clone(),
            Codebook::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Codebook::Int8 { scale, values } => values.iter().map(|&q| q as f32 * scale).collect(),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Codebook::F32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Codebook::F16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Codebook::Int8 { scale, values } => {
                out.extend_from_slice(&scale.to_le_bytes());
                out.extend(values.iter().map(|&q| q as u8));
            }
        }
    }
}

/// What a tensor holds, before packing.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// Elements stored unchanged (little-endian bytes of `dtype`).
    Raw {
        /// Element type.
        dtype: RawDType,
        /// `numel * dtype.size()` little-endian bytes.
        bytes: Vec<u8>,
    },
    /// Int-N codes.
    Scalar {
        /// Bits per code, 2..=8.
        bits: u8,
        /// Grid placement.
        scheme: Scheme,
        /// Parameter sharing.
        granularity: Granularity,
        /// One code per element, in row-major order, each `< 2^bits`.
        codes: Vec<u8>,
        /// One scale per parameter slot.
        scales: Vec<f32>,
        /// One zero point per parameter slot.
        zero_points: Vec<u8>,
    },
    /// Product-quantized weight.
    Pq {
        /// Layer kind.
        layer: LayerKind,
        /// Sub-vector dimension.
        block_size: usize,
        /// Number of centroids.
        k: usize,
        /// `k * block_size` values.
        codebook: Codebook,
        /// One index per sub-vector, order `j = b * rows + o`.
        assignments: Vec<u16>,
    },
}

impl Payload {
    /// f32 values stored raw.
    pub fn raw_f32(values: &[f32]) -> Self {
        Payload::Raw {
            dtype: RawDType::F32,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The header encoding of this payload.
    pub fn encoding(&self) -> Encoding {
        match self {
            Payload::Raw { dtype, .. } => Encoding::Raw { dtype: *dtype },
            Payload::Scalar {
                bits,
                scheme,
                granularity,
                ..
            } => Encoding::Scalar {
                bits: *bits,
                scheme: *scheme,
                granularity: *granularity,
            },
            Payload::Pq {
                layer,
                block_size,
                k,
                codebook,
                ..
            } => Encoding::Pq {
                layer: *layer,
                block_size: *block_size,
                k: *k,
                codebook: codebook.kind(),
                rans_words: None,
            },
        }
    }

    /// The rANS form of a PQ payload's record, when it is smaller than the bit-packed `packed`.
    pub(crate) fn smaller_rans_record(&self, packed: &[u8]) -> Option<(Encoding, Vec<u8>)> {
        let Payload::Pq {
            k,
            codebook,
            assignments,
            ..
        } = self
        else {
            return None;
        };
        let (probs, words) = crate::entropy::encode(assignments, *k)?;
        let mut codebook_bytes = Vec::new();
        codebook.write(&mut codebook_bytes);
        let len = codebook_bytes.len() + 4 * probs.len() + 4 * words.len();
        // Only a form every reader accepts: smaller than packing, within the expansion limit, and
        // as long as its model's entropy says (docs/format.md, "Validation").
        let numel = (assignments.len() * (codebook.len() / *k)) as u64;
        if len >= packed.len()
            || numel > crate::MAX_EXPANSION * len as u64
            || ((32 * words.len()) as f64)
                < crate::entropy::min_stream_bits(&probs, assignments.len())
        {
            return None;
        }
        let mut out = codebook_bytes;
        out.reserve(len - out.len());
        probs
            .iter()
            .chain(&words)
            .for_each(|w| out.extend_from_slice(&w.to_le_bytes()));
        let Encoding::Pq {
            layer,
            block_size,
            k,
            codebook,
            ..
        } = self.encoding()
        else {
            unreachable!("a PQ payload has a PQ encoding")
        };
        Some((
            Encoding::Pq {
                layer,
                block_size,
                k,
                codebook,
                rans_words: Some(words.len()),
            },
            out,
        ))
    }

    /// Validates against `shape` and serialises the record.
    pub(crate) fn to_record(&self, name: &str, shape: &[usize]) -> Result<Vec<u8>> {
        let invalid = |reason: String| Error::Invalid {
            tensor: name.to_string(),
            reason,
        };
        let parts = record_parts(shape, &self.encoding()).map_err(invalid)?;
        let total: usize = parts.iter().map(|(_, n)| n).sum();
        let n = crate::header::numel(shape).map_err(invalid)?;
        let mut out = Vec::with_capacity(total);
        match self {
            Payload::Raw { dtype, bytes } => {
                if bytes.len() != n * dtype.size() {
                    return Err(invalid(format!(
                        "{} bytes for {n} {dtype:?} elements",
                        bytes.len()
                    )));
                }
                out.extend_from_slice(bytes);
            }
            Payload::Scalar {
                bits,
                granularity,
                codes,
                scales,
                zero_points,
                ..
            } => {
                let (_, param) = scalar_view(shape, *granularity).map_err(invalid)?;
                let n_params: usize = param.iter().product();
                if codes.len() != n || scales.len() != n_params || zero_points.len() != n_params {
                    return Err(invalid(format!(
                        "{} codes, {} scales, {} zero points for {n} elements and {n_params} parameter slots",
                        codes.len(),
                        scales.len(),
                        zero_points.len()
                    )));
                }
                let qmax = (1u16 << bits) - 1;
                if let Some(c) = codes.iter().find(|&&c| c as u16 > qmax) {
                    return Err(invalid(format!("code {c} does not fit {bits} bits")));
                }
                if let Some(z) = zero_points.iter().find(|&&z| z as u16 > qmax) {
                    return Err(invalid(format!("zero point {z} does not fit {bits} bits")));
                }
                if let Some(s) = scales.iter().find(|s| !s.is_finite() || **s <= 0.0) {
                    return Err(invalid(format!(
                        "scale {s} is not a positive finite number"
                    )));
                }
                scales
                    .iter()
                    .for_each(|s| out.extend_from_slice(&s.to_le_bytes()));
                out.extend_from_slice(zero_points);
                let wide: Vec<u16> = codes.iter().map(|&c| c as u16).collect();
                out.extend_from_slice(&pack(&wide, *bits as u32));
            }
            Payload::Pq {
                layer,
                block_size,
                k,
                codebook,
                assignments,
            } => {
                let (_, _, n_sub, bits) =
                    crate::header::pq_geometry(shape, *layer, *block_size, *k).map_err(invalid)?;
                if codebook.len() != k * block_size {
                    return Err(invalid(format!(
                        "codebook holds {} values, {k} x {block_size} expected",
                        codebook.len()
                    )));
                }
                if assignments.len() != n_sub {
                    return Err(invalid(format!(
                        "{} assignments for {n_sub} sub-vectors",
                        assignments.len()
                    )));
                }
                if let Some(a) = assignments.iter().find(|&&a| a as usize >= *k) {
                    return Err(invalid(format!(
                        "assignment {a} is out of range for {k} centroids"
                    )));
                }
                if let Some(v) = codebook.to_f32().iter().find(|v| !v.is_finite()) {
                    return Err(invalid(format!("codebook value {v} is not finite")));
                }
                if let Codebook::Int8 { scale, .. } = codebook {
                    if !scale.is_finite() || *scale <= 0.0 {
                        return Err(invalid(format!(
                            "int8 codebook scale {scale} is not positive and finite"
                        )));
                    }
                }
                codebook.write(&mut out);
                out.extend_from_slice(&pack(assignments, bits));
            }
        }
        debug_assert_eq!(out.len(), total);
        Ok(out)
    }
}
