//! `qn quantize | inspect | decompress` as a user runs them.

use std::path::{Path, PathBuf};

use qn_format::{Encoding, Reader};

use qn_tests::{ok, one_line_error, qn};

fn asset() -> PathBuf {
    qn_tests::asset("minilm-l6-layer0.safetensors")
}

fn read_safetensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        // Float tensors only (integer ones, like position ids, round-trip unchanged).
        .filter(|(_, t)| t.dtype() != safetensors::Dtype::I64)
        .map(|(n, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{n}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, t.shape().to_vec(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn int8_per_channel_round_trip_error_is_at_most_half_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let (qnz, back) = (
        dir.path().join("m.qnz"),
        dir.path().join("back.safetensors"),
    );
    ok(&qn(&[
        &"quantize",
        &asset(),
        &"-o",
        &qnz,
        &"--method",
        &"int8",
        &"--granularity",
        &"channel",
    ]));
    ok(&qn(&[&"decompress", &qnz, &"-o", &back]));
    let original = read_safetensors(&asset());
    let restored = read_safetensors(&back);
    let reader = Reader::open(&qnz).unwrap();
    for ((name, shape, a), (name_b, shape_b, b)) in original.iter().zip(&restored) {
        assert_eq!((name, shape), (name_b, shape_b));
        let view = reader.tensor(name).unwrap();
        assert!(matches!(
            view.entry.encoding,
            Encoding::Scalar { bits: 8, .. }
        ));
        // Per-channel scales are the first `rows` f32 of the record.
        let rows = shape[0];
        let cols = a.len() / rows;
        for o in 0..rows {
            let s = f32::from_le_bytes(view.record[4 * o..4 * o + 4].try_into().unwrap());
            for j in 0..cols {
                let (x, y) = (a[o * cols + j], b[o * cols + j]);
                assert!(
                    (x - y).abs() <= s * 0.5 * (1.0 + 1e-5),
                    "{name}[{o}, {j}]: {x} vs {y}, scale {s}"
                );
            }
        }
    }
}

#[test]
fn inspect_json_reports_the_ledger_and_int4_is_half_of_int8() {
    let dir = tempfile::tempdir().unwrap();
    let mut sizes = Vec::new();
    for method in ["int8", "int4", "pq"] {
        let qnz = dir.path().join(format!("{method}.qnz"));
        ok(&qn(&[
            &"quantize",
            &asset(),
            &"-o",
            &qnz,
            &"--method",
            &method,
        ]));
        let json: serde_json::Value =
            serde_json::from_str(&ok(&qn(&[&"inspect", &qnz, &"--json"]))).unwrap();
        let total = json["total_bytes"].as_u64().unwrap();
        assert_eq!(total, std::fs::metadata(&qnz).unwrap().len());
        let tensors = json["tensors"].as_array().unwrap();
        assert_eq!(tensors.len(), 2);
        for t in tensors {
            for key in ["name", "method", "shape", "bits_per_weight", "bytes"] {
                assert!(!t[key].is_null(), "{method}: `{key}` missing in {t}");
            }
        }
        let sum: u64 = tensors.iter().map(|t| t["bytes"].as_u64().unwrap()).sum();
        let overhead =
            json["header_bytes"].as_u64().unwrap() + json["padding_bytes"].as_u64().unwrap();
        assert_eq!(sum + overhead, total);
        sizes.push(sum);
        // The table form names each tensor too.
        let table = ok(&qn(&[&"inspect", &qnz]));
        assert!(
            table.contains("encoder.layer.0.intermediate.dense.weight") && table.contains("total")
        );
    }
    // 737,280 weights: int4 codes are half of int8's; scales and zero points (5 bytes per row) equal.
    let rows = 384 + 1536;
    assert_eq!(sizes[0] - 5 * rows, 737_280);
    assert_eq!(sizes[1] - 5 * rows, 737_280 / 2);
    // PQ K=256 with the paper's block sizes: the attention query in blocks of 4 (one byte per 4
    // weights, a 256 x 4 f16 codebook), the FFN in blocks of 8 (one byte per 8, 256 x 8).
    assert_eq!(
        sizes[2],
        384 * 384 / 4 + 256 * 4 * 2 + 1536 * 384 / 8 + 256 * 8 * 2
    );
}

#[test]
fn rule_file_sets_method_per_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nmatch = 'attention'\nmethod = 'pq'\nblock_size = 4\ncentroids = 64\ncodebook = 'int8'\n\n\
         [[rule]]\nmatch = 'intermediate'\nmethod = 'int4'\nobserver = 'histogram'\n",
    )
    .unwrap();
    let qnz = dir.path().join("m.qnz");
    ok(&qn(&[
        &"quantize",
        &asset(),
        &"-o",
        &qnz,
        &"--method",
        &"int8",
        &"--rules",
        &rules,
    ]));
    let r = Reader::open(&qnz).unwrap();
    let q = r
        .tensor("encoder.layer.0.attention.self.query.weight")
        .unwrap();
    assert!(
        matches!(
            q.entry.encoding,
            Encoding::Pq {
                block_size: 4,
                k: 64,
                codebook: qn_format::header::CodebookKind::Int8,
                ..
            }
        ),
        "{:?}",
        q.entry.encoding
    );
    let f = r
        .tensor("encoder.layer.0.intermediate.dense.weight")
        .unwrap();
    assert!(matches!(f.entry.encoding, Encoding::Scalar { bits: 4, .. }));

    std::fs::write(&rules, "[[rule]]\nmatch = 'x'\nmethod = 'zip'\n").unwrap();
    one_line_error(
        &qn(&[
            &"quantize",
            &asset(),
            &"-o",
            &qnz,
            &"--method",
            &"int8",
            &"--rules",
            &rules,
        ]),
        &["rules.toml", "rule 1", "zip"],
    );
    std::fs::write(&rules, "[[rule]]\nmatch = '('\n").unwrap();
    one_line_error(
        &qn(&[
            &"quantize",
            &asset(),
            &"-o",
            &qnz,
            &"--method",
            &"int8",
            &"--rules",
            &rules,
        ]),
        &["rules.toml", "rule 1"],
    );
}

#[test]
fn entropy_coding_never_grows_the_file_and_decodes_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, coded) = (dir.path().join("plain.qnz"), dir.path().join("coded.qnz"));
    // Few centroids on a small layer: uneven cluster sizes leave entropy to remove.
    let common: [&dyn AsRef<std::ffi::OsStr>; 8] = [
        &"quantize",
        &asset(),
        &"--method",
        &"pq",
        &"--block-size",
        &"4",
        &"--centroids",
        &"16",
    ];
    let run = |out: &PathBuf, extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = common.to_vec();
        args.extend_from_slice(&[&"-o", out]);
        args.extend_from_slice(extra);
        ok(&qn(&args));
    };
    run(&plain, &[]);
    run(&coded, &[&"--entropy-code"]);
    let (sp, sc) = (
        std::fs::metadata(&plain).unwrap().len(),
        std::fs::metadata(&coded).unwrap().len(),
    );
    assert!(sc <= sp, "{sc} > {sp}");
    let (rp, rc) = (Reader::open(&plain).unwrap(), Reader::open(&coded).unwrap());
    for v in rp.views() {
        assert_eq!(
            v.decode_f32().unwrap(),
            rc.tensor(&v.entry.name).unwrap().decode_f32().unwrap()
        );
    }
}

#[test]
fn include_exclude_and_min_numel_keep_tensors_raw() {
    let dir = tempfile::tempdir().unwrap();
    let qnz = dir.path().join("m.qnz");
    ok(&qn(&[
        &"quantize",
        &asset(),
        &"-o",
        &qnz,
        &"--method",
        &"int8",
        &"--exclude",
        &"query",
    ]));
    let r = Reader::open(&qnz).unwrap();
    assert!(matches!(
        r.tensor("encoder.layer.0.attention.self.query.weight")
            .unwrap()
            .entry
            .encoding,
        Encoding::Raw { .. }
    ));
    ok(&qn(&[
        &"quantize",
        &asset(),
        &"-o",
        &qnz,
        &"--method",
        &"int8",
        &"--include",
        &"query",
        &"--min-numel",
        &"1000000",
    ]));
    let r = Reader::open(&qnz).unwrap();
    assert!(r
        .views()
        .all(|v| matches!(v.entry.encoding, Encoding::Raw { .. })));
}

#[test]
fn an_interrupted_run_resumes_and_gives_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh.qnz");
    ok(&qn(&[
        &"quantize",
        &asset(),
        &"-o",
        &fresh,
        &"--method",
        &"pq",
        &"--iters",
        &"5",
    ]));
    // Fail on the second tensor (names are processed in order): the first one's part is kept.
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, "[[rule]]\nmatch = 'intermediate'\nblock_size = 5\n").unwrap();
    let out = dir.path().join("resumed.qnz");
    let failed = qn(&[
        &"quantize",
        &asset(),
        &"-o",
        &out,
        &"--method",
        &"pq",
        &"--iters",
        &"5",
        &"--rules",
        &rules,
    ]);
    one_line_error(
        &failed,
        &["intermediate.dense.weight", "block size 5", "kept"],
    );
    assert!(!out.exists(), "no partial output");
    let again = ok(&qn(&[
        &"quantize",
        &asset(),
        &"-o",
        &out,
        &"--method",
        &"pq",
        &"--iters",
        &"5",
    ]));
    assert!(again.contains("1 tensors reused"), "{again}");
    assert_eq!(std::fs::read(&fresh).unwrap(), std::fs::read(&out).unwrap());
    assert!(!dir.path().join("resumed.qnz.parts").exists());
}

#[test]
fn bad_inputs_are_one_line_errors_and_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.qnz");
    one_line_error(
        &qn(&[
            &"quantize",
            &"/nonexistent/m.safetensors",
            &"-o",
            &out,
            &"--method",
            &"int8",
        ]),
        &["/nonexistent/m.safetensors"],
    );
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").unwrap();
    one_line_error(
        &qn(&[&"quantize", &junk, &"-o", &out, &"--method", &"int8"]),
        &["junk.safetensors", "not a safetensors file"],
    );
    one_line_error(
        &qn(&[
            &"quantize",
            &asset(),
            &"-o",
            &out,
            &"--method",
            &"pq",
            &"--block-size",
            &"7",
        ]),
        &[
            "minilm-l6-layer0.safetensors",
            "encoder.layer.0",
            "block size 7",
        ],
    );
    assert!(!out.exists());

    let good = dir.path().join("good.qnz");
    ok(&qn(&[
        &"quantize",
        &asset(),
        &"-o",
        &good,
        &"--method",
        &"int4",
    ]));
    let bytes = std::fs::read(&good).unwrap();
    let back = dir.path().join("back.safetensors");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated.qnz",
            bytes[..bytes.len() / 2].to_vec(),
            "truncated",
        ),
        (
            "flipped.qnz",
            {
                let mut b = bytes.clone();
                let i = b.len() - 100;
                b[i] ^= 0x10;
                b
            },
            "checksum",
        ),
        (
            "newer.qnz",
            {
                let mut b = bytes.clone();
                b[4] = 9;
                b
            },
            "newer",
        ),
    ];
    for (name, content, msg) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        one_line_error(&qn(&[&"inspect", &p]), &[name, msg]);
        one_line_error(&qn(&[&"decompress", &p, &"-o", &back]), &[name, msg]);
        assert!(!back.exists(), "{name}: no partial output");
    }
    // Bad usage is exit code 2 (clap).
    assert_eq!(
        qn(&[&"quantize", &asset(), &"-o", &out, &"--method", &"int9"])
            .status
            .code(),
        Some(2)
    );
}

/// all-MiniLM-L6-v2 from `$QN_DATA_DIR/models/all-MiniLM-L6-v2`, if present.
fn minilm() -> Option<PathBuf> {
    qn_tests::shared("models/all-MiniLM-L6-v2/model.safetensors")
}

#[test]
fn minilm_pq_file_size_matches_the_paper_accounting_and_decompresses() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let qnz = dir.path().join("minilm.qnz");
    ok(&qn(&[
        &"quantize",
        &model,
        &"-o",
        &qnz,
        &"--method",
        &"pq",
        &"--block-size",
        &"8",
        &"--centroids",
        &"256",
    ]));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&qn(&[&"inspect", &qnz, &"--json"]))).unwrap();
    let total = json["total_bytes"].as_u64().unwrap() as f64;

    // The paper's accounting: log2(K)/d bits per PQ weight + an f16 codebook per PQ tensor, the
    // rest at its stored size.
    let bytes = std::fs::read(&model).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut paper = 0f64;
    let mut pq_tensors = Vec::new();
    for (name, t) in st.tensors() {
        let numel: usize = t.shape().iter().product();
        let compressed =
            t.dtype() == safetensors::Dtype::F32 && t.shape().len() >= 2 && numel >= 4096;
        if compressed {
            paper += numel as f64 / 8.0 + 256.0 * 8.0 * 2.0;
            pq_tensors.push(name);
        } else {
            paper += t.data().len() as f64;
        }
    }
    assert!(
        (total - paper).abs() / paper < 0.01,
        "file {total} bytes vs paper accounting {paper}"
    );
    // 6 layers x 6 matrices, word and position embeddings, pooler.
    assert_eq!(pq_tensors.len(), 39, "{pq_tensors:?}");

    // Decompressed weights have the error the kernels report (f16 codebook rounding aside).
    let back = dir.path().join("back.safetensors");
    ok(&qn(&[&"decompress", &qnz, &"-o", &back]));
    let restored = read_safetensors(&back);
    let name = "encoder.layer.2.intermediate.dense.weight";
    let t = st.tensor(name).unwrap();
    let original: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let w = candle_core::Tensor::from_vec(original.clone(), t.shape(), &candle_core::Device::Cpu)
        .unwrap();
    let layout = qn_kernels::layout::BlockLayout::linear(name, t.shape(), 8).unwrap();
    let codes = qn_kernels::pq::encode(
        &w,
        &layout,
        &qn_kernels::pq::KMeansConfig::new(256),
        &mut |_| {},
    )
    .unwrap();
    let kernels = codes.relative_mse(&w).unwrap();
    let (_, _, r) = restored.iter().find(|(n, _, _)| n == name).unwrap();
    let err: f64 = original
        .iter()
        .zip(r)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = original.iter().map(|a| (*a as f64).powi(2)).sum();
    let file = err / norm;
    assert!(
        (file - kernels).abs() / kernels < 0.01,
        "file {file} vs kernels {kernels}"
    );
    assert!(kernels > 0.25 && kernels < 0.4, "{kernels}");
}

/// One quant-noise embedding as a model, for export.
struct EmbeddingModel(qn_train::layers::QEmbedding);

impl qn_train::QuantModel for EmbeddingModel {
    fn forward_t(
        &self,
        x: &candle_core::Tensor,
        train: bool,
    ) -> candle_core::Result<candle_core::Tensor> {
        candle_core::ModuleT::forward_t(&self.0, x, train)
    }
    fn layers(&self) -> Vec<&dyn qn_train::layers::QuantNoiseLayer> {
        vec![&self.0]
    }
    fn layers_mut(&mut self) -> Vec<&mut dyn qn_train::layers::QuantNoiseLayer> {
        vec![&mut self.0]
    }
}

#[test]
fn a_pq_embedding_keeps_its_padding_row_exactly_through_the_file() {
    use qn_train::layers::QuantNoiseLayer;
    let dir = tempfile::tempdir().unwrap();
    let mut rows: Vec<f32> = (0..64 * 16)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    rows[16..32].iter_mut().for_each(|v| *v = 0.0); // padding_idx = 1
    let w = candle_core::Var::from_tensor(
        &candle_core::Tensor::from_vec(rows, (64, 16), &candle_core::Device::Cpu).unwrap(),
    )
    .unwrap();
    let mut emb =
        qn_train::layers::QEmbedding::new("embeddings.word_embeddings", w, Some(1)).unwrap();
    emb.quantize_pq(
        8,
        &qn_train::kernels::pq::KMeansConfig::new(16).with_iters(5),
        qn_train::CentroidGrad::Mean,
    )
    .unwrap();
    let qnz = dir.path().join("emb.qnz");
    qn_train::trainer::export_qnz(
        &EmbeddingModel(emb),
        &qnz,
        qn_format::header::CodebookKind::F16,
    )
    .unwrap();
    let r = Reader::open(&qnz).unwrap();
    assert_eq!(
        r.header().metadata["exact_row:embeddings.word_embeddings.weight"],
        "1"
    );
    let back = dir.path().join("back.safetensors");
    ok(&qn(&[&"decompress", &qnz, &"-o", &back]));
    let restored = read_safetensors(&back);
    assert_eq!(
        restored.len(),
        1,
        "the exact-row side tensor is applied, not written"
    );
    let (name, shape, values) = &restored[0];
    assert_eq!(
        (name.as_str(), shape.as_slice()),
        ("embeddings.word_embeddings.weight", &[64usize, 16][..])
    );
    assert!(
        values[16..32].iter().all(|&v| v == 0.0),
        "padding row lost: {:?}",
        &values[16..32]
    );
    assert!(values[..16].iter().any(|&v| v != 0.0));
}

/// A safetensors file of `(name, dtype, shape, bytes)`.
fn write_safetensors(path: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

/// f16 and bf16 weights come back as f16 and bf16 (quantized or kept raw), not doubled to f32; a
/// tensor that cannot be quantized (empty, fewer sub-vectors than K) stays raw with a warning
/// naming it instead of stopping the command.
#[test]
fn decompress_keeps_source_dtypes_and_unquantizable_tensors_stay_raw() {
    use half::{bf16, f16};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("mixed.safetensors");
    let vals: Vec<f32> = (0..64 * 64)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let h: Vec<u8> = vals
        .iter()
        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
        .collect();
    let b: Vec<u8> = vals
        .iter()
        .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
        .collect();
    let small: Vec<u8> = vals[..2 * 384]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write_safetensors(
        &src,
        &[
            ("half.weight", safetensors::Dtype::F16, vec![64, 64], h),
            ("brain.weight", safetensors::Dtype::BF16, vec![64, 64], b),
            (
                "empty.weight",
                safetensors::Dtype::F32,
                vec![0, 128],
                vec![],
            ),
            (
                "token_type_embeddings.weight",
                safetensors::Dtype::F32,
                vec![2, 384],
                small,
            ),
        ],
    );
    for method in ["pq", "int8"] {
        let qnz = dir.path().join(format!("{method}.qnz"));
        let out = qn(&[
            &"quantize",
            &src,
            &"-o",
            &qnz,
            &"--method",
            &method,
            &"--min-numel",
            &"0",
        ]);
        let stdout = ok(&out);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("`empty.weight` stays raw"), "{err}");
        if method == "pq" {
            assert!(
                err.contains("`token_type_embeddings.weight` stays raw"),
                "{err}"
            );
        }
        assert!(stdout.contains("wrote"), "{stdout}");
        let back = dir.path().join(format!("{method}.safetensors"));
        ok(&qn(&[&"decompress", &qnz, &"-o", &back]));
        let bytes = std::fs::read(&back).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(
            st.tensor("half.weight").unwrap().dtype(),
            safetensors::Dtype::F16
        );
        assert_eq!(
            st.tensor("brain.weight").unwrap().dtype(),
            safetensors::Dtype::BF16
        );
        assert_eq!(st.tensor("empty.weight").unwrap().shape(), &[0, 128]);
        // The restored file is no bigger than the source.
        assert!(
            bytes.len() <= std::fs::metadata(&src).unwrap().len() as usize + 512,
            "{method}: {} bytes from {}",
            bytes.len(),
            std::fs::metadata(&src).unwrap().len()
        );
        let r = Reader::open(&qnz).unwrap();
        assert!(matches!(
            r.tensor("empty.weight").unwrap().entry.encoding,
            Encoding::Raw { .. }
        ));
        assert!(!matches!(
            r.tensor("half.weight").unwrap().entry.encoding,
            Encoding::Raw { .. }
        ));
    }
}

/// The format's own decoder applies the exact row: a library user reading a `.qnz` gets the
/// padding row exactly, with no CLI involved.
#[test]
fn the_format_decoder_applies_exact_rows() {
    let mut w = qn_format::Writer::new().with_metadata("exact_row:emb.weight", "1");
    w.add(
        "emb.weight",
        &[4, 2],
        &qn_format::Payload::Pq {
            layer: qn_format::header::LayerKind::Embedding,
            block_size: 2,
            k: 2,
            codebook: qn_format::Codebook::from_f32(
                &[1., 1., 2., 2.],
                qn_format::header::CodebookKind::F32,
            ),
            assignments: vec![0, 1, 1, 0],
        },
    )
    .unwrap();
    w.add(
        "emb.weight.exact_row",
        &[2],
        &qn_format::Payload::raw_f32(&[0.0, 0.5]),
    )
    .unwrap();
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    let r = Reader::from_bytes(&bytes).unwrap();
    assert_eq!(
        r.tensor("emb.weight").unwrap().decode_f32().unwrap(),
        vec![1., 1., 0., 0.5, 2., 2., 1., 1.]
    );
    assert!(r.is_exact_row_companion("emb.weight.exact_row"));
    // A convention that does not fit the tensors is refused at open.
    let mut w = qn_format::Writer::new().with_metadata("exact_row:emb.weight", "9");
    w.add(
        "emb.weight",
        &[4, 2],
        &qn_format::Payload::raw_f32(&[0.0; 8]),
    )
    .unwrap();
    w.add(
        "emb.weight.exact_row",
        &[2],
        &qn_format::Payload::raw_f32(&[0.0; 2]),
    )
    .unwrap();
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    let err = Reader::from_bytes(&bytes).unwrap_err().to_string();
    assert!(err.contains("exact_row:emb.weight"), "{err}");
}
