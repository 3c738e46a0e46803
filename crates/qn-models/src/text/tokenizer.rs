//! `tokenizer.json` through the tokenizers crate: truncation to `max_len`, sentence pairs as the
//! tokenizer's post-processor builds them (RoBERTa's `<s> a </s></s> b </s>`, BERT's token types),
//! no padding (batches are padded to their longest row when packed).

use std::path::{Path, PathBuf};

use tokenizers::{PaddingParams, Tokenizer, TruncationParams, TruncationStrategy};

use super::TextExample;
use crate::{Error, Result};

/// A tokenizer with the run's truncation.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    pad_id: u32,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer({})", self.path.display())
    }
}

impl TextTokenizer {
    /// Reads `tokenizer.json`; `max_len` truncates every input (pairs longest-first), `None`
    /// keeps inputs whole (a model then refuses those beyond its positions). `pad_id` is the
    /// model's padding token.
    pub fn from_file(path: &Path, max_len: Option<usize>, pad_id: u32) -> Result<Self> {
        let inner = Tokenizer::from_file(path).map_err(|e| Error::file(path, e))?;
        Self::from_tokenizer(inner, path, max_len, pad_id)
    }

    /// From the bytes of `tokenizer.json` (as carried in a `.qnz`); `path` names errors.
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        max_len: Option<usize>,
        pad_id: u32,
    ) -> Result<Self> {
        let inner = Tokenizer::from_bytes(bytes).map_err(|e| Error::file(path, e))?;
        Self::from_tokenizer(inner, path, max_len, pad_id)
    }

    fn from_tokenizer(
        mut inner: Tokenizer,
        path: &Path,
        max_len: Option<usize>,
        pad_id: u32,
    ) -> Result<Self> {
        if max_len == Some(0) {
            return Err(Error::Input("--max-len must be at least 1".into()));
        }
        let trunc = max_len.map(|m| TruncationParams {
            max_length: m,
            strategy: TruncationStrategy::LongestFirst,
            ..Default::default()
        });
        inner
            .with_truncation(trunc)
            .map_err(|e| Error::file(path, format!("truncation: {e}")))?;
        inner.with_padding(None::<PaddingParams>);
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            pad_id,
        })
    }

    /// The padding id batches are padded with.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Ids and token types of one text or pair.
    pub fn encode(&self, text: &str, pair: Option<&str>) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = match pair {
            None => self.inner.encode(text, true),
            Some(p) => self.inner.encode((text, p), true),
        }
        .map_err(|e| Error::Input(format!("tokenizer {}: {e}", self.path.display())))?;
        if enc.get_ids().is_empty() {
            return Err(Error::Input(format!(
                "tokenizer {} gives no tokens for {text:?}",
                self.path.display()
            )));
        }
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    /// Every example, in order (in parallel).
    pub fn encode_examples(&self, examples: &[TextExample]) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        use rayon_free::par_map;
        par_map(examples, |e| self.encode(&e.text, e.pair.as_deref()))
    }
}

mod rayon_free {
    /// Maps in chunks on scoped threads (tokenization is the slow part of reading a dataset).
    pub fn par_map<T: Sync, U: Send, E: Send>(
        items: &[T],
        f: impl Fn(&T) -> Result<U, E> + Sync,
    ) -> Result<Vec<U>, E> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8);
        let chunk = items.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = items
                .chunks(chunk)
                .map(|c| s.spawn(|| c.iter().map(&f).collect::<Result<Vec<U>, E>>()))
                .collect();
            let mut out = Vec::with_capacity(items.len());
            for h in handles {
                out.extend(h.join().expect("tokenizer thread")?);
            }
            Ok(out)
        })
    }
}
