//! AdamW: weight decay on weights only by default (not biases, norms or PQ centroids).

use candle_core::{backprop::GradStore, Device, Tensor, Var};
use qn_train::optim::{AdamW, AdamWParams, DecayOn};

fn var(shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap()
}

fn first(v: &Var) -> f32 {
    v.as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

/// A gradient of 1 everywhere: Adam's first update is `lr · 1`, and the decay multiplies by
/// `1 − lr · wd` first, so with lr 0.5 and wd 0.1 a decayed 1 becomes 0.45 and another 0.5.
fn after_one_step(decay_on: DecayOn) -> Vec<f32> {
    let named = vec![
        ("fc.weight".to_string(), var(&[4, 4])),
        ("fc.bias".to_string(), var(&[4])),
        ("norm.weight".to_string(), var(&[4])),
        ("fc2.centroids".to_string(), var(&[16, 4])),
        ("conv.weight".to_string(), var(&[2, 2, 3, 3])),
    ];
    let params = AdamWParams {
        weight_decay: 0.1,
        decay_on,
        ..AdamWParams::default()
    };
    let mut opt = AdamW::new(named.clone(), params).unwrap();
    let mut loss = Tensor::zeros((), candle_core::DType::F32, &Device::Cpu).unwrap();
    for (_, v) in &named {
        loss = (loss + v.as_tensor().sum_all().unwrap()).unwrap();
    }
    let grads: GradStore = loss.backward().unwrap();
    opt.step(&grads, 0.5).unwrap();
    named
        .iter()
        .map(|(_, v)| (first(v) * 1e4).round() / 1e4)
        .collect()
}

#[test]
fn weight_decay_applies_to_weight_matrices_only_by_default() {
    assert_eq!(
        after_one_step(DecayOn::Weights),
        vec![0.45, 0.5, 0.5, 0.5, 0.45]
    );
    assert_eq!(after_one_step(DecayOn::All), vec![0.45; 5]);
    assert_eq!(AdamWParams::default().decay_on, DecayOn::Weights);
}
