//! One training step of a BERT-base-sized FFN block (768 → 3072 → 768, batch 8 x 128 tokens), with
//! and without block-drop noise on both weights: the cost of quantization noise during training.
//!
//! `cargo bench -p qn-benches --bench train_step`. Target: noise overhead ≤ 5 %. Both variants run
//! through the same fused matmul kernel (noise-free `linear_matmul`, noisy `block_drop_matmul`); the
//! interleaved ratio is `cargo run --release -p qn-train --example noise_overhead`.

use candle_core::{Device, ModuleT, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use qn_train::layers::{QLinear, QuantNoiseLayer};
use qn_train::optim::{AdamW, AdamWParams};
use qn_train::NoiseConfig;

fn linear(name: &str, i: usize, o: usize) -> QLinear {
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, (o, i), &Device::Cpu).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::zeros(o, candle_core::DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    QLinear::new(name, w, Some(b)).unwrap()
}

fn bench(c: &mut Criterion) {
    let fc1 = linear("intermediate.dense", 768, 3072);
    let fc2 = linear("output.dense", 3072, 768);
    let x = Tensor::randn(0f32, 1.0, (8, 128, 768), &Device::Cpu).unwrap();
    let mut vars = Vec::new();
    for l in [&fc1, &fc2] {
        vars.push((format!("{}.weight", l.name()), l.vars()[0].clone()));
        vars.push((format!("{}.bias", l.name()), l.vars()[1].clone()));
    }
    let mut opt = AdamW::new(vars, AdamWParams::default()).unwrap();
    let mut t = 0u64;
    let mut step = |fc1: &QLinear, fc2: &QLinear| {
        t += 1;
        qn_train::set_noise_step(&[fc1, fc2], t, 0);
        let h = fc1.forward_t(&x, true).unwrap().gelu_erf().unwrap();
        let y = fc2.forward_t(&h, true).unwrap();
        let loss = y.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads, 1e-4).unwrap();
    };
    let mut g = c.benchmark_group("ffn 768-3072-768 train step, batch 8x128");
    g.sample_size(20);
    for (name, noise) in [
        ("no noise", NoiseConfig::None),
        (
            "block drop p=0.1 bs=8",
            NoiseConfig::BlockDrop {
                p: 0.1,
                block_size: 8,
            },
        ),
    ] {
        fc1.set_noise(noise, 1).unwrap();
        fc2.set_noise(noise, 2).unwrap();
        g.bench_function(name, |b| b.iter(|| step(&fc1, &fc2)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
