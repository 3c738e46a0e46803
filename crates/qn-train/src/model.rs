//! What the trainer and the iPQ stages need from a model.

use candle_core::{Tensor, Var};

use crate::layers::QuantNoiseLayer;
use crate::{NoiseStep, WeightState};

/// A model built from quant-noise layers.
pub trait QuantModel {
    /// Logits for a batch.
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor>;
    /// Every quant-noise layer, in a fixed order.
    fn layers(&self) -> Vec<&dyn QuantNoiseLayer>;
    /// The same layers, mutably.
    fn layers_mut(&mut self) -> Vec<&mut dyn QuantNoiseLayer>;
    /// The logits and the hidden states hidden-state distillation compares (an encoder: the
    /// embeddings' output and every layer's), or `None` for a model that exposes none.
    fn forward_hidden_t(
        &self,
        _x: &Tensor,
        _train: bool,
    ) -> candle_core::Result<Option<(Tensor, Vec<Tensor>)>> {
        Ok(None)
    }
    /// Trainable variables outside the quant-noise layers (norms, ...), with unique names.
    fn other_vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// Where the run stands, for randomness outside the layers (dropout): the trainer calls this
    /// with [`crate::set_noise_step`] before each micro-batch, so a resumed run draws the same masks.
    fn set_step(&self, _at: NoiseStep) {}
    /// State that is not trained but saved with the weights (batch-norm running statistics), with
    /// unique names: checkpointed, restored on resume and exported raw.
    fn buffers(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    /// Replaces the buffer `name` (restoring a checkpoint); an unknown name is an error.
    fn set_buffer(&self, name: &str, _value: &Tensor) -> candle_core::Result<()> {
        candle_core::bail!("the model has no buffer `{name}`")
    }
}

/// Every trainable variable with a unique name: `<layer>.weight` or `<layer>.centroids`, `<layer>.bias`,
/// then the model's others.
pub fn named_vars(model: &dyn QuantModel) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for layer in model.layers() {
        let kind = match layer.qweight().state() {
            WeightState::Float(_) => "weight",
            WeightState::Pq(_) => "centroids",
            WeightState::Scalar(_) => "frozen",
        };
        for v in layer.qweight().vars() {
            out.push((format!("{}.{kind}", layer.name()), v));
        }
        for (i, v) in layer.other_vars().into_iter().enumerate() {
            let what = if i == 0 {
                "bias".to_string()
            } else {
                format!("extra{i}")
            };
            out.push((format!("{}.{what}", layer.name()), v));
        }
    }
    out.extend(model.other_vars());
    out
}
