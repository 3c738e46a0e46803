//! Where the bytes of a file go.

use serde::Serialize;

/// Size accounting of one tensor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerEntry {
    /// Tensor name.
    pub name: String,
    /// `raw f32`, `int4`, `pq d=8 K=256 f16`, ...
    pub method: String,
    /// Logical shape.
    pub shape: Vec<usize>,
    /// Elements.
    pub numel: u64,
    /// Bytes of the record (index + codebook + raw).
    pub bytes: u64,
    /// Bytes of codes / assignments.
    pub index_bytes: u64,
    /// Bytes of codebook or scales and zero points.
    pub codebook_bytes: u64,
    /// Bytes stored unchanged.
    pub raw_bytes: u64,
    /// `8 * bytes / numel`.
    pub bits_per_weight: f64,
}

/// Size accounting of a file: `file_bytes = header_bytes + padding_bytes + sum(entries.bytes)`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ledger {
    /// One entry per tensor, in file order.
    pub entries: Vec<LedgerEntry>,
    /// The file's size.
    pub file_bytes: u64,
    /// Preamble (16) + JSON header + header CRC (4).
    pub header_bytes: u64,
    /// Zero bytes aligning the data section and each record to 64.
    pub padding_bytes: u64,
}

impl Ledger {
    /// Sum of the records' bytes.
    pub fn record_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }
}
