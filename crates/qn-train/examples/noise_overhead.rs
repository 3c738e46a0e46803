//! Noise overhead of one FFN training step, measured as a ratio with the two variants interleaved
//! (A, B, A, B, ...) so that machine drift hits both alike. Same step as the workspace bench
//! `benches/train_step.rs`. Both variants go through the same fused matmul kernel (the noise-free
//! path uses `linear_matmul`, the noisy one `block_drop_matmul`), so the difference is the noise.
//!
//! ```text
//! cargo run --release -p qn-train --example noise_overhead -- [rounds]
//! ```

use std::time::Instant;

use candle_core::{Device, ModuleT, Tensor, Var};
use qn_train::layers::{QLinear, QuantNoiseLayer};
use qn_train::optim::{AdamW, AdamWParams};
use qn_train::NoiseConfig;

fn linear(name: &str, i: usize, o: usize) -> Result<QLinear, Box<dyn std::error::Error>> {
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, (o, i), &Device::Cpu)?)?;
    let b = Var::from_tensor(&Tensor::zeros(o, candle_core::DType::F32, &Device::Cpu)?)?;
    Ok(QLinear::new(name, w, Some(b))?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(15);
    let fc1 = linear("intermediate.dense", 768, 3072)?;
    let fc2 = linear("output.dense", 3072, 768)?;
    let x = Tensor::randn(0f32, 1.0, (8, 128, 768), &Device::Cpu)?;
    let mut vars = Vec::new();
    for l in [&fc1, &fc2] {
        vars.push((format!("{}.weight", l.name()), l.vars()[0].clone()));
        vars.push((format!("{}.bias", l.name()), l.vars()[1].clone()));
    }
    let mut opt = AdamW::new(vars, AdamWParams::default())?;
    let mut step = |noise: NoiseConfig, seed: u64| -> Result<f64, Box<dyn std::error::Error>> {
        fc1.set_noise(noise, 1)?;
        fc2.set_noise(noise, 2)?;
        qn_train::set_noise_step(&[&fc1, &fc2], seed, 0);
        let t = Instant::now();
        let h = fc1.forward_t(&x, true)?.gelu_erf()?;
        let y = fc2.forward_t(&h, true)?;
        let grads = y.sqr()?.mean_all()?.backward()?;
        opt.step(&grads, 1e-4)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let noise = NoiseConfig::BlockDrop {
        p: 0.1,
        block_size: 8,
    };
    step(NoiseConfig::None, 0)?;
    step(noise, 0)?;
    let (mut plain, mut noisy) = (Vec::new(), Vec::new());
    for r in 0..rounds as u64 {
        plain.push(step(NoiseConfig::None, r)?);
        noisy.push(step(noise, r)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, n) = (median(&mut plain), median(&mut noisy));
    println!("FFN 768-3072-768 train step, batch 8x128, {rounds} interleaved rounds (median):");
    println!("  no noise              {:.1} ms", p * 1e3);
    println!("  block drop p=0.1 bs=8 {:.1} ms", n * 1e3);
    println!("  overhead              {:+.1} %", (n / p - 1.0) * 100.0);
    Ok(())
}
