//! # qn-format — the packed compressed-model file format
//!
//! This crate will hold the reader and writer of `.qnz` files: raw, scalar int-N and product-quantized
//! tensor records with per-record checksums, validated before any allocation. It depends on no tensor
//! library, so a loader can be written against it alone; the bridge from candle tensors lives in the
//! crates above it.
//!
//! Status: the codec is specified by the format issue and is not written yet; this crate currently
//! only exports its version constant so that the layering can be built and checked.
//!
//! ```
//! assert_eq!(qn_format::FORMAT_VERSION, 1);
//! ```

/// The format version a reader of this crate accepts; files of a newer version are refused.
pub const FORMAT_VERSION: u32 = 1;
