//! BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa) built from quant-noise layers.
//!
//! - [`config`]: `config.json`, with unsupported options refused by name;
//! - [`model`]: the [`Encoder`] (every Linear and Embedding a quant-noise layer, tensors named as in
//!   Hugging Face's `…ForSequenceClassification`);
//! - [`load`]: weights from safetensors in any of the prefixes checkpoints use;
//! - `block` / `ops`: one layer, and the elementwise pieces with a backward.

pub mod attention;
mod block;
pub mod config;
pub mod fused;
pub mod load;
pub mod model;
pub mod ops;

pub use config::{Activation, EncoderConfig, Family};
pub use load::{build_encoder, build_encoder_coded, canonical_name, read_weights, Loaded};
pub use model::{Encoder, Head};

use candle_core::{Device, Tensor};

/// The layers that get quantization noise when the user names none: the six Linear projections
/// of every encoder layer (attention query, key, value and output; FFN in and out), as fairseq's
/// RoBERTa puts its noise. Left out: the embeddings, where a dropped block perturbs every token
/// before the first layer (all-MiniLM-L6-v2 on SST-2, one seed, 750 steps: 84.98 % with noise on
/// every layer, 86.01 % with it on these; BENCHMARKS.md), and the head (pooler, classifier), whose
/// output is the logits' input.
pub const DEFAULT_NOISE_LAYERS: &str = r"\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)$";

/// Packs tokenized rows (ids, token types; equal lengths per row) into the `(n, 3, l)` `u32` batch
/// [`Encoder`] takes, padded with `pad_id` to the longest row.
pub fn pack_batch(
    rows: &[(Vec<u32>, Vec<u32>)],
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let l = rows
        .iter()
        .map(|(ids, _)| ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut data = Vec::with_capacity(rows.len() * 3 * l);
    for (ids, types) in rows {
        let pad = l - ids.len();
        data.extend(ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
        data.extend(types.iter().copied().chain(std::iter::repeat_n(0, pad)));
        data.extend(std::iter::repeat_n(1u32, ids.len()).chain(std::iter::repeat_n(0, pad)));
    }
    Tensor::from_vec(data, (rows.len(), 3, l), device)
}
