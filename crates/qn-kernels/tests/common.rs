//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Seeded N(mean, std) values.
pub fn gaussian(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, std).unwrap();
    (0..n).map(|_| normal.sample(&mut rng)).collect()
}

/// A seeded Gaussian tensor on the CPU.
pub fn gaussian_tensor(shape: &[usize], std: f32, seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(gaussian(n, std, seed), shape, &Device::Cpu).unwrap()
}

/// A seeded generator.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}
