//! Times a layer's forward from PQ codes (`PqMatmul`, tables + gathers) against candle's dense
//! f32 matmul on the same shapes, as a model's forward sees them: the layers are cycled through so
//! that the dense weights (≥ `MB` megabytes in all, default 340, the 72 linear layers of a
//! BERT-base encoder) do not stay in the last-level cache; the cache-hot figure (one layer again
//! and again) is printed too. Then the crossover of `PqMatmul::forward`: tables against decode +
//! dense matmul for 1 to 2,048 input rows (32 sentences × 64 tokens). The same two measurements
//! for int8 codes (per output channel) through `scalar_matmul` (dequantisation inside the dot
//! products) follow, on lines marked `int8`, with the whole-weight dequantise-then-matmul the
//! tiled dense path replaced. `scripts/lut_gemv.sh` runs this beside numpy's BLAS.
//!
//! ```text
//! cargo run --release -p qn-kernels --example lut_gemv -- [MB] [ROUNDS]
//! ```
//! Prints one line per measurement: `shape mode ours_us dense_us`.

use std::hint::black_box;
use std::time::Instant;

use candle_core::{Device, Tensor};
use qn_kernels::layout::BlockLayout;
use qn_kernels::pq::{Assignments, PqCodes, PqMatmul};
use qn_kernels::scalar::{
    observe, quantize, scalar_matmul, scalar_matmul_reference, scalar_matmul_with, Granularity,
    QuantizedTensor, ScalarConfig,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SHAPES: [(usize, usize); 4] = [(384, 1536), (1536, 384), (768, 3072), (1024, 4096)];

fn random_codes(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> PqCodes {
    let (d, k) = (8, 256);
    let layout = BlockLayout::linear("w", &[rows, cols], d).unwrap();
    let centroids: Vec<f32> = (0..k * d).map(|_| rng.random::<f32>() - 0.5).collect();
    let a: Vec<u8> = (0..layout.n_blocks()).map(|_| rng.random::<u8>()).collect();
    PqCodes::new(
        Tensor::from_vec(centroids, (k, d), &Device::Cpu).unwrap(),
        Assignments::U8(a),
        layout,
    )
    .unwrap()
}

/// Median of `rounds` passes over `n` calls, in µs per call.
fn time(rounds: usize, n: usize, mut f: impl FnMut(usize)) -> f64 {
    let mut per = Vec::with_capacity(rounds);
    for r in 0..rounds + 1 {
        let t = Instant::now();
        for i in 0..n {
            f(i);
        }
        if r > 0 {
            per.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
        }
    }
    per.sort_by(f64::total_cmp);
    per[per.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mb: f64 = args.first().map_or(340.0, |s| s.parse().expect("MB"));
    let rounds: usize = args.get(1).map_or(5, |s| s.parse().expect("ROUNDS"));
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    println!("# shape mode ours_us dense_us ratio(dense/ours)");
    for (rows, cols) in SHAPES {
        let layers = ((mb * 1e6) / (4.0 * (rows * cols) as f64)).ceil() as usize;
        let codes: Vec<PqCodes> = (0..layers)
            .map(|_| random_codes(rows, cols, &mut rng))
            .collect();
        let tables: Vec<PqMatmul> = codes.iter().map(|c| PqMatmul::new(c).unwrap()).collect();
        let dense: Vec<Tensor> = codes.iter().map(|c| c.decode().unwrap()).collect();
        let x = Tensor::randn(0f32, 1.0, (1, cols), &Device::Cpu).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut y = vec![0f32; rows];
        let cold_ours = time(rounds, layers, |i| {
            tables[i].forward_slice(&xs, 1, &mut y);
            black_box(&y);
        });
        let cold_dense = time(rounds, layers, |i| {
            black_box(x.matmul(&dense[i].t().unwrap()).unwrap());
        });
        println!(
            "{rows}x{cols} cold({layers}) {cold_ours:.1} {cold_dense:.1} {:.2}",
            cold_dense / cold_ours
        );
        let hot_ours = time(rounds, 200, |_| {
            tables[0].forward_slice(&xs, 1, &mut y);
            black_box(&y);
        });
        let hot_dense = time(rounds, 200, |_| {
            black_box(x.matmul(&dense[0].t().unwrap()).unwrap());
        });
        println!(
            "{rows}x{cols} hot {hot_ours:.1} {hot_dense:.1} {:.2}",
            hot_dense / hot_ours
        );
        drop(tables);
        let int8 = ScalarConfig::int8().with_granularity(Granularity::PerChannel { axis: 0 });
        let coded: Vec<QuantizedTensor> = dense
            .iter()
            .map(|w| quantize(w, &observe(w, &int8).unwrap()).unwrap())
            .collect();
        let cold_ours = time(rounds, layers, |i| {
            black_box(scalar_matmul(&x, &coded[i]).unwrap());
        });
        let cold_dense = time(rounds, layers, |i| {
            black_box(x.matmul(&dense[i].t().unwrap()).unwrap());
        });
        println!(
            "{rows}x{cols} int8-cold({layers}) {cold_ours:.1} {cold_dense:.1} {:.2}",
            cold_dense / cold_ours
        );
        let hot_ours = time(rounds, 200, |_| {
            black_box(scalar_matmul(&x, &coded[0]).unwrap());
        });
        let hot_dense = time(rounds, 200, |_| {
            black_box(x.matmul(&dense[0].t().unwrap()).unwrap());
        });
        println!(
            "{rows}x{cols} int8-hot {hot_ours:.1} {hot_dense:.1} {:.2}",
            hot_dense / hot_ours
        );
    }
    // The crossover of `PqMatmul::forward`: tables against decode + one dense matmul, by input
    // rows, through one 3072 x 768 layer (an FFN's first matmul in BERT-base), ending at a batch of
    // 32 x 64 tokens.
    let (rows, cols) = (3072, 768);
    let codes = random_codes(rows, cols, &mut rng);
    let tables = PqMatmul::new(&codes)
        .unwrap()
        .with_max_table_rows(usize::MAX);
    let dense = PqMatmul::new(&codes).unwrap().with_max_table_rows(0);
    for n in [1usize, 2, 4, 8, 16, 32, 64, 2048] {
        let x = Tensor::randn(0f32, 1.0, (n, cols), &Device::Cpu).unwrap();
        let reps = (64 / n).max(2);
        let ours = time(rounds, reps, |_| {
            black_box(tables.forward(&x).unwrap());
        });
        let dec = time(rounds, reps, |_| {
            black_box(dense.forward(&x).unwrap());
        });
        println!(
            "{rows}x{cols} rows{n} tables {ours:.1} decode+dense {dec:.1} {:.2}",
            dec / ours
        );
    }
    let w = codes.decode().unwrap();
    let int8 = ScalarConfig::int8().with_granularity(Granularity::PerChannel { axis: 0 });
    let q = quantize(&w, &observe(&w, &int8).unwrap()).unwrap();
    for n in [1usize, 2, 4, 8, 16, 32, 64, 2048] {
        let x = Tensor::randn(0f32, 1.0, (n, cols), &Device::Cpu).unwrap();
        let reps = (64 / n).max(2);
        let ours = time(rounds, reps, |_| {
            black_box(scalar_matmul_with(&x, &q, usize::MAX).unwrap());
        });
        let dec = time(rounds, reps, |_| {
            black_box(scalar_matmul_with(&x, &q, 0).unwrap());
        });
        // The whole weight dequantised, then candle's matmul: what the tiled dense path replaced.
        let whole = time(rounds, reps, |_| {
            black_box(scalar_matmul_reference(&x, &q).unwrap());
        });
        println!(
            "{rows}x{cols} int8-rows{n} codes {ours:.1} dequantize+dense {dec:.1} {:.2} whole-dequantize+matmul {whole:.1}",
            dec / ours
        );
    }
}
