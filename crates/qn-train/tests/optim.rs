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

/// The fused in-place CPU update against PyTorch's AdamW formula written out in f64, over steps
/// with changing gradients, decay on, with a checkpoint round trip (moments out and back in)
/// half-way.
#[test]
fn fused_update_matches_the_adamw_formula_across_a_state_round_trip() {
    let n = 40_000; // more than one parallel chunk
    let w0: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let w = Var::from_vec(w0.clone(), n, &Device::Cpu).unwrap();
    let p = AdamWParams {
        weight_decay: 0.01,
        ..AdamWParams::default()
    };
    let mut opt = AdamW::new(vec![("fc.weight".into(), w.clone())], p).unwrap();
    let (mut rw, mut m, mut v): (Vec<f64>, Vec<f64>, Vec<f64>) = (
        w0.iter().map(|x| *x as f64).collect(),
        vec![0.0; n],
        vec![0.0; n],
    );
    // `fc.weight` of rank 1 is not decayed by default: this checks the rank rule too.
    let decay = 0.0;
    let lr = 1e-2;
    for step in 1..=6u32 {
        let c: Vec<f32> = (0..n)
            .map(|i| (((i as u32 * 7 + step * 13) % 17) as f32 - 8.0) / 8.0)
            .collect();
        let ct = Tensor::from_vec(c.clone(), n, &Device::Cpu).unwrap();
        let grads = (w.as_tensor() * &ct)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads, lr).unwrap();
        let (bc1, bc2) = (
            1.0 - p.beta1.powi(step as i32),
            1.0 - p.beta2.powi(step as i32),
        );
        for i in 0..n {
            let g = c[i] as f64;
            m[i] = p.beta1 * m[i] + (1.0 - p.beta1) * g;
            v[i] = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
            rw[i] = rw[i] * (1.0 - lr * decay) - lr * (m[i] / bc1) / ((v[i] / bc2).sqrt() + p.eps);
        }
        if step == 3 {
            let (f, s) = opt.moments("fc.weight").unwrap().unwrap();
            let mut again = AdamW::new(vec![("fc.weight".into(), w.clone())], p).unwrap();
            again.set_state(vec![f], vec![s], opt.steps()).unwrap();
            opt = again;
        }
    }
    let got = w.as_tensor().to_vec1::<f32>().unwrap();
    let worst = got
        .iter()
        .zip(&rw)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-5, "max |Δ| {worst}");
}
