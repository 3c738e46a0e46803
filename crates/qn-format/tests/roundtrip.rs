//! Every encoding round-trips; bit-packing at every width; atomic writes; ledger arithmetic.

mod common;

use common::{random_file, rng};
use qn_format::bitpack::{pack, packed_len, unpack};
use qn_format::header::{CodebookKind, Granularity, LayerKind, Scheme};
use qn_format::{Codebook, Error, Payload, Reader, Writer};
use rand::Rng;

#[test]
fn bit_packing_round_trips_at_every_width() {
    let mut r = rng(1);
    for bits in 1..=16u32 {
        for n in [0usize, 1, 7, 8, 9, 63, 64, 65, 1000] {
            let max = ((1u32 << bits) - 1) as u16;
            let values: Vec<u16> = (0..n).map(|_| r.random_range(0..=max)).collect();
            let bytes = pack(&values, bits);
            assert_eq!(
                bytes.len(),
                packed_len(n, bits).unwrap(),
                "bits {bits} n {n}"
            );
            assert_eq!(bytes.len(), (n * bits as usize).div_ceil(8));
            let mut back = vec![0u16; n];
            unpack(&bytes, bits, &mut back);
            assert_eq!(back, values, "bits {bits} n {n}");
        }
    }
    // LSB first: 3-bit codes 1, 2, 3 -> bits 001 010 011 -> 0b11_010_001, 0b0.
    assert_eq!(pack(&[1, 2, 3], 3), vec![0b1101_0001, 0b0]);
}

#[test]
fn random_valid_files_round_trip() {
    for seed in 0..300 {
        let n = (seed % 7) as usize;
        let (bytes, expect) = random_file(seed, n);
        let reader = Reader::from_bytes(&bytes).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(reader.tensors().len(), n);
        assert_eq!(reader.header().metadata["seed"], seed.to_string());
        for (name, shape, values) in &expect {
            let view = reader.tensor(name).unwrap();
            assert_eq!(&view.entry.shape, shape);
            assert_eq!(
                &view.decode_f32().unwrap(),
                values,
                "seed {seed} tensor {name} {:?}",
                view.entry.encoding
            );
        }
        let ledger = reader.ledger();
        assert_eq!(ledger.file_bytes, bytes.len() as u64);
        assert_eq!(
            ledger.file_bytes,
            ledger.header_bytes + ledger.padding_bytes + ledger.record_bytes()
        );
    }
}

#[test]
fn pq_sizes_are_exact() {
    // 1024 x 4096, d = 8, K = 256: 524,288 one-byte assignments + a 256 x 8 f16 codebook.
    let n_sub = 1024 * 4096 / 8;
    let mut w = Writer::new();
    let payload = Payload::Pq {
        layer: LayerKind::Linear,
        block_size: 8,
        k: 256,
        codebook: Codebook::from_f32(&vec![0.5; 256 * 8], CodebookKind::F16),
        assignments: (0..n_sub).map(|i| (i % 256) as u16).collect(),
    };
    w.add("w", &[1024, 4096], &payload).unwrap();
    // K = 300 needs 9 bits per assignment.
    let p300 = Payload::Pq {
        layer: LayerKind::Linear,
        block_size: 4,
        k: 300,
        codebook: Codebook::from_f32(&vec![0.5; 300 * 4], CodebookKind::Int8),
        assignments: vec![299; 64 * 64 / 4],
    };
    w.add("w300", &[64, 64], &p300).unwrap();
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    let r = Reader::from_bytes(&bytes).unwrap();
    let l = r.ledger();
    assert_eq!(l.entries[0].index_bytes, n_sub as u64);
    assert_eq!(l.entries[0].codebook_bytes, 256 * 8 * 2);
    assert_eq!(l.entries[1].index_bytes, (1024 * 9u64).div_ceil(8));
    assert_eq!(l.entries[1].codebook_bytes, 4 + 300 * 4);
    assert!(
        (l.entries[0].bits_per_weight - (1.0 + 256.0 * 8.0 * 16.0 / (1024.0 * 4096.0))).abs()
            < 1e-9
    );
    assert!(l.header_bytes < 1024, "header {} bytes", l.header_bytes);
}

#[test]
fn writer_rejects_inconsistent_tensors() {
    let mut w = Writer::new();
    let cases: Vec<(&str, Vec<usize>, Payload, &str)> = vec![
        (
            "short",
            vec![2, 2],
            Payload::raw_f32(&[1.0, 2.0, 3.0]),
            "12 bytes",
        ),
        (
            "code too big",
            vec![4],
            Payload::Scalar {
                bits: 2,
                scheme: Scheme::Affine,
                granularity: Granularity::PerTensor,
                codes: vec![0, 1, 2, 4],
                scales: vec![1.0],
                zero_points: vec![0],
            },
            "code 4",
        ),
        (
            "bad scale",
            vec![4],
            Payload::Scalar {
                bits: 4,
                scheme: Scheme::Affine,
                granularity: Granularity::PerTensor,
                codes: vec![0; 4],
                scales: vec![f32::NAN],
                zero_points: vec![0],
            },
            "scale NaN",
        ),
        (
            "fc.weight",
            vec![4, 10],
            Payload::Pq {
                layer: LayerKind::Linear,
                block_size: 8,
                k: 2,
                codebook: Codebook::F32(vec![0.0; 16]),
                assignments: vec![0; 5],
            },
            "block size 8 does not divide",
        ),
        (
            "index",
            vec![2, 4],
            Payload::Pq {
                layer: LayerKind::Linear,
                block_size: 2,
                k: 2,
                codebook: Codebook::F32(vec![0.0; 4]),
                assignments: vec![0, 1, 2, 0],
            },
            "assignment 2",
        ),
    ];
    for (name, shape, payload, msg) in cases {
        let err = w.add(name, &shape, &payload).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains(msg), "{name}: {err}");
    }
    w.add("x", &[1], &Payload::raw_f32(&[1.0])).unwrap();
    assert!(w
        .add("x", &[1], &Payload::raw_f32(&[1.0]))
        .unwrap_err()
        .to_string()
        .contains("twice"));
}

#[test]
fn files_are_written_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.qnz");
    let mut w = Writer::new();
    w.add("x", &[3], &Payload::raw_f32(&[1.0, 2.0, 3.0]))
        .unwrap();
    let n = w.write_file(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), n);
    let r = Reader::open(&path).unwrap();
    assert_eq!(
        r.tensor("x").unwrap().decode_f32().unwrap(),
        vec![1.0, 2.0, 3.0]
    );
    // Only the file itself is in the directory: no temporary left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // A directory that does not exist: an error naming the path, and nothing written.
    let bad = dir.path().join("missing/model.qnz");
    let err = w.write_file(&bad).unwrap_err();
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains("missing/model.qnz"),
        "{err}"
    );
    assert!(!bad.exists());
}

#[test]
fn missing_tensor_and_missing_file_are_errors() {
    let (bytes, _) = random_file(5, 2);
    let r = Reader::from_bytes(&bytes).unwrap();
    assert!(matches!(r.tensor("nope"), Err(Error::NotFound(_))));
    let err = Reader::open(std::path::Path::new("/nonexistent/x.qnz"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/x.qnz"), "{err}");
}

#[test]
fn a_file_that_is_not_a_qnz_is_named_once_with_its_first_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archive.zip");
    std::fs::write(&path, b"PK\x03\x04 and then twenty more bytes").unwrap();
    let err = Reader::open(&path).unwrap_err();
    assert!(matches!(&err, Error::InFile { error, .. } if matches!(**error, Error::Corrupt(_))));
    let text = err.to_string();
    let shown = path.display().to_string();
    assert!(
        text.starts_with(&format!("{shown}: corrupt .qnz: ")),
        "{text}"
    );
    assert_eq!(text.matches(&shown).count(), 1, "{text}");
    assert!(
        text.contains(r#"it starts with b"PK\x03\x04", not the magic b"QNZ\x00""#),
        "{text}"
    );
}

fn skewed_pq(k: usize, n_sub: usize, d: usize, seed: u64) -> Payload {
    let mut r = rng(seed);
    // Geometric-like cluster usage: low indices far more frequent.
    let assignments = (0..n_sub)
        .map(|_| (r.random::<f64>().powi(3) * k as f64) as u16)
        .collect();
    Payload::Pq {
        layer: LayerKind::Linear,
        block_size: d,
        k,
        codebook: Codebook::from_f32(
            &(0..k * d).map(|i| i as f32 / 100.0).collect::<Vec<_>>(),
            CodebookKind::F16,
        ),
        assignments,
    }
}

#[test]
fn rans_is_used_only_where_it_makes_the_record_smaller() {
    let shape = [256usize, 512];
    let skewed = skewed_pq(256, 256 * 512 / 8, 8, 1);
    let mut uniform_r = rng(2);
    let uniform = Payload::Pq {
        layer: LayerKind::Linear,
        block_size: 8,
        k: 256,
        codebook: Codebook::from_f32(&vec![0.0; 2048], CodebookKind::F16),
        assignments: (0..256 * 512 / 8)
            .map(|_| uniform_r.random_range(0..256u16))
            .collect(),
    };
    let write = |entropy: bool| {
        let mut w = Writer::new().with_entropy_coding(entropy);
        w.add("skewed", &shape, &skewed).unwrap();
        w.add("uniform", &shape, &uniform).unwrap();
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        bytes
    };
    let (packed, coded) = (write(false), write(true));
    let (rp, rc) = (
        Reader::from_bytes(&packed).unwrap(),
        Reader::from_bytes(&coded).unwrap(),
    );
    let enc = |r: &Reader<&[u8]>, n: &str| r.tensor(n).unwrap().entry.encoding;
    assert!(matches!(
        enc(&rc, "skewed"),
        qn_format::Encoding::Pq {
            rans_words: Some(_),
            ..
        }
    ));
    assert!(matches!(
        enc(&rc, "uniform"),
        qn_format::Encoding::Pq {
            rans_words: None,
            ..
        }
    ));
    for name in ["skewed", "uniform"] {
        assert_eq!(
            rp.tensor(name).unwrap().decode_f32().unwrap(),
            rc.tensor(name).unwrap().decode_f32().unwrap(),
            "{name}"
        );
    }
    let (lp, lc) = (rp.ledger(), rc.ledger());
    // rANS lands within 1 % of the empirical entropy (plus its 4-byte-per-symbol table).
    let Payload::Pq { assignments, .. } = &skewed else {
        unreachable!()
    };
    let mut counts = [0f64; 256];
    assignments.iter().for_each(|&a| counts[a as usize] += 1.0);
    let n = assignments.len() as f64;
    let entropy_bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0.0)
        .map(|&c| -c * (c / n).log2())
        .sum();
    let index_bytes = lc.entries[0].index_bytes as f64 - 4.0 * 256.0;
    assert!(
        index_bytes >= entropy_bits / 8.0 - 8.0,
        "{index_bytes} below the entropy {}",
        entropy_bits / 8.0
    );
    assert!(
        index_bytes <= entropy_bits / 8.0 * 1.01 + 16.0,
        "{index_bytes} vs entropy {}",
        entropy_bits / 8.0
    );
    assert!(lc.entries[0].bytes < lp.entries[0].bytes);
    assert_eq!(lc.entries[1].bytes, lp.entries[1].bytes);
    assert_eq!(
        lc.file_bytes,
        lc.header_bytes + lc.padding_bytes + lc.record_bytes()
    );
}
