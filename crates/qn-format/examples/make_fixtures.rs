//! Writes the format fixtures of the current version: `tests/fixtures/v<N>/all-encodings.qnz` and,
//! beside it, `all-encodings.json` with every tensor's decoded values.
//!
//! ```text
//! cargo run -p qn-format --example make_fixtures
//! ```
//! Fixtures of released versions are never regenerated: a reader must keep decoding them.

use half::{bf16, f16};
use qn_format::header::{CodebookKind, Granularity, LayerKind, RawDType, Scheme};
use qn_format::{Codebook, Payload, Reader, Writer, FORMAT_VERSION};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut w = Writer::new()
        .with_metadata("fixture", "all encodings")
        .with_entropy_coding(true);
    let vals = |n: usize| -> Vec<f32> { (0..n).map(|i| (i as f32 - 5.0) / 4.0).collect() };
    w.add("raw.f32", &[2, 3], &Payload::raw_f32(&vals(6)))?;
    w.add(
        "raw.f16",
        &[4],
        &Payload::Raw {
            dtype: RawDType::F16,
            bytes: vals(4)
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
        },
    )?;
    w.add(
        "raw.bf16",
        &[4],
        &Payload::Raw {
            dtype: RawDType::Bf16,
            bytes: vals(4)
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
        },
    )?;
    w.add(
        "raw.i64",
        &[3],
        &Payload::Raw {
            dtype: RawDType::I64,
            bytes: [0i64, 1, -7].iter().flat_map(|v| v.to_le_bytes()).collect(),
        },
    )?;
    w.add(
        "raw.i32",
        &[2],
        &Payload::Raw {
            dtype: RawDType::I32,
            bytes: [5i32, -5].iter().flat_map(|v| v.to_le_bytes()).collect(),
        },
    )?;
    w.add(
        "raw.u8",
        &[2],
        &Payload::Raw {
            dtype: RawDType::U8,
            bytes: vec![0, 255],
        },
    )?;
    for (bits, granularity, tag) in [
        (8u8, Granularity::PerTensor, "int8.tensor"),
        (4, Granularity::PerChannel { axis: 0 }, "int4.channel"),
        (3, Granularity::PerGroup { size: 2 }, "int3.group"),
        (2, Granularity::PerChannel { axis: 1 }, "int2.channel1"),
    ] {
        let shape = [3usize, 4];
        let (_, param) = qn_format::header::scalar_view(&shape, granularity)?;
        let n_params: usize = param.iter().product();
        let qmax = (1u16 << bits) - 1;
        w.add(
            &format!("scalar.{tag}"),
            &shape,
            &Payload::Scalar {
                bits,
                scheme: if bits == 4 {
                    Scheme::Symmetric
                } else {
                    Scheme::Affine
                },
                granularity,
                codes: (0..12)
                    .map(|i| ((i * 5) % (qmax as usize + 1)) as u8)
                    .collect(),
                scales: (0..n_params).map(|i| 0.5 + i as f32 / 8.0).collect(),
                zero_points: (0..n_params)
                    .map(|i| (i % (qmax as usize + 1)) as u8)
                    .collect(),
            },
        )?;
    }
    for (kind, k, tag) in [
        (CodebookKind::F16, 4usize, "f16.k4"),
        (CodebookKind::F32, 3, "f32.k3"),
        (CodebookKind::Int8, 300, "int8.k300"),
    ] {
        let centroids: Vec<f32> = (0..k * 2)
            .map(|i| ((i * 37) % 23) as f32 / 8.0 - 1.0)
            .collect();
        let shape = [4usize, 6];
        let n_sub = 4 * 6 / 2;
        w.add(
            &format!("pq.linear.{tag}"),
            &shape,
            &Payload::Pq {
                layer: LayerKind::Linear,
                block_size: 2,
                k,
                codebook: Codebook::from_f32(&centroids, kind),
                assignments: (0..n_sub).map(|j| ((j * 7) % k) as u16).collect(),
            },
        )?;
    }
    w.add(
        "pq.conv.k2",
        &[2, 2, 3, 3],
        &Payload::Pq {
            layer: LayerKind::Conv2d,
            block_size: 9,
            k: 2,
            codebook: Codebook::from_f32(
                &(0..18).map(|i| i as f32 / 4.0).collect::<Vec<_>>(),
                CodebookKind::F16,
            ),
            assignments: vec![0, 1, 1, 0],
        },
    )?;
    // Skewed assignments: rANS beats 2-bit packing, so this tensor is stored entropy-coded.
    w.add(
        "pq.linear.rans.k4",
        &[32, 64],
        &Payload::Pq {
            layer: LayerKind::Linear,
            block_size: 2,
            k: 4,
            codebook: Codebook::from_f32(
                &[0.0, 0.5, 1.0, 1.5, -1.0, -0.5, 2.0, 2.5],
                CodebookKind::F16,
            ),
            assignments: (0..32 * 64 / 2)
                .map(|j| [0u16, 0, 0, 0, 0, 0, 0, 1, 1, 2, 0, 3][(j * 7) % 12])
                .collect(),
        },
    )?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/v{FORMAT_VERSION}"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("all-encodings.qnz");
    w.write_file(&path)?;
    let r = Reader::open(&path)?;
    let mut expect = serde_json::Map::new();
    for v in r.views() {
        expect.insert(v.entry.name.clone(), serde_json::json!(v.decode_f32()?));
    }
    std::fs::write(
        dir.join("all-encodings.json"),
        serde_json::to_string_pretty(&expect)?,
    )?;
    assert!(
        r.views().any(|v| matches!(
            v.entry.encoding,
            qn_format::Encoding::Pq {
                rans_words: Some(_),
                ..
            }
        )),
        "the fixture must hold an entropy-coded tensor"
    );
    println!("wrote {} ({} tensors)", path.display(), r.tensors().len());
    Ok(())
}
