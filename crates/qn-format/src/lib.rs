//! # qn-format — the packed `.qnz` compressed-model format
//!
//! A `.qnz` file holds a model's tensors, each raw, scalar int-N (bit-packed at exactly N bits) or
//! product-quantized (codebook + bit-packed assignments). Its size is the compressed model's size:
//! no int64 assignments, no padding beyond 64-byte alignment. This crate depends on no tensor library;
//! the bridge from candle tensors lives in the crates above it. The full spec is `docs/format.md`.
//!
//! ```text
//! offset 0   ┌──────────────────────────────────────────────┐
//!            │ magic  b"QNZ\0"                     4 bytes  │
//!            │ format version (u32 LE) = 2         4 bytes  │
//!            │ header length N (u64 LE)            8 bytes  │
//! 16         ├──────────────────────────────────────────────┤
//!            │ header, N bytes: UTF-8 JSON compressed with  │
//!            │ raw DEFLATE (RFC 1951; version 1: the JSON   │
//!            │ as is) {"metadata": {..}, "tensors": [{name, │
//!            │   shape, encoding, offset, len, crc32}, ..]} │
//! 16+N       ├──────────────────────────────────────────────┤
//!            │ CRC-32 of the header (u32 LE)       4 bytes  │
//!            │ zero padding to a multiple of 64             │
//! data start ├──────────────────────────────────────────────┤
//!            │ record 0 at data start + offset (64-aligned) │
//!            │ zero padding to 64                           │
//!            │ record 1 ...                                 │
//!            │ (the file ends with the last record)         │
//!            └──────────────────────────────────────────────┘
//! ```
//!
//! ```
//! use qn_format::{Reader, Writer, Payload, Codebook, header::{LayerKind, CodebookKind}};
//!
//! let mut w = Writer::new().with_metadata("producer", "doctest");
//! w.add("bias", &[4], &Payload::raw_f32(&[0.1, 0.2, 0.3, 0.4]))?;
//! // A (2, 4) Linear weight in blocks of 2 with 2 centroids: [1, 1] and [2, 2].
//! w.add("fc.weight", &[2, 4], &Payload::Pq {
//!     layer: LayerKind::Linear, block_size: 2, k: 2,
//!     codebook: Codebook::from_f32(&[1., 1., 2., 2.], CodebookKind::F16),
//!     assignments: vec![0, 1, 1, 0],
//! })?;
//! let mut bytes = Vec::new();
//! w.write_to(&mut bytes)?;
//!
//! let r = Reader::from_bytes(&bytes)?;
//! assert_eq!(r.tensor("fc.weight")?.decode_f32()?, vec![1., 1., 2., 2., 2., 2., 1., 1.]);
//! let ledger = r.ledger();
//! assert_eq!(ledger.file_bytes, ledger.header_bytes + ledger.padding_bytes + ledger.record_bytes());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bitpack;
mod codes;
pub mod decode;
mod entropy;
mod error;
pub mod header;
pub mod ledger;
mod payload;
mod reader;
mod writer;

pub use codes::{PqIndex, RecordCodes};
pub(crate) use error::corrupt;
pub use error::{Error, Result};
pub use header::{Encoding, Header, TensorEntry};
pub use ledger::{Ledger, LedgerEntry};
pub use payload::{Codebook, Payload};
pub use reader::{ExactRow, Reader, TensorView, EXACT_ROW_KEY, EXACT_ROW_SUFFIX, SOURCE_DTYPE_KEY};
pub use writer::{write_atomic, Writer};

/// The first four bytes of every `.qnz` file.
pub const MAGIC: [u8; 4] = *b"QNZ\0";
/// The format version this crate writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 2;
/// The first version whose header is DEFLATE-compressed (the metadata carries a model's tokenizer
/// and config files: 19 % of an iPQ MiniLM file while they were stored as plain JSON).
pub const DEFLATED_HEADER_SINCE: u32 = 2;
/// Magic + version + header length.
pub const PREAMBLE_LEN: usize = 16;
/// Alignment of the data section and of every record.
pub const ALIGN: usize = 64;
/// Largest accepted JSON header (64 MiB), stored or inflated.
pub const MAX_HEADER_LEN: u64 = 64 << 20;
/// Most tensors in one file.
pub const MAX_TENSORS: usize = 1 << 20;
/// Most values a record may decode to per byte it holds: a file never makes a reader allocate what
/// it did not pay for. Bit-packed encodings imply their element count from their length (raw: at
/// most 1 value per byte; int2: 4; PQ with 1-bit assignments and `d`-dim blocks: `8·d`), so this
/// only refuses PQ blocks of more than 128 values at 1 bit, and rANS streams claiming more symbols
/// than they can hold. Writers refuse (or, for rANS, do not choose) what readers would refuse.
pub const MAX_EXPANSION: u64 = 1024;
/// Slack of the rANS length rule, in bits: a stream of `W` words must satisfy
/// `32·W + RANS_SLACK_BITS ≥ (1 − 2⁻⁶) · n · H`, where `H` is the entropy of its stored model over
/// the symbols it gives more than the minimum probability (see `docs/format.md`).
pub const RANS_SLACK_BITS: f64 = 128.0;

const _: () = assert!(PREAMBLE_LEN == MAGIC.len() + 4 + 8);

pub(crate) fn align_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}
