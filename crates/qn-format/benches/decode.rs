//! Decode throughput of `.qnz` records (bytes = f32 written), on a 1024 x 4096 weight.
//!
//! `cargo bench -p qn-format`; the numpy comparison is `cargo xtask bench-format --vs-numpy`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qn_format::header::{CodebookKind, Granularity, LayerKind, RawDType, Scheme};
use qn_format::{Codebook, Payload, Reader, Writer};
use rand::{Rng, SeedableRng};

const ROWS: usize = 1024;
const COLS: usize = 4096;

fn file(payload: &Payload) -> Vec<u8> {
    let mut w = Writer::new();
    w.add("w", &[ROWS, COLS], payload).unwrap();
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    bytes
}

fn pq(d: usize, k: usize, r: &mut impl Rng) -> Payload {
    Payload::Pq {
        layer: LayerKind::Linear,
        block_size: d,
        k,
        codebook: Codebook::from_f32(
            &(0..k * d).map(|_| r.random::<f32>()).collect::<Vec<_>>(),
            CodebookKind::F16,
        ),
        assignments: (0..ROWS * COLS / d)
            .map(|_| r.random_range(0..k) as u16)
            .collect(),
    }
}

fn bench(c: &mut Criterion) {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let cases = vec![
        ("pq d8 K256 (8-bit indices)", file(&pq(8, 256, &mut r))),
        ("pq d4 K256", file(&pq(4, 256, &mut r))),
        ("pq d8 K512 (9-bit indices)", file(&pq(8, 512, &mut r))),
        (
            "int4 per-channel",
            file(&Payload::Scalar {
                bits: 4,
                scheme: Scheme::Affine,
                granularity: Granularity::PerChannel { axis: 0 },
                codes: (0..ROWS * COLS).map(|_| r.random_range(0..16u8)).collect(),
                scales: vec![0.01; ROWS],
                zero_points: vec![8; ROWS],
            }),
        ),
        (
            "raw f16",
            file(&Payload::Raw {
                dtype: RawDType::F16,
                bytes: (0..ROWS * COLS * 2).map(|_| r.random()).collect(),
            }),
        ),
    ];
    let mut g = c.benchmark_group("decode 1024x4096 (bytes = f32 out)");
    g.throughput(Throughput::Bytes((ROWS * COLS * 4) as u64));
    let mut out = vec![0f32; ROWS * COLS];
    for (name, bytes) in &cases {
        let reader = Reader::from_bytes(bytes).unwrap();
        let view = reader.tensor("w").unwrap();
        g.bench_function(*name, |b| b.iter(|| view.decode_into(&mut out).unwrap()));
    }
    g.finish();
    let mut g = c.benchmark_group("open + validate (CRC) 1024x4096");
    let bytes = &cases[0].1;
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("pq d8 K256", |b| {
        b.iter(|| Reader::from_bytes(bytes).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
