//! Building a `.qnz` file: `Writer::new().with_metadata(..)`, `add` tensors, `write_to` / `write_file`.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;

use crate::header::{Encoding, Header, TensorEntry};
use crate::payload::Payload;
use crate::reader::TensorView;
use crate::{align_up, Error, Result, ALIGN, FORMAT_VERSION, MAGIC, MAX_TENSORS, PREAMBLE_LEN};

/// Collects tensors, then writes them as one file.
#[derive(Debug, Default)]
pub struct Writer {
    metadata: BTreeMap<String, String>,
    entries: Vec<TensorEntry>,
    records: Vec<Vec<u8>>,
    names: HashSet<String>,
    next_offset: u64,
    entropy_coding: bool,
}

impl Writer {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata key/value.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Also try rANS coding of PQ assignments, keeping it for each tensor whose record it makes
    /// smaller (see `docs/format.md`).
    pub fn with_entropy_coding(mut self, on: bool) -> Self {
        self.entropy_coding = on;
        self
    }

    /// Validates and serialises one tensor; names must be unique.
    pub fn add(&mut self, name: &str, shape: &[usize], payload: &Payload) -> Result<()> {
        self.check_name(name)?;
        let record = payload.to_record(name, shape)?;
        let numel: u64 = shape.iter().map(|&d| d as u64).product();
        if numel > crate::MAX_EXPANSION * record.len() as u64 {
            return Err(Error::Invalid {
                tensor: name.to_string(),
                reason: format!(
                    "{numel} values in a {}-byte record exceed the format's {} values per byte \
                     (use smaller PQ blocks)",
                    record.len(),
                    crate::MAX_EXPANSION
                ),
            });
        }
        let smaller = if self.entropy_coding {
            payload.smaller_rans_record(&record)
        } else {
            None
        };
        match smaller {
            Some((encoding, coded)) => self.push(name, shape, encoding, coded),
            None => self.push(name, shape, payload.encoding(), record),
        }
        Ok(())
    }

    /// Copies a tensor of another file unchanged (its record was validated when that file was read).
    pub fn add_record(&mut self, view: TensorView<'_>) -> Result<()> {
        self.check_name(&view.entry.name)?;
        self.push(
            &view.entry.name,
            &view.entry.shape,
            view.entry.encoding,
            view.record.to_vec(),
        );
        Ok(())
    }

    fn check_name(&self, name: &str) -> Result<()> {
        let invalid = |reason: &str| Error::Invalid {
            tensor: name.to_string(),
            reason: reason.to_string(),
        };
        if name.is_empty() || name.len() > crate::header::MAX_NAME_LEN {
            return Err(invalid("a name must have 1 to 4096 bytes"));
        }
        if self.names.contains(name) {
            return Err(invalid("is added twice"));
        }
        if self.entries.len() >= MAX_TENSORS {
            return Err(invalid("one tensor too many for a .qnz file"));
        }
        Ok(())
    }

    fn push(&mut self, name: &str, shape: &[usize], encoding: Encoding, record: Vec<u8>) {
        let offset = self.next_offset;
        self.next_offset = align_up(offset + record.len() as u64, ALIGN as u64);
        self.entries.push(TensorEntry {
            name: name.to_string(),
            shape: shape.to_vec(),
            encoding,
            offset,
            len: record.len() as u64,
            crc32: crc32fast::hash(&record),
        });
        self.names.insert(name.to_string());
        self.records.push(record);
    }

    /// Number of tensors added.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no tensor was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the file; returns the bytes written.
    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<u64> {
        let header = Header {
            metadata: self.metadata.clone(),
            tensors: self.entries.clone(),
        };
        let plain = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
        let json = {
            let mut enc = flate2::write::DeflateEncoder::new(
                Vec::with_capacity(plain.len() / 3),
                flate2::Compression::best(),
            );
            enc.write_all(&plain)?;
            enc.finish()?
        };
        let mut head = Vec::with_capacity(PREAMBLE_LEN + json.len() + 4 + ALIGN);
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        head.extend_from_slice(&(json.len() as u64).to_le_bytes());
        head.extend_from_slice(&json);
        head.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
        head.resize(align_up(head.len() as u64, ALIGN as u64) as usize, 0);
        w.write_all(&head)?;
        let mut written = head.len() as u64;
        let mut pos = 0u64;
        for (entry, record) in self.entries.iter().zip(&self.records) {
            let pad = (entry.offset - pos) as usize;
            w.write_all(&vec![0u8; pad])?;
            w.write_all(record)?;
            pos = entry.offset + entry.len;
            written += (pad + record.len()) as u64;
        }
        Ok(written)
    }

    /// Writes atomically (see [`write_atomic`]); on any error nothing is left at `path`.
    pub fn write_file(&self, path: &Path) -> Result<u64> {
        let mut n = 0;
        write_atomic(path, |f| {
            let mut w = std::io::BufWriter::new(f);
            n = self.write_to(&mut w)?;
            w.flush()
        })?;
        Ok(n)
    }
}

/// Creates `path` atomically: `fill` writes a temporary file in the same directory, which is synced
/// and renamed over `path`. On any error the temporary is removed and `path` is untouched.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("not a file path")))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
