//! Opening (full validation with CRCs) and decoding every tensor of a `.qnz` holding the
//! all-MiniLM-L6-v2 layer 0 as PQ (K = 256, paper block sizes): what `qn decompress` and a model
//! loader do.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qn_format::{header::CodebookKind, Reader, Writer};
use qn_kernels::{
    export,
    layout::{default_block_size, BlockLayout, LayerKind},
    pq::{self, KMeansConfig},
};

fn bench(c: &mut Criterion) {
    let layer = qn_benches::minilm_layer();
    let mut w = Writer::new();
    let mut values = 0u64;
    for (name, shape, v) in &layer {
        let kind = LayerKind::infer(name, 2).unwrap();
        let layout =
            BlockLayout::new(name, kind, shape, default_block_size(name, kind, shape)).unwrap();
        let t = Tensor::from_vec(v.clone(), shape.as_slice(), &Device::Cpu).unwrap();
        let codes = pq::encode(
            &t,
            &layout,
            &KMeansConfig::new(256).with_iters(5),
            &mut |_| {},
        )
        .unwrap();
        w.add(
            name,
            shape,
            &export::pq_payload(&codes, CodebookKind::F16).unwrap(),
        )
        .unwrap();
        values += v.len() as u64;
    }
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    let mut g = c.benchmark_group("open + decode a PQ .qnz of all-MiniLM-L6-v2 layer 0");
    g.throughput(Throughput::Bytes(values * 4));
    g.bench_function("bytes of f32 out", |b| {
        b.iter(|| {
            let r = Reader::from_bytes(&bytes).unwrap();
            r.views()
                .map(|v| v.decode_f32().unwrap().len())
                .sum::<usize>()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
