//! Reading a `.qnz` file: everything is validated before anything is allocated from its numbers.

use std::collections::HashSet;
use std::path::Path;

use crate::decode::decode_record;
use crate::header::{numel, record_parts, CodebookKind, Encoding, Header, Part, TensorEntry};
use crate::ledger::{Ledger, LedgerEntry};
use crate::{
    align_up, corrupt, Error, Result, ALIGN, FORMAT_VERSION, MAGIC, MAX_HEADER_LEN, MAX_TENSORS,
    PREAMBLE_LEN,
};

/// A validated `.qnz` file over any bytes (a memory map, a `Vec<u8>`, a slice).
#[derive(Debug)]
pub struct Reader<B: AsRef<[u8]>> {
    bytes: B,
    header: Header,
    header_bytes: usize,
    data_start: usize,
}

/// One tensor of a file: its entry and its record's bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// The header entry.
    pub entry: &'a TensorEntry,
    /// The record (CRC already checked).
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
            .map_err(|e| corrupt(format!("tensor `{}`: {e}", self.entry.name)))
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
            Error::Corrupt(m) => Error::Corrupt(format!("{}: {m}", path.display())),
            Error::NewerVersion { .. } => Error::Corrupt(format!("{}: {e}", path.display())),
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
        Ok(Self {
            bytes,
            header,
            header_bytes,
            data_start,
        })
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
        let entry = self
            .header
            .tensors
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        Ok(self.view(entry))
    }

    /// Every tensor, in file order.
    pub fn views(&self) -> impl Iterator<Item = TensorView<'_>> {
        self.header.tensors.iter().map(|e| self.view(e))
    }

    fn view<'s>(&'s self, entry: &'s TensorEntry) -> TensorView<'s> {
        let start = self.data_start + entry.offset as usize;
        TensorView {
            entry,
            record: &self.bytes.as_ref()[start..start + entry.len as usize],
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

fn parse(bytes: &[u8]) -> Result<(Header, usize, usize)> {
    let len = bytes.len();
    if len < PREAMBLE_LEN {
        return Err(corrupt(format!(
            "{len} bytes, shorter than the {PREAMBLE_LEN}-byte preamble"
        )));
    }
    if bytes[..4] != MAGIC {
        return Err(corrupt(format!(
            "magic {:?} is not {:?}: not a .qnz file",
            &bytes[..4],
            MAGIC
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
    let json = &bytes[PREAMBLE_LEN..header_end];
    let stored = u32::from_le_bytes(bytes[header_end..crc_end].try_into().unwrap());
    if crc32fast::hash(json) != stored {
        return Err(corrupt("header checksum mismatch"));
    }
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
