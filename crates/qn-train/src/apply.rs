//! Model-level helpers: noise by layer-name regex, and a check that gradients reach every variable.

use candle_core::{backprop::GradStore, Var};
use regex::Regex;

use crate::{layers::QuantNoiseLayer, noise::NoiseConfig};

/// Sets `config` on every layer whose name matches `pattern` and returns the names touched, so that
/// a caller can see (and log) that attention projections, FFNs, embeddings and heads all got it.
/// Each layer's masks are seeded from `seed` and its position, so runs are reproducible.
pub fn apply_noise(
    layers: &[&dyn QuantNoiseLayer],
    pattern: &Regex,
    config: NoiseConfig,
    seed: u64,
) -> Vec<String> {
    let mut touched = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        if pattern.is_match(layer.name()) {
            layer.set_noise(
                config,
                seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(i as u64),
            );
            touched.push(layer.name().to_string());
        }
    }
    touched
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
