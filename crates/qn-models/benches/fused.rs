//! The encoder's fused CPU kernels against their plain-op twins, forward + backward, on MiniLM's
//! training shapes (batch 32 × 64 tokens): `cargo bench -p qn-models --bench fused`.

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use qn_models::encoder::attention::{self_attention, self_attention_reference, ProbsDropout};
use qn_models::encoder::{fused, ops};

fn fwd_bwd(inputs: &[Var], f: &dyn Fn(&[Tensor]) -> Tensor) {
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let g = y.sum_all().unwrap().backward().unwrap();
    std::hint::black_box(g);
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let var = |shape: &[usize]| Var::randn(0f32, 1.0, shape, &dev).unwrap();
    let (x, w, b) = (var(&[2048, 384]), var(&[384]), var(&[384]));
    let ln = [x, w, b];
    let mut g = c.benchmark_group("layer_norm 2048x384 fwd+bwd");
    g.bench_function("fused", |bch| {
        bch.iter(|| {
            fwd_bwd(&ln, &|t| {
                fused::layer_norm(&t[0], &t[1], &t[2], 1e-12).unwrap()
            })
        })
    });
    g.bench_function("plain ops", |bch| {
        bch.iter(|| {
            fwd_bwd(&ln, &|t| {
                ops::layer_norm_reference(&t[0], &t[1], &t[2], 1e-12).unwrap()
            })
        })
    });
    g.finish();
    let h = [var(&[2048, 1536])];
    let mut g = c.benchmark_group("gelu 2048x1536 fwd+bwd");
    g.bench_function("fused", |bch| {
        bch.iter(|| fwd_bwd(&h, &|t| fused::gelu_erf(&t[0]).unwrap()))
    });
    // The same kernel compiled for the build's baseline (SSE2), as it ran before `multiversion!`.
    g.bench_function("fused, baseline instruction set", |bch| {
        qn_kernels::simd::cap_level(qn_kernels::simd::Level::Baseline);
        bch.iter(|| fwd_bwd(&h, &|t| fused::gelu_erf(&t[0]).unwrap()));
        qn_kernels::simd::cap_level(qn_kernels::simd::Level::Avx512);
    });
    g.bench_function("candle gelu_erf", |bch| {
        bch.iter(|| fwd_bwd(&h, &|t| t[0].gelu_erf().unwrap()))
    });
    g.finish();
    let s = [var(&[32, 12, 64, 64])];
    let mut g = c.benchmark_group("softmax 32x12x64x64 fwd+bwd");
    g.bench_function("fused", |bch| {
        bch.iter(|| fwd_bwd(&s, &|t| fused::softmax_last_dim(&t[0]).unwrap()))
    });
    g.bench_function("plain ops", |bch| {
        bch.iter(|| fwd_bwd(&s, &|t| ops::softmax_reference(&t[0]).unwrap()))
    });
    g.finish();
    let qkv = [
        var(&[32, 64, 384]),
        var(&[32, 64, 384]),
        var(&[32, 64, 384]),
    ];
    let bias = Tensor::zeros((32, 1, 1, 64), candle_core::DType::F32, &dev).unwrap();
    let drop = Some(ProbsDropout { p: 0.1, seed: 7 });
    let mut g = c.benchmark_group("attention 32x64x384, 12 heads, dropout 0.1, fwd+bwd");
    g.bench_function("fused", |bch| {
        bch.iter(|| {
            fwd_bwd(&qkv, &|t| {
                self_attention(&t[0], &t[1], &t[2], &bias, 12, drop).unwrap()
            })
        })
    });
    g.bench_function("plain ops", |bch| {
        bch.iter(|| {
            fwd_bwd(&qkv, &|t| {
                self_attention_reference(&t[0], &t[1], &t[2], &bias, 12, drop).unwrap()
            })
        })
    });
    g.finish();
    let xr = [var(&[2048, 384]), var(&[2048, 384])];
    let at = qn_train::NoiseStep { step: 1, micro: 0 };
    let mut g = c.benchmark_group("dropout 0.1 + residual 2048x384 fwd+bwd");
    g.bench_function("fused", |bch| {
        bch.iter(|| {
            fwd_bwd(&xr, &|t| {
                ops::dropout_add(&t[0], &t[1], 0.1, 3, at, 1).unwrap()
            })
        })
    });
    g.bench_function("plain ops", |bch| {
        bch.iter(|| {
            fwd_bwd(&xr, &|t| {
                let mask = ops::dropout_mask(ops::mask_seed(3, at, 1), t[0].elem_count(), 0.1);
                (ops::dropout_reference(&t[0], mask).unwrap() + &t[1]).unwrap()
            })
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}
criterion_main!(benches);
