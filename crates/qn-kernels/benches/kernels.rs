//! Criterion benches of every hot path of qn-kernels, on the 1024 x 4096 N(0, 0.02) matrix.
//!
//! `cargo bench -p qn-kernels` (or `cargo xtask bench-kernels`). Each optimised kernel is measured
//! next to its plain-tensor `*_reference` twin, so the report reads as a ratio in one run.

use std::hint::black_box;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qn_kernels::{
    layout::BlockLayout,
    noise::{block_drop, pq_noise, scalar_noise, BlockMask, NoiseRate},
    pq::{self, assign_nearest, assign_nearest_reference, CentroidTable, KMeansConfig},
    scalar::{self, Granularity, ScalarConfig},
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

const ROWS: usize = 1024;
const COLS: usize = 4096;

fn matrix() -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let normal = Normal::new(0.0f32, 0.02).unwrap();
    let v: Vec<f32> = (0..ROWS * COLS).map(|_| normal.sample(&mut rng)).collect();
    Tensor::from_vec(v, (ROWS, COLS), &Device::Cpu).unwrap()
}

fn bench_kmeans(c: &mut Criterion) {
    let w = matrix();
    let layout = BlockLayout::linear("w", w.dims(), 8).unwrap();
    let sub = layout
        .to_subvectors(&w)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut g = c.benchmark_group("kmeans");
    g.sample_size(10);
    g.bench_function("1024x4096 d8 K256 20 iters", |b| {
        b.iter(|| pq::kmeans(black_box(&sub), 8, &KMeansConfig::new(256), &mut |_| {}).unwrap())
    });
    g.bench_function("1024x4096 d8 K256 20 iters, Hamerly bounds", |b| {
        let cfg = KMeansConfig::new(256).with_bounds(true);
        b.iter(|| pq::kmeans(black_box(&sub), 8, &cfg, &mut |_| {}).unwrap())
    });
    // Activation-aware: one 8 x 8 second-moment block per block position, from 512 inputs whose
    // feature scales span two decades (the same work as above plus the per-position tables and
    // the d x d solves).
    let inputs: Vec<f32> = {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let normal = Normal::new(0.0f32, 1.0).unwrap();
        (0..512 * COLS)
            .map(|i| {
                normal.sample(&mut rng) * 10f32.powf((i % COLS) as f32 / COLS as f32 * 2.0 - 1.0)
            })
            .collect()
    };
    let metric = pq::BlockMetric::from_inputs(&inputs, COLS, 8, ROWS).unwrap();
    g.bench_function(
        "1024x4096 d8 K256 20 iters, activation-aware (kmeans_weighted)",
        |b| {
            b.iter(|| {
                pq::kmeans_weighted(
                    black_box(&sub),
                    &metric,
                    &KMeansConfig::new(256),
                    &mut |_| {},
                )
                .unwrap()
            })
        },
    );
    g.finish();

    let km = pq::kmeans(&sub, 8, &KMeansConfig::new(256).with_iters(2), &mut |_| {}).unwrap();
    let table = CentroidTable::new(&km.centroids, 256, 8).unwrap();
    let n = sub.len() / 8;
    let (mut index, mut partial) = (vec![0u32; n], vec![0f32; n]);
    let mut g = c.benchmark_group("assign_nearest 524288 points d8 K256");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("kernel", |b| {
        b.iter(|| assign_nearest(black_box(&sub), &table, &mut index, &mut partial).unwrap())
    });
    let mut second = vec![0f32; n];
    g.bench_function("kernel with runner-up (top2)", |b| {
        b.iter(|| {
            pq::assign_nearest_top2(
                black_box(&sub),
                &table,
                &mut index,
                &mut partial,
                &mut second,
            )
            .unwrap()
        })
    });
    let points = Tensor::from_slice(&sub, (n, 8), &Device::Cpu).unwrap();
    let centroids = Tensor::from_slice(&km.centroids, (256, 8), &Device::Cpu).unwrap();
    g.bench_function("reference (matmul + argmin)", |b| {
        b.iter(|| assign_nearest_reference(black_box(&points), &centroids).unwrap())
    });
    g.finish();
}

fn bench_scalar(c: &mut Criterion) {
    let w = matrix();
    let mut g = c.benchmark_group("fake_quantize 1024x4096");
    g.throughput(Throughput::Bytes((ROWS * COLS * 4) as u64));
    for (name, cfg) in [
        ("int8 per-tensor", ScalarConfig::int8()),
        (
            "int4 per-channel",
            ScalarConfig::int4().with_granularity(Granularity::PerChannel { axis: 0 }),
        ),
        (
            "int4 group 128",
            ScalarConfig::int4().with_granularity(Granularity::PerGroup { size: 128 }),
        ),
    ] {
        let params = scalar::observe(&w, &cfg).unwrap();
        g.bench_function(name, |b| {
            b.iter(|| scalar::fake_quantize(black_box(&w), &params).unwrap())
        });
    }
    g.sample_size(10);
    g.bench_function("observe int8 per-tensor histogram", |b| {
        let cfg = ScalarConfig::int8().with_observer(scalar::ObserverKind::HISTOGRAM);
        b.iter(|| scalar::observe(black_box(&w), &cfg).unwrap())
    });
    g.finish();
}

fn bench_noise(c: &mut Criterion) {
    let w = matrix();
    let layout = BlockLayout::linear("w", w.dims(), 8).unwrap();
    let p = NoiseRate::new(0.1).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut g = c.benchmark_group("noise 1024x4096 p0.1");
    g.throughput(Throughput::Bytes((ROWS * COLS * 4) as u64));
    g.bench_function("mask sample (block 8)", |b| {
        b.iter(|| BlockMask::sample(&layout, p, &mut rng))
    });
    let mask = BlockMask::sample(&layout, p, &mut rng);
    g.bench_function("block_drop (mask given)", |b| {
        b.iter(|| block_drop(black_box(&w), &mask, p).unwrap())
    });
    let per_element = BlockLayout::linear("w", w.dims(), 1).unwrap();
    let emask = BlockMask::sample(&per_element, p, &mut rng);
    let params = scalar::observe(&w, &ScalarConfig::int8()).unwrap();
    g.bench_function("scalar_noise int8 per element", |b| {
        b.iter(|| scalar_noise(black_box(&w), &params, &emask).unwrap())
    });
    g.bench_function("scalar_noise_reference int8 per element", |b| {
        b.iter(|| {
            qn_kernels::noise::scalar_noise_reference(black_box(&w), &params, &emask).unwrap()
        })
    });
    let codes = pq::encode(
        &w,
        &layout,
        &KMeansConfig::new(256).with_iters(2),
        &mut |_| {},
    )
    .unwrap();
    g.sample_size(10);
    g.bench_function("pq_noise d8 K256", |b| {
        b.iter(|| pq_noise(black_box(&w), &codes, &mask).unwrap())
    });
    g.finish();
}

fn bench_decode(c: &mut Criterion) {
    let w = matrix();
    let layout = BlockLayout::linear("w", w.dims(), 8).unwrap();
    let codes = pq::encode(
        &w,
        &layout,
        &KMeansConfig::new(256).with_iters(2),
        &mut |_| {},
    )
    .unwrap();
    let mut g = c.benchmark_group("pq decode 1024x4096 d8 K256 (bytes = f32 out)");
    g.throughput(Throughput::Bytes((ROWS * COLS * 4) as u64));
    g.bench_function("decode", |b| b.iter(|| codes.decode().unwrap()));
    g.bench_function("decode_reference (index_select + transpose)", |b| {
        b.iter(|| codes.decode_reference().unwrap())
    });
    g.finish();
}

/// One input row through a PQ-coded 1024 x 4096 layer: tables + gathers against decode + matmul
/// (cache-hot here; `examples/lut_gemv.rs` cycles through layers for the cold figure).
fn bench_pq_matmul(c: &mut Criterion) {
    let w = matrix();
    let layout = BlockLayout::linear("w", w.dims(), 8).unwrap();
    let codes = pq::encode(
        &w,
        &layout,
        &KMeansConfig::new(256).with_iters(2),
        &mut |_| {},
    )
    .unwrap();
    let m = pq::PqMatmul::new(&codes).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, COLS), &Device::Cpu).unwrap();
    let dense = codes.decode().unwrap();
    let mut g = c.benchmark_group("pq matmul 1 x 4096 by 1024 x 4096 d8 K256");
    g.bench_function("tables (PqMatmul)", |b| {
        b.iter(|| m.forward(black_box(&x)).unwrap())
    });
    g.bench_function("dense matmul (weight decoded once)", |b| {
        b.iter(|| black_box(&x).matmul(&dense.t().unwrap()).unwrap())
    });
    g.bench_function("reference (decode + matmul)", |b| {
        b.iter(|| pq::pq_matmul_reference(black_box(&x), &codes).unwrap())
    });
    g.finish();
}

/// One input row through an int8 (per output channel) 1024 x 4096 layer: dequantisation inside
/// the dot products against dequantise + matmul and the dense matmul (cache-hot; the cold figure
/// is `examples/lut_gemv.rs`'s `int8` lines).
fn bench_scalar_matmul(c: &mut Criterion) {
    use qn_kernels::scalar::{scalar_matmul, scalar_matmul_reference};
    let w = matrix();
    let config = ScalarConfig::int8().with_granularity(Granularity::PerChannel { axis: 0 });
    let q = scalar::quantize(&w, &scalar::observe(&w, &config).unwrap()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, COLS), &Device::Cpu).unwrap();
    let dense = scalar::dequantize(&q).unwrap();
    let mut g = c.benchmark_group("int8 matmul 1 x 4096 by 1024 x 4096 per channel");
    g.bench_function("from codes (scalar_matmul)", |b| {
        b.iter(|| scalar_matmul(black_box(&x), &q).unwrap())
    });
    g.bench_function("dense matmul (weight dequantised once)", |b| {
        b.iter(|| black_box(&x).matmul(&dense.t().unwrap()).unwrap())
    });
    g.bench_function("reference (dequantise + matmul)", |b| {
        b.iter(|| scalar_matmul_reference(black_box(&x), &q).unwrap())
    });
    g.finish();
}

/// Depthwise convolution forward + backward on one of EfficientNet-Lite0's shapes (8 x 144 x 56²,
/// k3): the fused op's two CPU kernels against candle's grouped conv2d.
fn bench_depthwise(c: &mut Criterion) {
    use candle_core::Var;
    use qn_kernels::conv::{
        depthwise_conv2d_reference, depthwise_conv2d_with, DepthwiseKernel, Padding2d,
    };
    let dev = candle_core::Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 144, 56, 56), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (144, 1, 3, 3), &dev).unwrap()).unwrap();
    let pad = Padding2d::symmetric(1);
    let mut g = c.benchmark_group("depthwise 8x144x56x56 k3 fwd+bwd");
    g.sample_size(10);
    type Conv = fn(&Tensor, &Tensor, usize, Padding2d) -> qn_kernels::Result<Tensor>;
    let run = |conv: Conv| {
        let y = conv(&x, &w, 1, pad).unwrap();
        y.sum_all().unwrap().backward().unwrap()
    };
    let blocks: Conv =
        |x, w, s, p| depthwise_conv2d_with(x, w, s, p, DepthwiseKernel::ChannelBlocks);
    let rows: Conv = |x, w, s, p| depthwise_conv2d_with(x, w, s, p, DepthwiseKernel::Rows);
    g.bench_function("fused, channel blocks", |b| b.iter(|| run(blocks)));
    g.bench_function("fused, rows", |b| b.iter(|| run(rows)));
    g.bench_function("candle conv2d groups=C", |b| {
        b.iter(|| run(depthwise_conv2d_reference))
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_kmeans,
    bench_scalar,
    bench_noise,
    bench_decode,
    bench_pq_matmul,
    bench_scalar_matmul,
    bench_depthwise
);
criterion_main!(benches);
