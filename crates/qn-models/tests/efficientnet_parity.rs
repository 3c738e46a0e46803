//! EfficientNet against an independent PyTorch implementation (`scripts/make_efficientnet_goldens.py`,
//! goldens committed): the shared pretrained Lite0 and a small random B0 with squeeze-excitation,
//! eval mode, on a deterministic synthetic image. Max |Δ logit| ≤ 1e-3.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use qn_models::train::QuantModel;
use qn_models::vision::{
    build_efficientnet, load_efficientnet, read_image_weights, EfficientNetConfig,
};
use serde_json::Value;

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

fn golden() -> Value {
    let p = assets().join("golden/efficientnet.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// The script's input: x[c, h, w] = sin(0.05 (c + 1) h + 0.03 w), computed in f64, stored as f32.
fn synthetic_image(size: usize) -> Tensor {
    let mut v = Vec::with_capacity(3 * size * size);
    for c in 0..3 {
        for h in 0..size {
            for w in 0..size {
                v.push((0.05 * (c + 1) as f64 * h as f64 + 0.03 * w as f64).sin() as f32);
            }
        }
    }
    Tensor::from_vec(v, (1, 3, size, size), &Device::Cpu).unwrap()
}

fn max_diff(model: &dyn QuantModel, size: usize, expected: &Value) -> f64 {
    let y = model.forward_t(&synthetic_image(size), false).unwrap();
    let got = y.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    let want: Vec<f64> = expected
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max)
}

#[test]
fn small_random_b0_with_squeeze_excitation_matches_pytorch() {
    let g = golden();
    let t = &g["tiny_b0"];
    let cfg = EfficientNetConfig::custom(
        t["width"].as_f64().unwrap(),
        t["depth"].as_f64().unwrap(),
        false,
        t["classes"].as_u64().unwrap() as usize,
    )
    .unwrap();
    let path = assets().join("golden/efficientnet-tiny-b0.safetensors");
    let tensors = read_image_weights(&path, &Device::Cpu).unwrap();
    let loaded = build_efficientnet(&cfg, tensors, &path, 0, &Device::Cpu).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let d = max_diff(
        &loaded.model,
        t["size"].as_u64().unwrap() as usize,
        &t["logits"],
    );
    eprintln!("max |Δ logit| = {d:.2e}");
    assert!(d <= 1e-3, "max |Δ logit| = {d}");
}

#[test]
fn pretrained_lite0_matches_pytorch() {
    let Some(dir) = std::env::var_os("QN_DATA_DIR") else {
        eprintln!("skipped: QN_DATA_DIR is not set (the pretrained Lite0 lives there)");
        return;
    };
    let path = Path::new(&dir).join("models/efficientnet-lite0/model.safetensors");
    let loaded = load_efficientnet(&path, None, None, 0, &Device::Cpu).unwrap();
    let g = golden();
    let d = max_diff(&loaded.model, 224, &g["lite0"]["logits"]);
    eprintln!("max |Δ logit| = {d:.2e}");
    assert!(d <= 1e-3, "max |Δ logit| = {d}");
}
