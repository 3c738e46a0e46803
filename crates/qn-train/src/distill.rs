//! Knowledge distillation: a compressed model trained to match the logits of its uncompressed self
//! (or of another teacher) rather than only the gold labels.
//!
//! "And the Bit Goes Down" (Stock et al., the iPQ paper) fine-tunes its centroids on the teacher's
//! outputs alone; fine-tuning on the gold labels only loses the dark knowledge that keeps a
//! compressed model close to its teacher (fairseq issue 2340: the paper's numbers could not be
//! reproduced without it). The loss is Hinton's:
//!
//! `α · CE(student, labels) + (1 − α) · T² · KL(softmax(teacher / T) ‖ softmax(student / T))`
//!
//! averaged over the batch; `T²` keeps the soft term's gradient scale independent of `T`.
//! The teacher's logits of the training rows are computed once ([`teacher_logits`]), kept with the
//! [`Dataset`] ([`Dataset::teacher`]) and, for a resumable run, cached on disk
//! ([`cached_teacher_logits`]) under a key of the teacher's weights and the data.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_train::distill::{distill_loss, Distill};
//! let dev = Device::Cpu;
//! let student = Tensor::new(&[[1f32, 0.0], [0.0, 2.0]], &dev)?;
//! let teacher = student.clone();
//! let labels = Tensor::new(&[0u32, 1], &dev)?;
//! // The student matches its teacher: only the labelled term is left.
//! let d = Distill { alpha: 0.0, temperature: 2.0 };
//! let loss = distill_loss(&student, &teacher, &labels, &d)?.to_scalar::<f32>()?;
//! assert!(loss.abs() < 1e-6);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::Path;

use candle_core::{DType, Tensor, D};

use crate::data::Dataset;
use crate::model::{named_vars, QuantModel};
use crate::trainer::cross_entropy;
use crate::{Error, Result};

/// The distillation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Distill {
    /// Weight of the cross-entropy against the labels (0: the teacher alone, as the iPQ paper).
    pub alpha: f64,
    /// Softmax temperature of both teacher and student in the soft term.
    pub temperature: f64,
}

impl Default for Distill {
    fn default() -> Self {
        Self {
            alpha: 0.0,
            temperature: 1.0,
        }
    }
}

impl Distill {
    /// Checks the settings, naming the first out of range.
    pub fn validate(&self) -> Result<()> {
        if !(self.alpha.is_finite() && (0.0..=1.0).contains(&self.alpha)) {
            return Err(Error::config(
                "distill alpha",
                format!("{} is outside [0, 1]", self.alpha),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0 && self.temperature <= 100.0) {
            return Err(Error::config(
                "distill temperature",
                format!("{} is outside (0, 100]", self.temperature),
            ));
        }
        Ok(())
    }
}

/// `log_softmax(z)` over the last dimension, from primitives (max, sub, exp, sum, log) that all
/// have a backward; the cross-entropy of the trainer uses it too.
pub(crate) fn log_softmax(z: &Tensor) -> Result<Tensor> {
    let max = z.max_keepdim(D::Minus1)?.detach();
    let shifted = z.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum)?)
}

/// The distillation loss of `student` logits `(n, c)` against `teacher` logits `(n, c)` and
/// `labels` `(n)`; the cross-entropy term is not computed when `alpha` is 0.
pub fn distill_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    d: &Distill,
) -> Result<Tensor> {
    if student.dims() != teacher.dims() {
        return Err(Error::config(
            "teacher logits",
            format!(
                "shape {:?} does not match the student's {:?} (another label set?)",
                teacher.dims(),
                student.dims()
            ),
        ));
    }
    let t = d.temperature;
    let teacher = teacher.detach().to_dtype(DType::F32)?;
    let log_p_t = log_softmax(&(teacher / t)?)?;
    let log_p_s = log_softmax(&(student / t)?)?;
    // KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s), summed over classes, averaged over rows.
    let kl = (log_p_t.exp()? * (log_p_t - log_p_s)?)?
        .sum(D::Minus1)?
        .mean_all()?;
    let soft = (kl * ((1.0 - d.alpha) * t * t))?;
    if d.alpha == 0.0 {
        return Ok(soft);
    }
    Ok(((cross_entropy(student, labels)? * d.alpha)? + soft)?)
}

/// The logits of `model` (evaluation mode: no noise, no dropout) for every row of `data`,
/// `(n, classes)`.
pub fn teacher_logits(model: &dyn QuantModel, data: &Dataset, batch: usize) -> Result<Tensor> {
    let n = data.len();
    let batch = batch.max(1);
    let mut parts = Vec::new();
    let mut start = 0;
    while start < n {
        let len = batch.min(n - start);
        parts.push(
            model
                .forward_t(&data.x.narrow(0, start, len)?, false)?
                .to_dtype(DType::F32)?,
        );
        start += len;
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// [`teacher_logits`] of the rows `rows` only (e.g. [`Dataset::rows_drawn`]: the rows a run will
/// read); the other rows get zeros. `(n, classes)`.
pub fn teacher_logits_of_rows(
    model: &dyn QuantModel,
    data: &Dataset,
    rows: &[u32],
    batch: usize,
) -> Result<Tensor> {
    let n = data.len();
    if let Some(r) = rows.iter().find(|&&r| r as usize >= n) {
        return Err(Error::dataset(
            "teacher rows",
            format!("row {r} is out of range for {n} examples"),
        ));
    }
    if rows.len() == n {
        return teacher_logits(model, data, batch);
    }
    let idx = Tensor::from_slice(rows, rows.len(), data.x.device())?;
    let picked = teacher_logits(model, &data.select(&idx)?, batch)?;
    let classes = picked.dim(1)?;
    let values = picked.flatten_all()?.to_vec1::<f32>()?;
    let mut full = vec![0f32; n * classes];
    for (i, &r) in rows.iter().enumerate() {
        full[r as usize * classes..(r as usize + 1) * classes]
            .copy_from_slice(&values[i * classes..(i + 1) * classes]);
    }
    Ok(Tensor::from_vec(full, (n, classes), data.x.device())?)
}

fn hash_tensor(h: &mut DefaultHasher, t: &Tensor) -> Result<()> {
    h.write(format!("{:?}{:?}", t.dims(), t.dtype()).as_bytes());
    match t.dtype() {
        DType::U32 => t
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .for_each(|v| h.write_u32(*v)),
        _ => t
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .for_each(|v| h.write_u32(v.to_bits())),
    }
    Ok(())
}

/// A key of the teacher's logits: its every variable and buffer, and the rows they are computed
/// on (token ids, so the maximum length is in it).
pub fn teacher_key(model: &dyn QuantModel, data: &Dataset) -> Result<String> {
    let mut h = DefaultHasher::new();
    for (name, v) in named_vars(model) {
        h.write(name.as_bytes());
        hash_tensor(&mut h, v.as_tensor())?;
    }
    for (name, b) in model.buffers() {
        h.write(name.as_bytes());
        hash_tensor(&mut h, &b)?;
    }
    hash_tensor(&mut h, &data.x)?;
    Ok(format!("{:016x}-{}", h.finish(), data.len()))
}

/// The file name of the cache in a work directory.
pub const TEACHER_CACHE: &str = "teacher-logits.safetensors";

/// The teacher's logits for `data` (for the rows `rows` only when given, zeros elsewhere), read
/// from `dir/teacher-logits.safetensors` when it was written for the same teacher, data and rows
/// (same [`teacher_key`]), else computed and written there (atomically). Returns the logits and
/// whether they came from the cache.
pub fn cached_teacher_logits(
    teacher: &dyn QuantModel,
    data: &Dataset,
    rows: Option<&[u32]>,
    dir: Option<&Path>,
    batch: usize,
) -> Result<(Tensor, bool)> {
    let compute = || match rows {
        Some(r) => teacher_logits_of_rows(teacher, data, r, batch),
        None => teacher_logits(teacher, data, batch),
    };
    let Some(dir) = dir else {
        return Ok((compute()?, false));
    };
    let mut key = teacher_key(teacher, data)?;
    if let Some(r) = rows {
        let mut h = DefaultHasher::new();
        r.iter().for_each(|v| h.write_u32(*v));
        key.push_str(&format!("-rows{:016x}", h.finish()));
    }
    let path = dir.join(TEACHER_CACHE);
    if path.exists() {
        let read = candle_core::safetensors::load(&path, data.x.device());
        if let Ok(mut t) = read {
            if let (Some(logits), Some(k)) = (t.remove("logits"), t.remove("key")) {
                let saved: Vec<u8> = k.to_vec1::<u8>()?;
                if saved == key.as_bytes() && logits.dim(0)? == data.len() {
                    return Ok((logits, true));
                }
            }
        }
    }
    let logits = compute()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let key_t = Tensor::from_vec(key.as_bytes().to_vec(), key.len(), data.x.device())?;
    let tmp = dir.join(format!("{TEACHER_CACHE}.tmp"));
    candle_core::safetensors::save(
        &[
            ("logits".to_string(), logits.clone()),
            ("key".to_string(), key_t),
        ]
        .into_iter()
        .collect(),
        &tmp,
    )
    .map_err(|e| Error::file(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::file(&path, e))?;
    Ok((logits, false))
}

/// The mean over layers of the mean squared difference of the student's hidden states `hs` from
/// the teacher's `ht` (detached: the teacher only gives targets).
pub fn hidden_mse(hs: &[Tensor], ht: &[Tensor]) -> Result<Tensor> {
    if hs.is_empty() || hs.len() != ht.len() {
        return Err(Error::config(
            "hidden_distill",
            format!(
                "{} student and {} teacher hidden states",
                hs.len(),
                ht.len()
            ),
        ));
    }
    let mut total: Option<Tensor> = None;
    for (s, t) in hs.iter().zip(ht) {
        let d = (s - t.detach())?.sqr()?.mean_all()?;
        total = Some(match total {
            None => d,
            Some(acc) => (acc + d)?,
        });
    }
    Ok((total.expect("at least one layer") / hs.len() as f64)?)
}
