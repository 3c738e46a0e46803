//! Text in: the tokenizer ([`TextTokenizer`]) and GLUE-style TSV datasets ([`tsv`]), and the
//! bridge to the trainer's in-memory [`qn_train::data::Dataset`] ([`to_dataset`]).

mod tokenizer;
pub mod tsv;

pub use tokenizer::TextTokenizer;
pub use tsv::{read_examples, read_examples_with, LabelMap, Task, TextExample};

use candle_core::{Device, Tensor};
use qn_train::data::Dataset;

use crate::encoder::pack_batch;
use crate::{Error, Result};

/// Tokenizes labelled examples into a packed `(n, 3, l)` dataset; `file` names errors.
pub fn to_dataset(
    examples: &[TextExample],
    labels: &LabelMap,
    tokenizer: &TextTokenizer,
    file: &str,
    device: &Device,
) -> Result<Dataset> {
    if let Some(e) = examples.iter().find(|e| e.label.is_none()) {
        return Err(Error::Dataset {
            file: file.to_string(),
            reason: format!("line {} has no label", e.line),
        });
    }
    to_dataset_partial(examples, labels, tokenizer, file, device)
}

/// The class of an example without a label in [`to_dataset_partial`], until the caller sets it
/// (to a teacher's prediction, when distilling).
pub const NO_LABEL: u32 = u32::MAX;

/// [`to_dataset`] where examples may lack a label: their class is [`NO_LABEL`].
pub fn to_dataset_partial(
    examples: &[TextExample],
    labels: &LabelMap,
    tokenizer: &TextTokenizer,
    file: &str,
    device: &Device,
) -> Result<Dataset> {
    let mut y = Vec::with_capacity(examples.len());
    for e in examples {
        let Some(label) = e.label.as_deref() else {
            y.push(NO_LABEL);
            continue;
        };
        y.push(labels.index_of(label).ok_or_else(|| Error::Dataset {
            file: file.to_string(),
            reason: format!(
                "line {}: label `{label}` is not one of the model's labels {:?}",
                e.line,
                labels.names()
            ),
        })? as u32);
    }
    let rows = tokenizer.encode_examples(examples)?;
    let x = pack_batch(&rows, tokenizer.pad_id(), device)?;
    let n = y.len();
    Ok(Dataset::new(x, Tensor::from_vec(y, n, device)?))
}
