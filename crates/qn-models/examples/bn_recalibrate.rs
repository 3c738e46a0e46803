//! Re-estimates an EfficientNet's batch-norm running statistics without noise, then evaluates:
//! the check of BENCHMARKS.md's finding that a model fine-tuned with block drop loses accuracy in
//! float because its statistics were gathered on noised activations.
//!
//! ```text
//! cargo run --release -p qn-models --example bn_recalibrate -- <model.safetensors> <fashion-mnist dir> [batches] [size]
//! ```
//!
//! Training-mode forward passes (no backward, no noise: a freshly loaded model has none) over
//! `batches` batches of 32 training images move the running statistics (momentum 0.01 per batch);
//! the test accuracy is printed before and after.

use std::path::PathBuf;

use candle_core::Device;
use qn_models::train::QuantModel;
use qn_models::vision::{idx_images, load_efficientnet, Normalization};

fn accuracy(
    model: &dyn QuantModel,
    x: &candle_core::Tensor,
    y: &[u32],
) -> candle_core::Result<f64> {
    let mut correct = 0;
    for start in (0..y.len()).step_by(250) {
        let n = 250.min(y.len() - start);
        let pred = model
            .forward_t(&x.narrow(0, start, n)?, false)?
            .argmax(1)?
            .to_vec1::<u32>()?;
        correct += pred
            .iter()
            .zip(&y[start..start + n])
            .filter(|(p, g)| p == g)
            .count();
    }
    Ok(correct as f64 / y.len() as f64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        return Err(
            "usage: bn_recalibrate <model.safetensors> <fashion-mnist dir> [batches] [size]".into(),
        );
    }
    let (weights, data) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let batches: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(300);
    let size: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let dev = Device::Cpu;
    let model = load_efficientnet(&weights, None, None, 0, &dev)?.model;
    let norm = Normalization::SIGNED_UNIT;
    let test = idx_images(&data, "t10k", Some(2000), size, norm, &dev)?;
    let gold = test.y.to_vec1::<u32>()?;
    println!(
        "before: {:.2} % on {} test images",
        accuracy(&model, &test.x, &gold)? * 100.0,
        gold.len()
    );
    let train = idx_images(&data, "train", Some(8000), size, norm, &dev)?;
    for b in 0..batches {
        let start = (b * 32) % (train.len() - 32);
        model.forward_t(&train.x.narrow(0, start, 32)?, true)?;
    }
    println!(
        "after {batches} noise-free training-mode batches: {:.2} %",
        accuracy(&model, &test.x, &gold)? * 100.0
    );
    Ok(())
}
