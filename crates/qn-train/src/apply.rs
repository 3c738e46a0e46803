//! Model-level helpers: noise by layer-name regex, and a check that gradients reach every variable.

use candle_core::{backprop::GradStore, Var};
use regex::Regex;

use crate::{
    layers::QuantNoiseLayer,
    noise::{NoiseConfig, NoiseStep},
    Result,
};

/// Sets `config` on every layer whose name matches `pattern` and returns the names touched, so that
/// a caller can see (and log) that attention projections, FFNs, embeddings and heads all got it.
/// Each layer's masks are seeded from `seed` and its position, so runs are reproducible. A config
/// that does not fit a matching layer is an error naming it, and no layer is changed.
pub fn apply_noise(
    layers: &[&dyn QuantNoiseLayer],
    pattern: &Regex,
    config: NoiseConfig,
    seed: u64,
) -> Result<Vec<String>> {
    apply_noise_spec(layers, pattern, |_, _| Ok(config), seed)
}

/// Like [`apply_noise`], with each layer's config resolved from a [`NoiseSpec`] (block sizes
/// defaulting to the paper's per layer kind).
pub fn apply_noise_spec(
    layers: &[&dyn QuantNoiseLayer],
    pattern: &Regex,
    config: impl Fn(&str, &qn_kernels::layout::BlockLayout) -> Result<NoiseConfig>,
    seed: u64,
) -> Result<Vec<String>> {
    let mut picked = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        if pattern.is_match(layer.name()) {
            let c = config(layer.name(), layer.qweight().layout())?;
            c.validate_for(layer.name(), layer.qweight().layout())
                .map_err(|e| crate::Error::Layer {
                    layer: layer.name().to_string(),
                    reason: e.to_string(),
                })?;
            picked.push((i, c));
        }
    }
    let mut touched = Vec::new();
    for (i, c) in picked {
        let layer = layers[i];
        layer.set_noise(c, layer_seed(seed, i))?;
        touched.push(layer.name().to_string());
    }
    Ok(touched)
}

/// The noise seed of the `i`-th layer of a model for a run seed.
pub fn layer_seed(seed: u64, i: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i as u64)
}

/// Sets the step every layer's next training forward passes draw their masks for: the trainer
/// calls this before each micro-batch.
pub fn set_noise_step(layers: &[&dyn QuantNoiseLayer], step: u64, micro: u32) {
    for l in layers {
        l.qweight().set_noise_step(NoiseStep { step, micro });
    }
}

/// The names of the variables that received no gradient or an all-zero one after a backward pass.
/// candle's fused LayerNorm / softmax_last_dim / rms_norm / sdpa have no backward, so a model built
/// on them silently trains only what lies after them; every model test calls this.
pub fn vars_without_gradient(grads: &GradStore, vars: &[(String, Var)]) -> Vec<String> {
    vars.iter()
        .filter(|(_, v)| match grads.get(v.as_tensor()) {
            None => true,
            Some(g) => g
                .abs()
                .and_then(|a| a.sum_all())
                .and_then(|s| s.to_dtype(candle_core::DType::F64))
                .and_then(|s| s.to_scalar::<f64>())
                .map(|s| s == 0.0 || !s.is_finite())
                .unwrap_or(true),
        })
        .map(|(n, _)| n.clone())
        .collect()
}
