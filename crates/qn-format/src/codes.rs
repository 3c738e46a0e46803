//! A record's codes as stored — int-N codes with their scales, or a PQ codebook with its
//! assignments — without expanding them to `f32`: what a runtime that computes from the codes
//! (matmul from PQ lookup tables, dequantisation inside a GEMV) needs. The dense decoder reads its
//! records through the same parsers, so the two cannot disagree.
//!
//! ```
//! use qn_format::{Reader, Writer, Payload, Codebook, RecordCodes, PqIndex,
//!                 header::{LayerKind, CodebookKind}};
//!
//! let mut w = Writer::new();
//! w.add("fc.weight", &[2, 4], &Payload::Pq {
//!     layer: LayerKind::Linear, block_size: 2, k: 2,
//!     codebook: Codebook::from_f32(&[1., 1., 2., 2.], CodebookKind::F16),
//!     assignments: vec![0, 1, 1, 0],
//! })?;
//! let mut bytes = Vec::new();
//! w.write_to(&mut bytes)?;
//! let r = Reader::from_bytes(&bytes)?;
//! match r.tensor("fc.weight")?.codes()? {
//!     RecordCodes::Pq { centroids, assignments: PqIndex::U8(a), .. } => {
//!         assert_eq!(centroids, vec![1., 1., 2., 2.]);
//!         assert_eq!(a, vec![0, 1, 1, 0]);
//!     }
//!     _ => unreachable!(),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use half::f16;

use crate::bitpack::unpack;
use crate::header::{
    index_bits, pq_geometry, scalar_view, CodebookKind, Encoding, Granularity, LayerKind, Scheme,
};

/// Centroid indices in the narrowest integer that holds `K - 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PqIndex {
    /// `K <= 256`.
    U8(Vec<u8>),
    /// `K > 256`.
    U16(Vec<u16>),
}

impl PqIndex {
    /// Number of sub-vectors.
    pub fn len(&self) -> usize {
        match self {
            PqIndex::U8(v) => v.len(),
            PqIndex::U16(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a record holds, unexpanded.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordCodes {
    /// A raw record: nothing coded (decode it with [`crate::TensorView::decode_f32`]).
    Raw,
    /// Int-N codes: `value = (code - zero_point) * scale`, parameters laid out as
    /// [`scalar_view`] says.
    Scalar {
        /// Bits per code.
        bits: u8,
        /// Grid placement.
        scheme: Scheme,
        /// Parameter sharing.
        granularity: Granularity,
        /// One per parameter slot, positive and finite.
        scales: Vec<f32>,
        /// One per parameter slot.
        zero_points: Vec<u8>,
        /// One per element, row-major, each below `2^bits`.
        codes: Vec<u8>,
    },
    /// Product quantization: sub-vector `j = b * rows + o` (block `b` of row `o`) is centroid
    /// `assignments[j]`.
    Pq {
        /// Layer kind (how the shape is seen as rows x columns).
        layer: LayerKind,
        /// Sub-vector dimension `d`.
        block_size: usize,
        /// `K * d` finite values, centroid-major (an int8 codebook already scaled).
        centroids: Vec<f32>,
        /// Every index below `K`.
        assignments: PqIndex,
    },
}

/// A scalar record's scales, zero points and codes (one per element).
pub(crate) type ScalarParts = (Vec<f32>, Vec<u8>, Vec<u8>);

/// Parses a validated scalar record into its [`ScalarParts`].
pub(crate) fn parse_scalar(
    shape: &[usize],
    bits: u8,
    granularity: Granularity,
    record: &[u8],
) -> Result<ScalarParts, String> {
    let (view, param) = scalar_view(shape, granularity)?;
    let n_params: usize = param.iter().product();
    let numel: usize = view.iter().product();
    let scales: Vec<f32> = record[..4 * n_params]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(s) = scales.iter().find(|s| !s.is_finite() || **s <= 0.0) {
        return Err(format!("scale {s} is not a positive finite number"));
    }
    let zero_points = record[4 * n_params..5 * n_params].to_vec();
    let packed = &record[5 * n_params..];
    let codes = if bits == 8 {
        packed[..numel].to_vec()
    } else {
        let mut wide = vec![0u16; numel];
        unpack(packed, bits as u32, &mut wide);
        wide.into_iter().map(|c| c as u8).collect()
    };
    Ok((scales, zero_points, codes))
}

/// Parses a validated PQ record into (rows, cols, centroids, assignments); indices past `K` and
/// non-finite centroids are errors.
pub(crate) fn parse_pq(
    shape: &[usize],
    encoding: &Encoding,
    record: &[u8],
) -> Result<(usize, usize, Vec<f32>, PqIndex), String> {
    let Encoding::Pq {
        layer,
        block_size,
        k,
        codebook,
        rans_words,
    } = *encoding
    else {
        return Err("not a PQ record".into());
    };
    let (rows, cols, n_sub, bits) = pq_geometry(shape, layer, block_size, k)?;
    let entries = k * block_size;
    let (centroids, rest) = match codebook {
        CodebookKind::F32 => (
            record[..4 * entries]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<_>>(),
            &record[4 * entries..],
        ),
        CodebookKind::F16 => (
            record[..2 * entries]
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            &record[2 * entries..],
        ),
        CodebookKind::Int8 => {
            let scale = f32::from_le_bytes([record[0], record[1], record[2], record[3]]);
            (
                record[4..4 + entries]
                    .iter()
                    .map(|&q| q as i8 as f32 * scale)
                    .collect(),
                &record[4 + entries..],
            )
        }
    };
    if let Some(v) = centroids.iter().find(|v| !v.is_finite()) {
        return Err(format!("codebook value {v} is not finite"));
    }
    debug_assert_eq!(bits, index_bits(k));
    let wide = if rans_words.is_some() {
        let words: Vec<u32> = rest
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (probs, words) = words.split_at(k);
        let mut idx = vec![0u16; n_sub];
        crate::entropy::decode(probs, words, &mut idx)?;
        idx
    } else if bits == 8 {
        // Every byte is below K = 256: nothing to check, nothing to widen.
        if k == 256 {
            return Ok((rows, cols, centroids, PqIndex::U8(rest[..n_sub].to_vec())));
        }
        rest[..n_sub].iter().map(|&a| a as u16).collect()
    } else {
        let mut idx = vec![0u16; n_sub];
        unpack(rest, bits, &mut idx);
        idx
    };
    if let Some(a) = wide.iter().find(|&&a| a as usize >= k) {
        return Err(format!("assignment {a} is out of range for {k} centroids"));
    }
    let assignments = if k <= 256 {
        PqIndex::U8(wide.into_iter().map(|a| a as u8).collect())
    } else {
        PqIndex::U16(wide)
    };
    Ok((rows, cols, centroids, assignments))
}

/// The codes of a validated record.
pub(crate) fn record_codes(
    shape: &[usize],
    encoding: &Encoding,
    record: &[u8],
) -> Result<RecordCodes, String> {
    match *encoding {
        Encoding::Raw { .. } => Ok(RecordCodes::Raw),
        Encoding::Scalar {
            bits,
            scheme,
            granularity,
        } => {
            let (scales, zero_points, codes) = parse_scalar(shape, bits, granularity, record)?;
            Ok(RecordCodes::Scalar {
                bits,
                scheme,
                granularity,
                scales,
                zero_points,
                codes,
            })
        }
        Encoding::Pq {
            layer, block_size, ..
        } => {
            let (_, _, centroids, assignments) = parse_pq(shape, encoding, record)?;
            Ok(RecordCodes::Pq {
                layer,
                block_size,
                centroids,
                assignments,
            })
        }
    }
}
