//! A `.qnz` loaded for inference keeps its quantized Linear and Embedding weights coded (PQ and
//! int-N), and gives the outputs of the same file decoded to float: max |Δ| ≤ 1e-4 · max |y|,
//! through the table path (a few tokens) and the dense path (a batch).

use std::path::Path;

use candle_core::{Device, Tensor};
use qn_format::header::CodebookKind;
use qn_models::bundle::{load_bundle, qnz_metadata, EncoderBundle, LoadRequest};
use qn_models::encoder::pack_batch;
use qn_train::kernels::{
    pq::KMeansConfig,
    scalar::{Granularity, ScalarConfig},
};
use qn_train::{trainer::export_qnz_with, CentroidGrad, QuantModel, WeightState};

fn tiny() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny-roberta")
}

fn load(spec: &str, keep_codes: bool) -> EncoderBundle {
    load_bundle(
        spec,
        None,
        &LoadRequest {
            labels: None,
            keep_codes,
        },
        0,
        &Device::Cpu,
    )
    .unwrap()
}

/// The tiny RoBERTa with every kind of coded weight: PQ (embeddings with their padding rows,
/// attention), int8 per channel, int4 per group; written as a self-contained `.qnz`.
fn write_mixed_qnz(path: &Path) {
    let mut b = load(tiny().to_str().unwrap(), false);
    let meta = qnz_metadata(&b);
    for layer in b.model.layers_mut() {
        let name = layer.qweight().name().to_string();
        let w = layer.qweight_mut();
        if name.contains("intermediate") {
            w.quantize_scalar(
                &ScalarConfig::int8().with_granularity(Granularity::PerChannel { axis: 0 }),
            )
            .unwrap();
        } else if name.contains("output.dense") && !name.contains("attention") {
            w.quantize_scalar(
                &ScalarConfig::int4().with_granularity(Granularity::PerGroup { size: 16 }),
            )
            .unwrap();
        } else if !name.contains("token_type") && !name.starts_with("classifier") {
            w.quantize_pq(4, &KMeansConfig::new(16).with_iters(3), CentroidGrad::Mean)
                .unwrap();
        }
    }
    export_qnz_with(&b.model, path, CodebookKind::F16, &meta).unwrap();
}

fn logits(b: &EncoderBundle, texts: &[&str]) -> Tensor {
    let tok = b.tokenizer(Some(32)).unwrap();
    let rows: Vec<_> = texts.iter().map(|t| tok.encode(t, None).unwrap()).collect();
    let x = pack_batch(&rows, b.config.pad_id(), &Device::Cpu).unwrap();
    b.model.forward_t(&x, false).unwrap()
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap()
}

#[test]
fn a_qnz_runs_from_its_codes_with_the_decoded_models_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let qnz = dir.path().join("mixed.qnz");
    write_mixed_qnz(&qnz);
    let spec = qnz.to_str().unwrap();
    let dense = load(spec, false);
    let coded = load(spec, true);

    let states = |b: &EncoderBundle| {
        let mut n = [0usize; 3];
        for l in b.model.layers() {
            match l.qweight().state() {
                WeightState::Float(_) => n[0] += 1,
                WeightState::Pq(_) => n[1] += 1,
                WeightState::Scalar(_) => n[2] += 1,
            }
        }
        n
    };
    let total = dense.model.layers().len();
    assert_eq!(states(&dense), [total, 0, 0], "decoded for training");
    let [float, pq, scalar] = states(&coded);
    // token type table and classifier stay float; 2 layers x 2 scalar layers.
    assert_eq!(scalar, 4, "int8 + int4 layers stay coded");
    assert!(pq >= 10, "PQ layers stay coded: {pq}");
    assert_eq!(float + pq + scalar, total);

    // A short sentence: few rows, so the PQ layers use their lookup tables and the scalar ones
    // dequantise inside the dot products.
    let one = ["a b c"];
    let (a, b) = (logits(&coded, &one), logits(&dense, &one));
    assert!(rel_diff(&a, &b) <= 1e-4, "table path: {}", rel_diff(&a, &b));
    // A batch: above both crossovers, the dense path.
    let batch = [
        "the quick brown fox jumps over the lazy dog",
        "a b c d e f g h",
        "hello world",
        "one more sentence with padding",
    ];
    let (a, b) = (logits(&coded, &batch), logits(&dense, &batch));
    assert!(rel_diff(&a, &b) <= 1e-4, "batch path: {}", rel_diff(&a, &b));
}

#[test]
fn a_coded_weight_of_the_wrong_shape_is_named() {
    // A file whose PQ table has another shape than the config says: the loader names it, as it
    // names a mis-shaped float tensor.
    let dir = tempfile::tempdir().unwrap();
    let qnz = dir.path().join("mixed.qnz");
    write_mixed_qnz(&qnz);
    let r = qn_format::Reader::open(&qnz).unwrap();
    let mut w = qn_format::Writer::new();
    for (k, v) in &r.header().metadata {
        w = w.with_metadata(k.clone(), v.clone());
    }
    for view in r.views() {
        let mut entry = view.entry.clone();
        if entry.name == "roberta.encoder.layer.0.attention.self.query.weight" {
            // The same number of blocks, so the record stays valid.
            entry.shape = vec![entry.shape[0] / 2, entry.shape[1] * 2];
        }
        w.add_record(qn_format::TensorView {
            entry: &entry,
            ..view
        })
        .unwrap();
    }
    let bad = dir.path().join("bad.qnz");
    w.write_file(&bad).unwrap();
    let err = load_bundle(
        bad.to_str().unwrap(),
        None,
        &LoadRequest {
            labels: None,
            keep_codes: true,
        },
        0,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("layer.0.attention.self.query.weight") && err.contains("[16, 64]"),
        "{err}"
    );
}
