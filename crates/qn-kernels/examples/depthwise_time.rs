//! Depthwise convolution forward + backward on EfficientNet-Lite0's depthwise shapes (batch 8,
//! 224 px): the fused op and candle's grouped `conv2d` (its plain twin), median of `reps` runs each.
//! `scripts/depthwise_vs_torch.sh` runs this and PyTorch's on the same shapes in one go.
//! `--kernels` times the fused op's two CPU kernels (rows, channel blocks) instead of the twin.
//!
//! ```text
//! cargo run --release -p qn-kernels --example depthwise_time -- [reps] [--fused-only | --kernels]
//! ```

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use qn_kernels::conv::{
    depthwise_conv2d, depthwise_conv2d_reference, depthwise_conv2d_with, DepthwiseKernel, Padding2d,
};

/// (channels, size, kernel, stride) of the 16 MBConv blocks of Lite0 at 224 px, repeats merged.
pub const LITE0_SHAPES: [(usize, usize, usize, usize); 12] = [
    (32, 112, 3, 1),
    (96, 112, 3, 2),
    (144, 56, 3, 1),
    (144, 56, 5, 2),
    (240, 28, 5, 1),
    (240, 28, 3, 2),
    (480, 14, 3, 1),
    (480, 14, 5, 1),
    (672, 14, 5, 1),
    (672, 14, 5, 2),
    (1152, 7, 5, 1),
    (1152, 7, 3, 1),
];

type Conv = fn(&Tensor, &Tensor, usize, Padding2d) -> qn_kernels::Result<Tensor>;

fn time(conv: Conv, c: usize, hw: usize, k: usize, s: usize, reps: usize) -> f64 {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, c, hw, hw), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (c, 1, k, k), &dev).unwrap()).unwrap();
    let pad = Padding2d::symmetric(k / 2);
    let mut runs = Vec::new();
    for _ in 0..reps + 1 {
        let t = Instant::now();
        let y = conv(&x, &w, s, pad).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        std::hint::black_box(g.get(&w).unwrap());
        runs.push(t.elapsed().as_secs_f64());
    }
    runs.remove(0);
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reps: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5);
    let fused_only = args.iter().any(|a| a == "--fused-only");
    if args.iter().any(|a| a == "--kernels") {
        return compare_kernels(reps);
    }
    let (mut total_f, mut total_r) = (0.0, 0.0);
    println!("shape (batch 8)      fused fwd+bwd   candle grouped conv2d");
    for (c, hw, k, s) in LITE0_SHAPES {
        let f = time(depthwise_conv2d, c, hw, k, s, reps);
        total_f += f;
        let r = if fused_only {
            f64::NAN
        } else {
            time(depthwise_conv2d_reference, c, hw, k, s, reps.min(3))
        };
        total_r += r;
        println!(
            "{c:4}x{hw:3}x{hw:<3} k{k} s{s}   {:9.2} ms   {:9.2} ms",
            f * 1e3,
            r * 1e3
        );
    }
    println!(
        "sum                  {:9.2} ms   {:9.2} ms",
        total_f * 1e3,
        total_r * 1e3
    );
}

fn rows(x: &Tensor, w: &Tensor, s: usize, p: Padding2d) -> qn_kernels::Result<Tensor> {
    depthwise_conv2d_with(x, w, s, p, DepthwiseKernel::Rows)
}

fn blocks(x: &Tensor, w: &Tensor, s: usize, p: Padding2d) -> qn_kernels::Result<Tensor> {
    depthwise_conv2d_with(x, w, s, p, DepthwiseKernel::ChannelBlocks)
}

/// Both CPU kernels and the automatic choice, per shape.
fn compare_kernels(reps: usize) {
    let mut totals = [0.0; 3];
    println!("shape (batch 8)           rows   ch-blocks        auto   (ms, fwd+bwd)");
    for (c, hw, k, s) in LITE0_SHAPES {
        let t = [
            time(rows, c, hw, k, s, reps),
            time(blocks, c, hw, k, s, reps),
            time(depthwise_conv2d, c, hw, k, s, reps),
        ];
        totals.iter_mut().zip(&t).for_each(|(a, b)| *a += b);
        println!(
            "{c:4}x{hw:3}x{hw:<3} k{k} s{s}   {:9.2}   {:9.2}   {:9.2}",
            t[0] * 1e3,
            t[1] * 1e3,
            t[2] * 1e3
        );
    }
    println!(
        "sum                    {:9.2}   {:9.2}   {:9.2}",
        totals[0] * 1e3,
        totals[1] * 1e3,
        totals[2] * 1e3
    );
}
