//! The JSON header: one entry per tensor, its encoding, and where its record lies.
//!
//! Also the geometry every encoding implies (part sizes, scalar parameter views, PQ sub-vector
//! order), shared by the writer, the reader's validation and the decoders, so that they cannot
//! disagree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bitpack::packed_len;

/// Highest rank of a stored tensor.
pub const MAX_RANK: usize = 8;
/// Most elements in one tensor (2^40).
pub const MAX_NUMEL: usize = 1 << 40;
/// Longest tensor name in bytes.
pub const MAX_NAME_LEN: usize = 4096;
/// Most centroids of a PQ tensor (the range of `u16` codes).
pub const MAX_CENTROIDS: usize = 1 << 16;

/// The header: free-form metadata and the tensor table.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// String key/values (producer, source model, config...).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Tensors in file order (increasing offsets).
    pub tensors: Vec<TensorEntry>,
}

/// One tensor of the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// Unique name (the state-dict key).
    pub name: String,
    /// Logical shape of the decoded tensor.
    pub shape: Vec<usize>,
    /// How the record encodes it.
    pub encoding: Encoding,
    /// Start of the record, in bytes from the start of the data section; a multiple of 64.
    pub offset: u64,
    /// Length of the record in bytes (exactly what the encoding implies).
    pub len: u64,
    /// CRC-32 (IEEE) of the record's bytes.
    pub crc32: u32,
}

/// Element types stored unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawDType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
    /// Signed 64-bit integers (e.g. position ids).
    I64,
    /// Signed 32-bit integers.
    I32,
    /// Bytes.
    U8,
}

impl RawDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            RawDType::F32 | RawDType::I32 => 4,
            RawDType::F16 | RawDType::Bf16 => 2,
            RawDType::I64 => 8,
            RawDType::U8 => 1,
        }
    }

    /// Whether the type is a float (decoded to `f32` by `decompress`).
    pub fn is_float(self) -> bool {
        matches!(self, RawDType::F32 | RawDType::F16 | RawDType::Bf16)
    }
}

/// Scalar grid placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    /// Free zero point.
    Affine,
    /// Zero point at `2^(bits-1)`.
    Symmetric,
}

/// Which elements share one (scale, zero point).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// One pair for the tensor.
    PerTensor,
    /// One pair per index along `axis`.
    PerChannel {
        /// The axis.
        axis: usize,
    },
    /// One pair per `size` consecutive elements of each row (`shape[0]` rows).
    PerGroup {
        /// Group length.
        size: usize,
    },
}

/// The layer a PQ weight belongs to (fixes its rank and block order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// `(out, in)`.
    Linear,
    /// `(num, dim)`.
    Embedding,
    /// `(out, in/groups, kh, kw)`.
    Conv2d,
}

/// How a PQ codebook is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodebookKind {
    /// `K*d` f32.
    F32,
    /// `K*d` f16 (the default).
    F16,
    /// One f32 scale, then `K*d` i8 (the paper's "iPQ + int8").
    Int8,
}

/// A tensor's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Encoding {
    /// Stored unchanged, little-endian.
    Raw {
        /// Element type.
        dtype: RawDType,
    },
    /// Int-N codes with per-tensor/channel/group scales and zero points.
    Scalar {
        /// Bits per code, 2..=8.
        bits: u8,
        /// Grid placement.
        scheme: Scheme,
        /// Parameter sharing.
        granularity: Granularity,
    },
    /// Product quantization.
    Pq {
        /// Layer kind.
        layer: LayerKind,
        /// Sub-vector dimension `d`.
        block_size: usize,
        /// Number of centroids `K`.
        k: usize,
        /// Codebook storage.
        codebook: CodebookKind,
        /// Absent: assignments bit-packed. Present: rANS-coded in this many 32-bit words (after a
        /// table of `k` symbol probabilities).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rans_words: Option<usize>,
    },
}

/// The parts of a record, in storage order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Raw elements.
    Data,
    /// f32 scales.
    Scales,
    /// u8 zero points.
    ZeroPoints,
    /// Bit-packed scalar codes.
    Codes,
    /// The PQ codebook.
    Codebook,
    /// PQ assignments: bit-packed, or rANS words.
    Assignments,
    /// rANS symbol probabilities (`k` u32, 24-bit fixed point).
    Probabilities,
}

/// The view `(a, b, c)` of a tensor for a granularity and the shape of its parameters (each dim the
/// view's or 1).
pub fn scalar_view(
    shape: &[usize],
    granularity: Granularity,
) -> Result<([usize; 3], [usize; 3]), String> {
    let numel = numel(shape)?;
    if numel == 0 {
        return Err(format!("shape {shape:?} is empty"));
    }
    Ok(match granularity {
        Granularity::PerTensor => ([1, 1, numel], [1, 1, 1]),
        Granularity::PerChannel { axis } => {
            if axis >= shape.len() {
                return Err(format!(
                    "channel axis {axis} is out of range for shape {shape:?}"
                ));
            }
            let pre = shape[..axis].iter().product();
            let post = shape[axis + 1..].iter().product();
            ([pre, shape[axis], post], [1, shape[axis], 1])
        }
        Granularity::PerGroup { size } => {
            let rows = if shape.len() >= 2 { shape[0] } else { 1 };
            let rest = numel / rows;
            if size == 0 || rest % size != 0 {
                return Err(format!(
                    "group size {size} does not divide the row length {rest} of shape {shape:?}"
                ));
            }
            ([rows, rest / size, size], [rows, rest / size, 1])
        }
    })
}

/// Element count with overflow and cap checks.
pub fn numel(shape: &[usize]) -> Result<usize, String> {
    if shape.len() > MAX_RANK {
        return Err(format!("rank {} exceeds {MAX_RANK}", shape.len()));
    }
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if n > MAX_NUMEL {
        return Err(format!(
            "shape {shape:?} has {n} elements, more than {MAX_NUMEL}"
        ));
    }
    Ok(n)
}

/// PQ geometry: `(rows, cols, n_subvectors, index_bits)`.
pub fn pq_geometry(
    shape: &[usize],
    layer: LayerKind,
    block_size: usize,
    k: usize,
) -> Result<(usize, usize, usize, u32), String> {
    let rank = match layer {
        LayerKind::Linear | LayerKind::Embedding => 2,
        LayerKind::Conv2d => 4,
    };
    if shape.len() != rank {
        return Err(format!(
            "a {layer:?} weight has rank {rank}, got shape {shape:?}"
        ));
    }
    let n = numel(shape)?;
    if n == 0 {
        return Err(format!("shape {shape:?} is empty"));
    }
    let rows = shape[0];
    let cols = n / rows;
    if block_size == 0 || !cols.is_multiple_of(block_size) {
        return Err(format!(
            "block size {block_size} does not divide the {cols} inputs per row of shape {shape:?}"
        ));
    }
    if k == 0 || k > MAX_CENTROIDS {
        return Err(format!("{k} centroids is outside 1..={MAX_CENTROIDS}"));
    }
    Ok((rows, cols, n / block_size, index_bits(k)))
}

/// Bits per PQ assignment: `ceil(log2 K)`, at least 1.
pub fn index_bits(k: usize) -> u32 {
    (usize::BITS - (k.max(2) - 1).leading_zeros()).max(1)
}

/// The parts and their byte sizes for a tensor of `shape` encoded as `encoding`.
pub fn record_parts(shape: &[usize], encoding: &Encoding) -> Result<Vec<(Part, usize)>, String> {
    let n = numel(shape)?;
    let overflow = || format!("record size of shape {shape:?} overflows");
    Ok(match *encoding {
        Encoding::Raw { dtype } => vec![(
            Part::Data,
            n.checked_mul(dtype.size()).ok_or_else(overflow)?,
        )],
        Encoding::Scalar {
            bits, granularity, ..
        } => {
            if !(2..=8).contains(&bits) {
                return Err(format!("{bits} bits is outside 2..=8"));
            }
            let (_, param) = scalar_view(shape, granularity)?;
            let n_params: usize = param.iter().product();
            vec![
                (Part::Scales, n_params * 4),
                (Part::ZeroPoints, n_params),
                (
                    Part::Codes,
                    packed_len(n, bits as u32).ok_or_else(overflow)?,
                ),
            ]
        }
        Encoding::Pq {
            layer,
            block_size,
            k,
            codebook,
            rans_words,
        } => {
            let (_, _, n_sub, bits) = pq_geometry(shape, layer, block_size, k)?;
            let entries = k.checked_mul(block_size).ok_or_else(overflow)?;
            let codebook = match codebook {
                CodebookKind::F32 => entries.checked_mul(4),
                CodebookKind::F16 => entries.checked_mul(2),
                CodebookKind::Int8 => entries.checked_add(4),
            }
            .ok_or_else(overflow)?;
            let packed = packed_len(n_sub, bits).ok_or_else(overflow)?;
            match rans_words {
                None => vec![(Part::Codebook, codebook), (Part::Assignments, packed)],
                Some(words) => {
                    // The writer keeps rANS only when it is smaller than packing.
                    let bytes = words
                        .checked_mul(4)
                        .and_then(|b| b.checked_add(k.checked_mul(4)?));
                    if words == 0 || bytes.is_none_or(|b| b > packed) {
                        return Err(format!(
                            "{words} rANS words is implausible for {n_sub} assignments"
                        ));
                    }
                    vec![
                        (Part::Codebook, codebook),
                        (Part::Probabilities, 4 * k),
                        (Part::Assignments, 4 * words),
                    ]
                }
            }
        }
    })
}
