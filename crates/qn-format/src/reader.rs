//! Reading a `.qnz` file: everything is validated before anything is allocated from its numbers.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::codes::{record_codes, RecordCodes};
use crate::decode::decode_record;
use crate::header::{
    numel, pq_geometry, record_parts, CodebookKind, Encoding, Header, Part, RawDType, TensorEntry,
};
use crate::ledger::{Ledger, LedgerEntry};
use crate::{
    align_up, corrupt, Error, Result, ALIGN, FORMAT_VERSION, MAGIC, MAX_EXPANSION, MAX_HEADER_LEN,
    MAX_TENSORS, PREAMBLE_LEN,
};

/// Metadata key prefix of the exact-row convention (`exact_row:<tensor>` = row index).
pub const EXACT_ROW_KEY: &str = "exact_row:";
/// Name suffix of the raw tensor holding a quantized tensor's exact row.
pub const EXACT_ROW_SUFFIX: &str = ".exact_row";
/// Metadata key prefix of the source-dtype convention (`dtype:<tensor>` = `f32`, `f16` or `bf16`):
/// the dtype the tensor had before it was quantized, which decoders give it back in.
pub const SOURCE_DTYPE_KEY: &str = "dtype:";

/// A validated `.qnz` file over any bytes (a memory map, a `Vec<u8>`, a slice).
#[derive(Debug)]
pub struct Reader<B: AsRef<[u8]>> {
    bytes: B,
    header: Header,
    header_bytes: usize,
    data_start: usize,
    /// Tensor index → (exact row, index of the raw tensor holding it).
    exact_rows: HashMap<usize, (usize, usize)>,
    /// Indices of the `.exact_row` side tensors.
    companions: HashSet<usize>,
}

/// One tensor of a file: its entry and its record's bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// The header entry.
    pub entry: &'a TensorEntry,
    /// The record (CRC already checked).
    pub record: &'a [u8],
    /// The row this tensor keeps exactly (`exact_row:` convention), applied by the decoders.
    pub exact_row: Option<ExactRow<'a>>,
}

/// A row stored exactly beside a quantized tensor (an embedding's padding row).
#[derive(Debug, Clone, Copy)]
pub struct ExactRow<'a> {
    /// The row index.
    pub row: usize,
    /// The raw tensor holding the row (`<tensor>.exact_row`, shape `[cols]`).
    pub entry: &'a TensorEntry,
    /// Its record.
    pub record: &'a [u8],
}

impl TensorView<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.entry.shape.iter().product()
    }

    /// Decodes into `out` (`numel` values, row-major).
    pub fn decode_into(&self, out: &mut [f32]) -> Result<()> {
        if out.len() != self.numel() {
            return Err(Error::Invalid {
                tensor: self.entry.name.clone(),
                reason: format!(
                    "output holds {} values, the tensor {}",
                    out.len(),
                    self.numel()
                ),
            });
        }
        decode_record(&self.entry.shape, &self.entry.encoding, self.record, out)
            .map_err(|e| corrupt(format!("tensor `{}`: {e}", self.entry.name)))?;
        if let Some(x) = &self.exact_row {
            // Validated at open: the side tensor is raw float with one row's worth of values.
            let cols = x.entry.shape[0];
            decode_record(
                &x.entry.shape,
                &x.entry.encoding,
                x.record,
                &mut out[x.row * cols..(x.row + 1) * cols],
            )
            .map_err(|e| corrupt(format!("tensor `{}`: {e}", x.entry.name)))?;
        }
        Ok(())
    }

    /// The record's codes without expanding them (scalar codes and scales, or a PQ codebook and
    /// its assignments); [`RecordCodes::Raw`] for a raw record. The exact row, if any, is not
    /// applied: it is [`Self::exact_row`]'s to read.
    pub fn codes(&self) -> Result<RecordCodes> {
        record_codes(&self.entry.shape, &self.entry.encoding, self.record)
            .map_err(|e| corrupt(format!("tensor `{}`: {e}", self.entry.name)))
    }

    /// The exact row's index and values, when the tensor keeps one.
    pub fn exact_row_values(&self) -> Result<Option<(usize, Vec<f32>)>> {
        let Some(x) = &self.exact_row else {
            return Ok(None);
        };
        let mut values = vec![0f32; x.entry.shape[0]];
        decode_record(&x.entry.shape, &x.entry.encoding, x.record, &mut values)
            .map_err(|e| corrupt(format!("tensor `{}`: {e}", x.entry.name)))?;
        Ok(Some((x.row, values)))
    }

    /// Decodes to a new `f32` vector.
    pub fn decode_f32(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.numel()];
        self.decode_into(&mut out)?;
        Ok(out)
    }
}

impl Reader<memmap2::Mmap> {
    /// Maps and validates the file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath by another process can give wrong
        // bytes, which the per-record CRCs then report, but no undefined behaviour in safe code
        // reading a `&[u8]` of stable length.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Reader::new(map).map_err(|e| match e {
            Error::Corrupt(_) | Error::NewerVersion { .. } => Error::InFile {
                path: path.display().to_string(),
                error: Box::new(e),
            },
            other => other,
        })
    }
}

impl<'a> Reader<&'a [u8]> {
    /// Validates a file held in memory.
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Self> {
        Reader::new(bytes)
    }
}

impl<B: AsRef<[u8]>> Reader<B> {
    /// Validates `bytes`: preamble, header CRC and JSON, every entry's encoding, size, alignment and
    /// bounds, zero padding, no trailing bytes, and every record's CRC.
    pub fn new(bytes: B) -> Result<Self> {
        let (header, header_bytes, data_start) = parse(bytes.as_ref())?;
        let (exact_rows, companions) = metadata_conventions(&header)?;
        Ok(Self {
            bytes,
            header,
            header_bytes,
            data_start,
            exact_rows,
            companions,
        })
    }

    /// Whether `name` is the `.exact_row` side tensor of another tensor (decoders apply it to that
    /// tensor; a tool writing the decoded model leaves it out).
    pub fn is_exact_row_companion(&self, name: &str) -> bool {
        self.index(name)
            .is_some_and(|i| self.companions.contains(&i))
    }

    /// The dtype the tensor had before compression (`dtype:` convention), when recorded.
    pub fn source_dtype(&self, name: &str) -> Option<RawDType> {
        let v = self
            .header
            .metadata
            .get(&format!("{SOURCE_DTYPE_KEY}{name}"))?;
        parse_float_dtype(v)
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.header.tensors.iter().position(|e| e.name == name)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Entries in file order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.header.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let i = self
            .index(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        Ok(self.view(i))
    }

    /// Every tensor, in file order.
    pub fn views(&self) -> impl Iterator<Item = TensorView<'_>> {
        (0..self.header.tensors.len()).map(|i| self.view(i))
    }

    fn record(&self, entry: &TensorEntry) -> &[u8] {
        let start = self.data_start + entry.offset as usize;
        &self.bytes.as_ref()[start..start + entry.len as usize]
    }

    fn view(&self, i: usize) -> TensorView<'_> {
        let entry = &self.header.tensors[i];
        TensorView {
            entry,
            record: self.record(entry),
            exact_row: self.exact_rows.get(&i).map(|&(row, c)| {
                let entry = &self.header.tensors[c];
                ExactRow {
                    row,
                    entry,
                    record: self.record(entry),
                }
            }),
        }
    }

    /// Bytes per tensor and the overhead, adding up to the file size.
    pub fn ledger(&self) -> Ledger {
        let records: u64 = self.header.tensors.iter().map(|e| e.len).sum();
        let file_bytes = self.bytes.as_ref().len() as u64;
        Ledger {
            entries: self.header.tensors.iter().map(ledger_entry).collect(),
            file_bytes,
            header_bytes: self.header_bytes as u64,
            padding_bytes: file_bytes - self.header_bytes as u64 - records,
        }
    }
}

fn ledger_entry(e: &TensorEntry) -> LedgerEntry {
    let parts = record_parts(&e.shape, &e.encoding).expect("validated");
    let sum = |want: &[Part]| {
        parts
            .iter()
            .filter(|(p, _)| want.contains(p))
            .map(|(_, n)| *n as u64)
            .sum::<u64>()
    };
    let method = match e.encoding {
        Encoding::Raw { dtype } => format!("raw {dtype:?}").to_lowercase(),
        Encoding::Scalar { bits, .. } => format!("int{bits}"),
        Encoding::Pq {
            block_size,
            k,
            codebook,
            rans_words,
            ..
        } => {
            let codebook = match codebook {
                CodebookKind::F32 => "f32",
                CodebookKind::F16 => "f16",
                CodebookKind::Int8 => "int8",
            };
            let rans = if rans_words.is_some() { " rans" } else { "" };
            format!("pq d={block_size} K={k} {codebook}{rans}")
        }
    };
    let numel: usize = e.shape.iter().product();
    LedgerEntry {
        name: e.name.clone(),
        method,
        shape: e.shape.clone(),
        numel: numel as u64,
        bytes: e.len,
        index_bytes: sum(&[Part::Codes, Part::Assignments, Part::Probabilities]),
        codebook_bytes: sum(&[Part::Codebook, Part::Scales, Part::ZeroPoints]),
        raw_bytes: sum(&[Part::Data]),
        bits_per_weight: if numel > 0 {
            e.len as f64 * 8.0 / numel as f64
        } else {
            0.0
        },
    }
}

/// The JSON of a version-2 header, refusing one that inflates past [`MAX_HEADER_LEN`] (a
/// decompression bomb) before it is all in memory.
fn inflate_header(stored: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut json = Vec::new();
    flate2::read::DeflateDecoder::new(stored)
        .take(MAX_HEADER_LEN + 1)
        .read_to_end(&mut json)
        .map_err(|e| corrupt(format!("header: not DEFLATE data ({e})")))?;
    if json.len() as u64 > MAX_HEADER_LEN {
        return Err(corrupt(format!(
            "the header inflates past {MAX_HEADER_LEN} bytes"
        )));
    }
    Ok(json)
}

fn parse(bytes: &[u8]) -> Result<(Header, usize, usize)> {
    let len = bytes.len();
    if len < PREAMBLE_LEN {
        return Err(corrupt(format!(
            "{len} bytes, shorter than the {PREAMBLE_LEN}-byte preamble"
        )));
    }
    if bytes[..4] != MAGIC {
        return Err(corrupt(format!(
            "it starts with b\"{}\", not the magic b\"{}\": not a .qnz file",
            bytes[..4].escape_ascii(),
            MAGIC.escape_ascii()
        )));
    }
    let version = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
    if version == 0 {
        return Err(corrupt("format version 0 does not exist"));
    }
    if version > FORMAT_VERSION {
        return Err(Error::NewerVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let header_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    if header_len > MAX_HEADER_LEN {
        return Err(corrupt(format!(
            "header length {header_len} exceeds {MAX_HEADER_LEN}"
        )));
    }
    let header_end = PREAMBLE_LEN + header_len as usize;
    let crc_end = header_end + 4;
    if crc_end > len {
        return Err(corrupt(format!(
            "truncated: the header needs {crc_end} bytes, the file has {len}"
        )));
    }
    let stored_header = &bytes[PREAMBLE_LEN..header_end];
    let stored = u32::from_le_bytes(bytes[header_end..crc_end].try_into().unwrap());
    if crc32fast::hash(stored_header) != stored {
        return Err(corrupt("header checksum mismatch"));
    }
    let inflated;
    let json = if version >= crate::DEFLATED_HEADER_SINCE {
        inflated = inflate_header(stored_header)?;
        &inflated[..]
    } else {
        stored_header
    };
    let header: Header =
        serde_json::from_slice(json).map_err(|e| corrupt(format!("header: {e}")))?;
    let data_start = align_up(crc_end as u64, ALIGN as u64) as usize;
    if data_start > len {
        return Err(corrupt(format!(
            "truncated: the data section starts at {data_start}, the file has {len} bytes"
        )));
    }
    if bytes[crc_end..data_start].iter().any(|&b| b != 0) {
        return Err(corrupt("non-zero padding after the header"));
    }
    if header.tensors.len() > MAX_TENSORS {
        return Err(corrupt(format!(
            "{} tensors exceed {MAX_TENSORS}",
            header.tensors.len()
        )));
    }
    let data = &bytes[data_start..];
    let mut names = HashSet::with_capacity(header.tensors.len());
    let mut end = 0u64;
    for e in &header.tensors {
        let bad = |m: String| corrupt(format!("tensor `{}`: {m}", e.name));
        if e.name.is_empty() || e.name.len() > crate::header::MAX_NAME_LEN {
            return Err(corrupt(format!(
                "a tensor name has {} bytes (1..=4096 allowed)",
                e.name.len()
            )));
        }
        if !names.insert(e.name.as_str()) {
            return Err(bad("appears twice".into()));
        }
        numel(&e.shape).map_err(bad)?;
        let expect: usize = record_parts(&e.shape, &e.encoding)
            .map_err(bad)?
            .iter()
            .map(|(_, n)| n)
            .sum();
        if e.len != expect as u64 {
            return Err(bad(format!(
                "record length {} differs from the {expect} its encoding implies",
                e.len
            )));
        }
        let n = numel(&e.shape).map_err(bad)? as u64;
        if n > MAX_EXPANSION.saturating_mul(e.len) {
            return Err(bad(format!(
                "shape {:?} declares {n} values in a record of {} bytes, more than the \
                 {MAX_EXPANSION} values per byte any encoding holds",
                e.shape, e.len
            )));
        }
        if e.offset % ALIGN as u64 != 0 || e.offset < end {
            return Err(bad(format!(
                "offset {} is unaligned or overlaps the previous record (ends at {end})",
                e.offset
            )));
        }
        let rec_end = e
            .offset
            .checked_add(e.len)
            .ok_or_else(|| bad("offset + length overflows".into()))?;
        if rec_end > data.len() as u64 {
            return Err(bad(format!(
                "truncated: the record ends at {rec_end}, the data section has {} bytes",
                data.len()
            )));
        }
        if data[end as usize..e.offset as usize]
            .iter()
            .any(|&b| b != 0)
        {
            return Err(bad("non-zero padding before the record".into()));
        }
        let record = &data[e.offset as usize..rec_end as usize];
        if crc32fast::hash(record) != e.crc32 {
            return Err(bad("record checksum mismatch".into()));
        }
        check_rans_length(e, record).map_err(bad)?;
        end = rec_end;
    }
    if end != data.len() as u64 {
        return Err(corrupt(format!(
            "{} bytes after the last record",
            data.len() as u64 - end
        )));
    }
    Ok((header, crc_end, data_start))
}

/// An rANS record's stream must be as long as its own model says `n` symbols need (less the
/// documented slack): the record's length does not imply its element count, so this is what bounds
/// the count by what the file holds.
fn check_rans_length(e: &TensorEntry, record: &[u8]) -> std::result::Result<(), String> {
    let Encoding::Pq {
        layer,
        block_size,
        k,
        rans_words: Some(words),
        ..
    } = e.encoding
    else {
        return Ok(());
    };
    let (_, _, n_sub, _) = pq_geometry(&e.shape, layer, block_size, k)?;
    // The probabilities' place in the record, from the one definition of its parts.
    let mut start = 0;
    let mut probs = &record[..0];
    for (part, len) in record_parts(&e.shape, &e.encoding)? {
        if part == Part::Probabilities {
            probs = &record[start..start + len];
        }
        start += len;
    }
    let probs: Vec<u32> = probs
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let need = crate::entropy::min_stream_bits(&probs, n_sub);
    if ((32 * words) as f64) < need {
        return Err(format!(
            "its rANS stream of {words} words cannot hold {n_sub} assignments of its model \
             (at least {:.0} bits)",
            need
        ));
    }
    Ok(())
}

fn parse_float_dtype(v: &str) -> Option<RawDType> {
    match v {
        "f32" => Some(RawDType::F32),
        "f16" => Some(RawDType::F16),
        "bf16" => Some(RawDType::Bf16),
        _ => None,
    }
}

type Conventions = (HashMap<usize, (usize, usize)>, HashSet<usize>);

/// Checks the metadata conventions of `docs/format.md` against the tensor table, so that decoders
/// can apply them without further checks.
fn metadata_conventions(header: &Header) -> Result<Conventions> {
    let index: HashMap<&str, usize> = header
        .tensors
        .iter()
        .enumerate()
        .map(|(i, e)| (e.name.as_str(), i))
        .collect();
    let (mut rows, mut companions) = (HashMap::new(), HashSet::new());
    for (key, value) in &header.metadata {
        if let Some(name) = key.strip_prefix(EXACT_ROW_KEY) {
            let bad = |m: String| corrupt(format!("metadata `{key}`: {m}"));
            let &t = index
                .get(name)
                .ok_or_else(|| bad(format!("no tensor named `{name}`")))?;
            let side = format!("{name}{EXACT_ROW_SUFFIX}");
            let &c = index
                .get(side.as_str())
                .ok_or_else(|| bad(format!("no tensor named `{side}`")))?;
            let row: usize = value
                .parse()
                .map_err(|_| bad(format!("`{value}` is not a row index")))?;
            let shape = &header.tensors[t].shape;
            let rows_n = shape.first().copied().unwrap_or(0);
            let cols = shape
                .iter()
                .product::<usize>()
                .checked_div(rows_n)
                .unwrap_or(0);
            let side_entry = &header.tensors[c];
            let float = matches!(side_entry.encoding, Encoding::Raw { dtype } if dtype.is_float());
            if shape.len() < 2 || row >= rows_n || side_entry.shape != [cols] || !float {
                return Err(bad(format!(
                    "row {row} of shape {shape:?} does not match `{side}` ({:?} {:?})",
                    side_entry.shape, side_entry.encoding
                )));
            }
            rows.insert(t, (row, c));
            companions.insert(c);
        } else if let Some(name) = key.strip_prefix(SOURCE_DTYPE_KEY) {
            let bad = |m: String| corrupt(format!("metadata `{key}`: {m}"));
            if !index.contains_key(name) {
                return Err(bad(format!("no tensor named `{name}`")));
            }
            parse_float_dtype(value)
                .ok_or_else(|| bad(format!("`{value}` is not f32, f16 or bf16")))?;
        }
    }
    Ok((rows, companions))
}
