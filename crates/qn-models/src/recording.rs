//! A [`SimpleBackend`] that serves tensors from a map and records what the model asked for, so a
//! model definition is the one list of the tensors it needs: the loaders turn the record into
//! errors naming missing, mis-shaped and unexpected tensors. A tensor that is absent (or
//! mis-shaped) is filled by the loader's `init` so that building always finishes and every problem
//! is reported at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder};

/// What a model build asked for.
#[derive(Debug, Default)]
pub(crate) struct Record {
    /// Every name asked for, in order.
    pub used: Vec<String>,
    /// Names the map did not hold.
    pub missing: Vec<String>,
    /// "`name` is [..], the config needs [..]" for every shape mismatch.
    pub mismatched: Vec<String>,
}

/// Values for an absent tensor: `(name, shape) -> values`.
pub(crate) type InitFn = Box<dyn Fn(&str, &[usize]) -> candle_core::Result<Vec<f32>> + Send + Sync>;

struct Recording {
    tensors: HashMap<String, Tensor>,
    record: Arc<Mutex<Record>>,
    init: InitFn,
}

/// A VarBuilder over `tensors` (f32 on `device`) and the record it fills.
pub(crate) fn recording_vb(
    tensors: HashMap<String, Tensor>,
    init: InitFn,
    device: &Device,
) -> (VarBuilder<'static>, Arc<Mutex<Record>>) {
    let record = Arc::new(Mutex::new(Record::default()));
    let backend: Box<dyn SimpleBackend> = Box::new(Recording {
        tensors,
        record: record.clone(),
        init,
    });
    (
        VarBuilder::from_backend(backend, DType::F32, device.clone()),
        record,
    )
}

/// Takes the record out (after the build).
pub(crate) fn take(record: &Arc<Mutex<Record>>) -> Record {
    std::mem::take(&mut *record.lock().expect("record lock"))
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut rec = self.record.lock().expect("record lock");
        rec.used.push(name.to_string());
        if let Some(t) = self.tensors.get(name) {
            if t.shape() == &s {
                return t.to_dtype(dtype)?.to_device(dev);
            }
            rec.mismatched.push(format!(
                "`{name}` is {:?}, the config needs {:?}",
                t.dims(),
                s.dims()
            ));
        } else {
            rec.missing.push(name.to_string());
        }
        let values = (self.init)(name, s.dims())?;
        Tensor::from_vec(values, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() })?
            .to_dtype(dtype)?
            .to_device(dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Up to eight names in backquotes, then "and N more".
pub(crate) fn listed(names: &[String]) -> String {
    let shown: Vec<_> = names.iter().take(8).map(|n| format!("`{n}`")).collect();
    let more = names.len().saturating_sub(8);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// A 64-bit FNV-1a hash of a tensor name: seeds its initialisation, so reruns agree.
pub(crate) fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}
