//! Datasets for training: in-memory classification data and the Fashion-MNIST IDX reader.

use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{seq::SliceRandom, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// Features `(n, ...)` as `f32` and labels `(n)` as `u32`, with the teacher's logits `(n, classes)`
/// when the run distils ([`crate::distill`]).
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Inputs.
    pub x: Tensor,
    /// Class labels.
    pub y: Tensor,
    /// Soft targets: a teacher's logits for every row, `(n, classes)`.
    pub teacher: Option<Tensor>,
}

impl Dataset {
    /// Inputs and labels, without a teacher.
    pub fn new(x: Tensor, y: Tensor) -> Self {
        Self {
            x,
            y,
            teacher: None,
        }
    }

    /// The same rows with `logits` as their soft targets; refused when the row counts differ.
    pub fn with_teacher(mut self, logits: Tensor) -> Result<Self> {
        if logits.dim(0)? != self.len() {
            return Err(Error::dataset(
                "teacher logits",
                format!("{} rows for {} examples", logits.dim(0)?, self.len()),
            ));
        }
        self.teacher = Some(logits);
        Ok(self)
    }

    /// The rows `idx` (a `u32` index tensor) as a dataset of their own.
    pub fn select(&self, idx: &Tensor) -> Result<Self> {
        Ok(Self {
            x: self.x.index_select(idx, 0)?,
            y: self.y.index_select(idx, 0)?,
            teacher: self
                .teacher
                .as_ref()
                .map(|t| t.index_select(idx, 0))
                .transpose()?,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.y.dim(0).unwrap_or(0)
    }

    /// Whether the dataset is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batch of training step `step`: epoch `e = step * batch / n` is shuffled by a generator
    /// seeded from `(seed, e)`, so the batch depends only on the step (a resumed run sees the same).
    pub fn batch(&self, step: usize, batch: usize, seed: u64) -> Result<(Tensor, Tensor)> {
        let b = self.batch_rows(step, batch, seed)?;
        Ok((b.x, b.y))
    }

    /// [`Self::batch`] with the teacher's logits of the same rows.
    pub fn batch_rows(&self, step: usize, batch: usize, seed: u64) -> Result<Self> {
        let rows = self.batch_indices(step, batch, seed)?;
        let idx = Tensor::from_slice(&rows, rows.len(), self.x.device())?;
        self.select(&idx)
    }

    /// The row indices of [`Self::batch`].
    pub fn batch_indices(&self, step: usize, batch: usize, seed: u64) -> Result<Vec<u32>> {
        let n = self.len();
        if n == 0 || batch == 0 {
            return Err(Error::dataset(
                "training set",
                format!("cannot draw a batch of {batch} from {n} examples"),
            ));
        }
        let per_epoch = (n / batch).max(1);
        let (epoch, i) = (step / per_epoch, step % per_epoch);
        let order = self.epoch_order(epoch, seed);
        let take = batch.min(n);
        Ok(order[i * take..(i + 1) * take].to_vec())
    }

    fn epoch_order(&self, epoch: usize, seed: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.len() as u32).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(
            seed ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
        ));
        order
    }

    /// Every row that steps `0..steps` draw (sorted, each once): what a run of that length reads,
    /// so that work per row (a teacher's logits) can skip the rest.
    pub fn rows_drawn(&self, steps: usize, batch: usize, seed: u64) -> Result<Vec<u32>> {
        let n = self.len();
        if steps == 0 {
            return Ok(Vec::new());
        }
        // Checks the sizes once.
        self.batch_indices(0, batch, seed)?;
        let per_epoch = (n / batch).max(1);
        let take = batch.min(n);
        let mut seen = vec![false; n];
        let last = steps - 1;
        for epoch in 0..=last / per_epoch {
            let order = self.epoch_order(epoch, seed);
            let first = epoch * per_epoch;
            let upto = (last - first).min(per_epoch - 1);
            for &r in &order[..(upto + 1) * take] {
                seen[r as usize] = true;
            }
        }
        Ok((0..n as u32).filter(|&r| seen[r as usize]).collect())
    }
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let err = |reason: String| Error::file(path, reason);
    let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .map_err(|e| err(format!("not gzip: {e}")))?;
    Ok(out)
}

fn be32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

/// Loads a Fashion-MNIST (or MNIST) split from `dir` (`train` or `t10k` IDX .gz files): images
/// scaled to `[0, 1]` as `(n, 784)` and labels, at most `limit` examples.
pub fn fashion_mnist(
    dir: &Path,
    split: &str,
    limit: Option<usize>,
    device: &Device,
) -> Result<Dataset> {
    let images = read_gz(&dir.join(format!("{split}-images-idx3-ubyte.gz")))?;
    let labels = read_gz(&dir.join(format!("{split}-labels-idx1-ubyte.gz")))?;
    let bad = |reason: &str| Error::dataset(format!("{} ({split})", dir.display()), reason);
    if images.len() < 16
        || be32(&images, 0) != 0x803
        || labels.len() < 8
        || be32(&labels, 0) != 0x801
    {
        return Err(bad("not IDX image/label files"));
    }
    let (n, rows, cols) = (be32(&images, 4), be32(&images, 8), be32(&images, 12));
    let expect = n
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .and_then(|v| v.checked_add(16));
    if be32(&labels, 4) != n || expect != Some(images.len()) || labels.len() != 8 + n {
        return Err(bad("image and label counts or sizes disagree"));
    }
    let n = limit.map_or(n, |l| l.min(n));
    if n == 0 {
        return Err(bad("holds no examples"));
    }
    let x: Vec<f32> = images[16..16 + n * rows * cols]
        .iter()
        .map(|&p| p as f32 / 255.0)
        .collect();
    let y: Vec<u32> = labels[8..8 + n].iter().map(|&l| l as u32).collect();
    Ok(Dataset::new(
        Tensor::from_vec(x, (n, rows * cols), device)?,
        Tensor::from_vec(y, n, device)?,
    ))
}
