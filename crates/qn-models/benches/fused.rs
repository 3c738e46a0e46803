//! The encoder's fused CPU kernels against their plain-op twins, forward + backward, on MiniLM's
//! training shapes (batch 32 × 64 tokens): `cargo bench -p qn-models --bench fused`.

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
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
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}
criterion_main!(benches);
