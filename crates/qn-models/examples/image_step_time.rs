//! Noise overhead of an EfficientNet training step: the same network, batch and optimizer with no
//! noise and with block drop (p = 0.1, the paper's block sizes per layer kind) on every conv and
//! the classifier, interleaved A-B / B-A so that machine drift hits both alike. Prints each
//! variant's median step, the median of the paired ratios and each variant's fastest step.
//!
//! With a fifth argument `none` or `block`, runs only that variant for `rounds` steps and prints
//! its median: separate processes, run alternately, are the second estimator of the overhead
//! (no switching of the layers' noise between steps).
//!
//! ```text
//! cargo run --release -p qn-models --example image_step_time -- [variant] [image size] [batch] [rounds] [none|block]
//! cargo run --release -p qn-models --example image_step_time -- lite0 64 32 8
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use qn_models::vision::{EfficientNet, EfficientNetConfig};
use qn_train::optim::{AdamW, AdamWParams};
use qn_train::{named_vars, NoiseSpec, QuantModel};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    qn_train::allocator::retain_freed_memory();
    let arg = |i: usize| std::env::args().nth(i);
    let variant = arg(1).unwrap_or_else(|| "lite0".into());
    let size: usize = arg(2).map_or(Ok(64), |s| s.parse())?;
    let batch: usize = arg(3).map_or(Ok(32), |s| s.parse())?;
    let rounds: usize = arg(4).map_or(Ok(6), |s| s.parse())?;
    let dev = Device::Cpu;
    let cfg = EfficientNetConfig::variant(&variant, 10)?;
    let varmap = candle_nn::VarMap::new();
    let model = EfficientNet::new(
        &cfg,
        0,
        candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )?;
    let mut opt = AdamW::new(named_vars(&model), AdamWParams::default())?;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &dev)?;
    let y = Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect(), batch, &dev)?;
    let block: NoiseSpec = "block:p=0.1".parse()?;
    let none: NoiseSpec = "none".parse()?;
    let all = regex::Regex::new(".")?;
    let mut step = |spec: &NoiseSpec, s: u64| -> Result<f64, Box<dyn std::error::Error>> {
        qn_train::apply_noise_spec(&model.layers(), &all, |n, l| spec.resolve(n, l), 0)?;
        qn_train::set_noise_step(&model.layers(), s, 0);
        let t = Instant::now();
        let loss = qn_train::trainer::cross_entropy(&model.forward_t(&x, true)?, &y)?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-4)?;
        Ok(t.elapsed().as_secs_f64())
    };
    step(&none, 0)?;
    step(&block, 0)?;
    if let Some(only) = arg(5) {
        let spec = match only.as_str() {
            "none" => &none,
            "block" => &block,
            other => return Err(format!("fifth argument: `none` or `block`, not `{other}`").into()),
        };
        let steps: Vec<f64> = (0..rounds as u64)
            .map(|r| step(spec, r))
            .collect::<Result<_, _>>()?;
        println!(
            "EfficientNet-{variant} at {size} px, batch {batch}, {} threads, {only} only: median {:.3} s/step over {rounds} steps",
            rayon::current_num_threads(),
            median(steps)
        );
        return Ok(());
    }
    let (mut plain, mut noisy, mut ratios) = (vec![], vec![], vec![]);
    for r in 0..rounds as u64 {
        let (a, b) = if r % 2 == 0 {
            let a = step(&none, r)?;
            (a, step(&block, r)?)
        } else {
            let b = step(&block, r)?;
            (step(&none, r)?, b)
        };
        plain.push(a);
        noisy.push(b);
        ratios.push(b / a);
    }
    let fastest = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "EfficientNet-{variant} at {size} px, batch {batch}, {} threads, {rounds} rounds: no noise {:.3} s/step (fastest {:.3}), block drop p=0.1 {:.3} s/step (fastest {:.3}); paired overhead {:+.1} %, fastest-to-fastest {:+.1} %",
        rayon::current_num_threads(),
        median(plain.clone()),
        fastest(&plain),
        median(noisy.clone()),
        fastest(&noisy),
        100.0 * (median(ratios) - 1.0),
        100.0 * (fastest(&noisy) / fastest(&plain) - 1.0),
    );
    Ok(())
}
