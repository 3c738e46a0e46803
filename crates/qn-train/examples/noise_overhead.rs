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

/// What the noise adds to a step, timed on its own (so machine drift between steps does not enter):
/// per layer one mask draw, the forward's masked copy of the weight and the weight gradient's mask
/// pass (timed as a second masked copy, which also allocates: an upper bound).
fn noise_work_alone(
    layers: &[&QLinear],
    rounds: usize,
) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    use qn_kernels::layout::{BlockLayout, LayerKind};
    use qn_kernels::noise::{block_drop, BlockMask, NoiseRate};
    use rand::SeedableRng;
    let p = NoiseRate::new(0.1)?;
    let mut out = Vec::new();
    for r in 0..rounds as u64 {
        let t = Instant::now();
        for l in layers {
            let w = l.vars()[0].as_tensor().clone();
            let layout = BlockLayout::new(l.name(), LayerKind::Linear, w.dims(), 8)?;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(r);
            let mask = BlockMask::sample(&layout, p, &mut rng);
            let fwd = block_drop(&w, &mask, p)?;
            let bwd = block_drop(&w, &mask, p)?;
            drop((fwd, bwd));
        }
        out.push(t.elapsed().as_secs_f64());
    }
    Ok(out)
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
    // (forward, backward, whole step) in seconds.
    type Times = (f64, f64, f64);
    let mut step = |noise: NoiseConfig, seed: u64| -> Result<Times, Box<dyn std::error::Error>> {
        fc1.set_noise(noise, 1)?;
        fc2.set_noise(noise, 2)?;
        qn_train::set_noise_step(&[&fc1, &fc2], seed, 0);
        let t = Instant::now();
        let h = fc1.forward_t(&x, true)?.gelu_erf()?;
        let y = fc2.forward_t(&h, true)?;
        let loss = y.sqr()?.mean_all()?;
        let forward = t.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        let backward = t.elapsed().as_secs_f64() - forward;
        opt.step(&grads, 1e-4)?;
        Ok((forward, backward, t.elapsed().as_secs_f64()))
    };
    let noise = NoiseConfig::BlockDrop {
        p: 0.1,
        block_size: 8,
    };
    step(NoiseConfig::None, 0)?;
    step(noise, 0)?;
    let (mut plain, mut noisy) = (Vec::new(), Vec::new());
    for r in 0..rounds as u64 {
        // A-B in even rounds, B-A in odd ones: whatever the first step of a pair pays (or the
        // second inherits) falls on both variants alike.
        if r % 2 == 0 {
            plain.push(step(NoiseConfig::None, r)?);
            noisy.push(step(noise, r)?);
        } else {
            noisy.push(step(noise, r)?);
            plain.push(step(NoiseConfig::None, r)?);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let part = |v: &[Times], f: fn(&Times) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        median(&mut x)
    };
    let (pf, pb) = (part(&plain, |t| t.0), part(&plain, |t| t.1));
    let (nf, nb) = (part(&noisy, |t| t.0), part(&noisy, |t| t.1));
    let mut plain: Vec<f64> = plain.iter().map(|t| t.2).collect();
    let mut noisy: Vec<f64> = noisy.iter().map(|t| t.2).collect();
    let fastest = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (pmin, nmin) = (fastest(&plain), fastest(&noisy));
    // Each round's noisy step over its plain partner: drift between rounds cancels.
    let mut paired: Vec<f64> = noisy.iter().zip(&plain).map(|(n, p)| n / p).collect();
    let pr = median(&mut paired);
    let (p, n) = (median(&mut plain), median(&mut noisy));
    let mut alone = noise_work_alone(&[&fc1, &fc2], rounds)?;
    let a = median(&mut alone);
    println!("FFN 768-3072-768 train step, batch 8x128, {rounds} interleaved rounds (median):");
    println!("  no noise              {:.1} ms", p * 1e3);
    println!("  block drop p=0.1 bs=8 {:.1} ms", n * 1e3);
    println!(
        "  forward / backward    {:.1} / {:.1} ms without noise, {:.1} / {:.1} ms with",
        pf * 1e3,
        pb * 1e3,
        nf * 1e3,
        nb * 1e3
    );
    println!("  overhead              {:+.1} %", (n / p - 1.0) * 100.0);
    println!(
        "  paired overhead       {:+.1} % (median of per-round ratios)",
        (pr - 1.0) * 100.0
    );
    println!(
        "  fastest of each       {:.1} / {:.1} ms = {:+.1} %",
        pmin * 1e3,
        nmin * 1e3,
        (nmin / pmin - 1.0) * 100.0
    );
    println!(
        "  noise work alone      {:.1} ms = {:.1} % of the no-noise step (mask draws + 2 mask passes per layer)",
        a * 1e3,
        a / p * 100.0
    );
    Ok(())
}
