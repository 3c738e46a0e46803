//! Quantizing a real transformer layer (all-MiniLM-L6-v2 layer 0, from `assets/`) into a `.qnz` in
//! memory: PQ with the paper's block sizes and K = 256, and int8 per channel.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use qn_format::{header::CodebookKind, Writer};
use qn_kernels::{
    export,
    layout::{default_block_size, BlockLayout, LayerKind},
    pq::{self, KMeansConfig},
    scalar::{self, Granularity, ScalarConfig},
};

fn bench(c: &mut Criterion) {
    let layer = qn_benches::minilm_layer();
    let mut g = c.benchmark_group("quantize all-MiniLM-L6-v2 layer 0 to .qnz");
    g.sample_size(10);
    g.bench_function("pq K=256, paper block sizes", |b| {
        b.iter(|| {
            let mut w = Writer::new();
            for (name, shape, v) in &layer {
                let kind = LayerKind::infer(name, 2).unwrap();
                let bs = default_block_size(name, kind, shape);
                let layout = BlockLayout::new(name, kind, shape, bs).unwrap();
                let t = Tensor::from_vec(v.clone(), shape.as_slice(), &Device::Cpu).unwrap();
                let codes = pq::encode(&t, &layout, &KMeansConfig::new(256), &mut |_| {}).unwrap();
                w.add(
                    name,
                    shape,
                    &export::pq_payload(&codes, CodebookKind::F16).unwrap(),
                )
                .unwrap();
            }
            let mut bytes = Vec::new();
            w.write_to(&mut bytes).unwrap();
            bytes.len()
        })
    });
    g.bench_function("int8 per channel", |b| {
        b.iter(|| {
            let mut w = Writer::new();
            let cfg = ScalarConfig::int8().with_granularity(Granularity::PerChannel { axis: 0 });
            for (name, shape, v) in &layer {
                let t = Tensor::from_vec(v.clone(), shape.as_slice(), &Device::Cpu).unwrap();
                let q = scalar::quantize(&t, &scalar::observe(&t, &cfg).unwrap()).unwrap();
                w.add(name, shape, &export::scalar_payload(&q).unwrap())
                    .unwrap();
            }
            let mut bytes = Vec::new();
            w.write_to(&mut bytes).unwrap();
            bytes.len()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
