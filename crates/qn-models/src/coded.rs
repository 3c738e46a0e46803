//! Weights a `.qnz` stores quantized (PQ or int-N), kept as codes while a model is built: each
//! Linear or Embedding whose weight is here becomes a layer in that state
//! ([`QWeight::from_coded`]) and runs from its codes in evaluation, so loading a compressed model
//! never expands a coded weight to a dense `f32` copy. Everything else (biases, norms, float
//! layers) goes through the recording `VarBuilder` as before.
//!
//! ```
//! use qn_models::coded::CodedWeights;
//! let coded = CodedWeights::default();
//! assert!(coded.is_empty());
//! ```

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use qn_train::kernels::{import::CodedTensor, layout::LayerKind};
use qn_train::QWeight;

use crate::Result;

struct Entry {
    tensor: CodedTensor,
    exact_row: Option<(usize, Vec<f32>)>,
}

/// Coded weights by canonical tensor name, taken by the layers that use them.
#[derive(Default)]
pub struct CodedWeights {
    entries: Mutex<HashMap<String, Entry>>,
    mismatched: Mutex<Vec<(String, String)>>,
}

impl std::fmt::Debug for CodedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodedWeights")
            .field("names", &self.names())
            .finish()
    }
}

impl CodedWeights {
    /// Adds the coded weight `name`, with the row a file keeps exactly beside it.
    pub fn insert(&self, name: String, tensor: CodedTensor, exact_row: Option<(usize, Vec<f32>)>) {
        self.lock().insert(name, Entry { tensor, exact_row });
    }

    /// Whether no weight is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The names not taken yet, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.lock().keys().cloned().collect();
        n.sort();
        n
    }

    /// The shape of every weight held, by name.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.lock()
            .iter()
            .map(|(n, e)| {
                let dims = match &e.tensor {
                    CodedTensor::Pq(c) => c.layout.shape().to_vec(),
                    CodedTensor::Scalar(q) => q.codes.dims().to_vec(),
                };
                (n.clone(), dims)
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().expect("coded weights lock")
    }

    /// The layer weight `name` of `shape`, when it is coded here. A coded weight of another shape
    /// is recorded as a mismatch (see [`Self::take_mismatched`]) and `None` is returned, so that
    /// the loader treats it as it treats a mis-shaped float tensor.
    pub(crate) fn take(
        &self,
        name: &str,
        kind: LayerKind,
        shape: &[usize],
        device: &Device,
    ) -> Result<Option<QWeight>> {
        let Some(entry) = self.lock().remove(name) else {
            return Ok(None);
        };
        let dims = match &entry.tensor {
            CodedTensor::Pq(c) => c.layout.shape().to_vec(),
            CodedTensor::Scalar(q) => q.codes.dims().to_vec(),
        };
        if dims != shape {
            self.mismatched.lock().expect("coded weights lock").push((
                name.to_string(),
                format!("`{name}` is {dims:?}, the config needs {shape:?}"),
            ));
            return Ok(None);
        }
        let layer = name.strip_suffix(".weight").unwrap_or(name);
        let mut w = QWeight::from_coded(layer, kind, entry.tensor)?;
        if let Some((row, values)) = entry.exact_row {
            let n = values.len();
            w.set_frozen_row(row, Tensor::from_vec(values, n, device)?)?;
        }
        Ok(Some(w))
    }

    /// The shape mismatches recorded by [`Self::take`]: (name, message).
    pub(crate) fn take_mismatched(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.mismatched.lock().expect("coded weights lock"))
    }
}
