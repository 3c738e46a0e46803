//! Corrupt input gives an error, never a panic and never a silently wrong tensor.

mod common;

use common::{random_file, rng};
use qn_format::{Error, Reader, FORMAT_VERSION};
use rand::Rng;

/// Parses and decodes everything; corruption must surface as an `Err` somewhere.
fn read_all(bytes: &[u8]) -> Result<(), Error> {
    let r = Reader::from_bytes(bytes)?;
    for v in r.views() {
        v.decode_f32()?;
    }
    Ok(())
}

#[test]
fn every_truncation_is_an_error() {
    let (bytes, _) = random_file(11, 5);
    let reader = Reader::from_bytes(&bytes).unwrap();
    let mut boundaries: Vec<usize> = vec![0, 3, 4, 8, 15, 16];
    for e in reader.tensors() {
        boundaries.push(e.offset as usize);
        boundaries.push((e.offset + e.len) as usize);
    }
    // Every prefix, record boundaries included.
    for cut in 0..bytes.len() {
        let err = read_all(&bytes[..cut]);
        assert!(
            matches!(err, Err(Error::Corrupt(_))),
            "cut at {cut}: {err:?}"
        );
    }
    assert!(read_all(&bytes).is_ok());
}

#[test]
fn every_single_bit_flip_is_an_error() {
    let (bytes, _) = random_file(12, 4);
    assert!(
        bytes.len() < 4096,
        "keep this exhaustive test small: {} bytes",
        bytes.len()
    );
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            assert!(
                read_all(&b).is_err(),
                "flipping bit {bit} of byte {i} went unnoticed"
            );
        }
    }
}

#[test]
fn random_multi_byte_corruption_never_panics() {
    let mut r = rng(13);
    for seed in 0..60 {
        let (bytes, _) = random_file(100 + seed, 3);
        for _ in 0..50 {
            let mut b = bytes.clone();
            for _ in 0..r.random_range(1..8) {
                let i = r.random_range(0..b.len());
                b[i] = r.random();
            }
            let _ = read_all(&b);
        }
    }
}

fn with_header(json: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"QNZ\0");
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&(json.len() as u64).to_le_bytes());
    b.extend_from_slice(json.as_bytes());
    b.extend_from_slice(&crc32fast::hash(json.as_bytes()).to_le_bytes());
    b.resize(b.len().div_ceil(64) * 64, 0);
    b
}

/// A version-2 file around `stored` header bytes (already compressed, or not).
fn with_stored_header_v2(stored: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"QNZ\0");
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&(stored.len() as u64).to_le_bytes());
    b.extend_from_slice(stored);
    b.extend_from_slice(&crc32fast::hash(stored).to_le_bytes());
    b.resize(b.len().div_ceil(64) * 64, 0);
    b
}

fn deflate(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Version 2's compressed header: a header that is not DEFLATE, or that inflates past 64 MiB (a
/// bomb: 65 MiB of spaces deflate to about 65 KB), is refused with a one-line error; plain JSON
/// under version 2 is not DEFLATE either; version 1's plain JSON is still read.
#[test]
fn a_version_2_header_must_inflate_and_stay_bounded() {
    let ok_v2 = with_stored_header_v2(&deflate(br#"{"tensors":[]}"#));
    assert!(Reader::from_bytes(&ok_v2).is_ok());
    assert!(Reader::from_bytes(&with_header(r#"{"tensors":[]}"#)).is_ok());
    let e = Reader::from_bytes(&with_stored_header_v2(br#"{"tensors":[]}"#))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not DEFLATE"), "{e}");
    let mut bomb_json = b"{\"tensors\":[]".to_vec();
    bomb_json.resize(65 << 20, b' ');
    bomb_json.push(b'}');
    let bomb = deflate(&bomb_json);
    assert!(bomb.len() < 200_000, "{}", bomb.len());
    let e = Reader::from_bytes(&with_stored_header_v2(&bomb))
        .unwrap_err()
        .to_string();
    assert!(e.contains("inflates past"), "{e}");
}

#[test]
fn absurd_lengths_and_shapes_are_refused_before_allocating() {
    let cases = [
        // A huge header length.
        (
            {
                let mut b = with_header(r#"{"tensors":[]}"#);
                b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
                b
            },
            "header length",
        ),
        (
            with_header(
                r#"{"tensors":[{"name":"x","shape":[4294967296,4294967296],"encoding":{"kind":"raw","dtype":"f32"},"offset":0,"len":16,"crc32":0}]}"#,
            ),
            "overflows",
        ),
        (
            with_header(
                r#"{"tensors":[{"name":"x","shape":[1099511627777],"encoding":{"kind":"raw","dtype":"u8"},"offset":0,"len":1099511627777,"crc32":0}]}"#,
            ),
            "more than",
        ),
        (
            with_header(
                r#"{"tensors":[{"name":"x","shape":[2],"encoding":{"kind":"raw","dtype":"f32"},"offset":18446744073709551552,"len":8,"crc32":0}]}"#,
            ),
            "truncated",
        ),
        (
            with_header(
                r#"{"tensors":[{"name":"x","shape":[2],"encoding":{"kind":"raw","dtype":"f32"},"offset":0,"len":999,"crc32":0}]}"#,
            ),
            "record length 999",
        ),
        (
            with_header(
                r#"{"tensors":[{"name":"x","shape":[8,8],"encoding":{"kind":"pq","layer":"linear","block_size":8,"k":100000,"codebook":"f16"},"offset":0,"len":8,"crc32":0}]}"#,
            ),
            "centroids",
        ),
        (
            with_header(
                r#"{"tensors":[{"name":"x","shape":[8,8],"encoding":{"kind":"scalar","bits":9,"scheme":"affine","granularity":"per_tensor"},"offset":0,"len":8,"crc32":0}]}"#,
            ),
            "9 bits",
        ),
        (
            with_header(
                r#"{"tensors":[{"name":"x","shape":[1,1,1,1,1,1,1,1,1],"encoding":{"kind":"raw","dtype":"f32"},"offset":0,"len":4,"crc32":0}]}"#,
            ),
            "rank 9",
        ),
        (
            with_header(r#"{"tensors":[], "surprise": 1}"#),
            "unknown field",
        ),
        (with_header(r#"not json"#), "header"),
    ];
    for (bytes, msg) in cases {
        let err = Reader::from_bytes(&bytes).unwrap_err().to_string();
        assert!(err.contains(msg), "expected `{msg}` in: {err}");
    }
}

#[test]
fn newer_versions_are_refused_with_a_clear_error() {
    let (mut bytes, _) = random_file(14, 1);
    bytes[4..8].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let err = Reader::from_bytes(&bytes).unwrap_err();
    assert!(matches!(err, Error::NewerVersion { found, .. } if found == FORMAT_VERSION + 1));
    assert!(err.to_string().contains("newer"), "{err}");
    bytes[..4].copy_from_slice(b"PK\x03\x04");
    assert!(Reader::from_bytes(&bytes)
        .unwrap_err()
        .to_string()
        .contains("not a .qnz file"));
}

#[test]
fn out_of_range_assignments_with_a_valid_crc_are_an_error_not_a_panic() {
    // K = 3 needs 2 bits; code 3 fits the bits but not the codebook.
    use qn_format::header::{CodebookKind, Encoding, LayerKind};
    let record: Vec<u8> = {
        let mut r = Vec::new();
        for v in [0f32, 0.0, 1.0, 1.0, 2.0, 2.0] {
            r.extend_from_slice(&v.to_le_bytes());
        }
        r.push(0b11_11_11_11);
        r
    };
    let enc = Encoding::Pq {
        layer: LayerKind::Linear,
        block_size: 2,
        k: 3,
        codebook: CodebookKind::F32,
        rans_words: None,
    };
    let json = serde_json::json!({"tensors": [{"name": "w", "shape": [2, 4], "encoding": enc, "offset": 0, "len": record.len(), "crc32": crc32fast::hash(&record)}]});
    let mut bytes = with_header(&json.to_string());
    bytes.extend_from_slice(&record);
    let r = Reader::from_bytes(&bytes).unwrap();
    let err = r.tensor("w").unwrap().decode_f32().unwrap_err().to_string();
    assert!(err.contains("assignment 3") && err.contains("`w`"), "{err}");
}

#[test]
fn garbage_rans_streams_with_valid_checksums_never_panic() {
    use qn_format::header::{CodebookKind, Encoding, LayerKind};
    let mut r = rng(15);
    let (k, n_sub) = (4usize, 64usize);
    for case in 0..300 {
        let words = r.random_range(1..8usize);
        let mut record = Vec::new();
        for v in 0..k * 2 {
            record.extend_from_slice(&(v as f32).to_le_bytes());
        }
        // Probabilities: valid (sum 2^24) for even cases, random otherwise.
        let probs: Vec<u32> = if case % 2 == 0 {
            vec![1 << 22; 4]
        } else {
            (0..k).map(|_| r.random()).collect()
        };
        probs
            .iter()
            .for_each(|p| record.extend_from_slice(&p.to_le_bytes()));
        (0..words).for_each(|_| record.extend_from_slice(&r.random::<u32>().to_le_bytes()));
        let enc = Encoding::Pq {
            layer: LayerKind::Linear,
            block_size: 2,
            k,
            codebook: CodebookKind::F32,
            rans_words: Some(words),
        };
        let json = serde_json::json!({"tensors": [{"name": "w", "shape": [8, 16], "encoding": enc, "offset": 0, "len": record.len(), "crc32": crc32fast::hash(&record)}]});
        let mut bytes = with_header(&json.to_string());
        bytes.extend_from_slice(&record);
        assert_eq!(n_sub, 8 * 16 / 2);
        if let Ok(reader) = Reader::from_bytes(&bytes) {
            let _ = reader.tensor("w").unwrap().decode_f32();
        }
    }
}
