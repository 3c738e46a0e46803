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

/// A randomly initialised EfficientNet-B0 (4 classes) with PQ 1x1 convolutions, int8 k x k and
/// depthwise kernels and an int4 classifier, written as a `.qnz` the way `qn compress` writes one.
fn write_coded_b0(path: &Path) {
    use qn_models::vision::{scratch_efficientnet, EfficientNetConfig};
    let cfg = EfficientNetConfig::variant("b0", 4).unwrap();
    let mut model = scratch_efficientnet(&cfg, 5, &Device::Cpu).unwrap();
    for layer in qn_train::QuantModel::layers_mut(&mut model) {
        let w = layer.qweight_mut();
        let shape = w.layout().shape().to_vec();
        match shape.as_slice() {
            [out, cin, 1, 1] if cin % 4 == 0 => {
                let blocks = out * cin / 4;
                w.quantize_pq(
                    4,
                    &KMeansConfig::new(blocks.min(16)).with_iters(2),
                    CentroidGrad::Mean,
                )
                .unwrap();
            }
            [_, _, _, _] => w
                .quantize_scalar(
                    &ScalarConfig::int8().with_granularity(Granularity::PerChannel { axis: 0 }),
                )
                .unwrap(),
            _ => w
                .quantize_scalar(
                    &ScalarConfig::int4().with_granularity(Granularity::PerChannel { axis: 0 }),
                )
                .unwrap(),
        }
    }
    let meta = [("efficientnet:variant".to_string(), "b0".to_string())];
    export_qnz_with(&model, path, CodebookKind::F16, &meta).unwrap();
}

fn load_image_model(path: &Path, keep_codes: bool) -> qn_models::vision::EfficientNet {
    qn_models::vision::load_efficientnet_with(path, None, None, 0, &Device::Cpu, keep_codes)
        .unwrap()
        .model
}

/// An EfficientNet `.qnz` run from its codes (1x1 convolutions as matmuls over pixels from PQ
/// tables or tiles, int-N dequantised inside the dot products) gives the decoded file's logits.
#[test]
fn an_efficientnet_qnz_runs_from_its_codes_with_the_decoded_models_logits() {
    let dir = tempfile::tempdir().unwrap();
    let qnz = dir.path().join("b0.qnz");
    write_coded_b0(&qnz);
    let coded = load_image_model(&qnz, true);
    let decoded = load_image_model(&qnz, false);
    let coded_layers = qn_train::QuantModel::layers(&coded);
    assert!(coded_layers
        .iter()
        .all(|l| !matches!(l.qweight().state(), WeightState::Float(_))));
    assert!(qn_train::QuantModel::layers(&decoded)
        .iter()
        .all(|l| matches!(l.qweight().state(), WeightState::Float(_))));
    // One image (the squeeze-and-excitation convs see one pixel: tables) and a batch of two.
    for n in [1usize, 2] {
        let x = Tensor::randn(0f32, 1., (n, 3, 48, 48), &Device::Cpu).unwrap();
        let a = qn_train::QuantModel::forward_t(&coded, &x, false).unwrap();
        let b = qn_train::QuantModel::forward_t(&decoded, &x, false).unwrap();
        assert_eq!(a.dims(), &[n, 4]);
        assert!(rel_diff(&a, &b) <= 1e-4, "{n} images: {}", rel_diff(&a, &b));
    }
}

/// Rewrites `from` into `to`, renaming or reshaping records on the way (the record stays valid).
fn rewrite_qnz(from: &Path, to: &Path, edit: &dyn Fn(&mut qn_format::header::TensorEntry)) {
    let r = qn_format::Reader::open(from).unwrap();
    let mut w = qn_format::Writer::new();
    for (k, v) in &r.header().metadata {
        w = w.with_metadata(k.clone(), v.clone());
    }
    for view in r.views() {
        let mut entry = view.entry.clone();
        edit(&mut entry);
        w.add_record(qn_format::TensorView {
            entry: &entry,
            ..view
        })
        .unwrap();
    }
    w.write_file(to).unwrap();
}

/// A coded convolution of the wrong shape, or one the network does not have, is an error naming
/// the tensor, as for float weights.
#[test]
fn a_mis_shaped_or_unexpected_coded_efficientnet_weight_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let qnz = dir.path().join("b0.qnz");
    write_coded_b0(&qnz);
    let name = "_blocks.1._project_conv.weight";
    let bad = dir.path().join("reshaped.qnz");
    rewrite_qnz(&qnz, &bad, &|e| {
        if e.name == name {
            // [24, 96, 1, 1] as [12, 192, 1, 1]: the same blocks of 4, another matrix.
            e.shape = vec![e.shape[0] / 2, e.shape[1] * 2, 1, 1];
        }
    });
    for keep_codes in [true, false] {
        let err = qn_models::vision::load_efficientnet_with(
            &bad,
            Some("b0"),
            None,
            0,
            &Device::Cpu,
            keep_codes,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(name) && err.contains("[12, 192, 1, 1]") && err.contains("reshaped.qnz"),
            "keep_codes {keep_codes}: {err}"
        );
    }
    let extra = dir.path().join("renamed.qnz");
    rewrite_qnz(&qnz, &extra, &|e| {
        if e.name == "_blocks.15._expand_conv.weight" {
            e.name = "_blocks.16._expand_conv.weight".into();
        }
    });
    let err =
        qn_models::vision::load_efficientnet_with(&extra, Some("b0"), None, 0, &Device::Cpu, true)
            .unwrap_err()
            .to_string();
    // The network misses its own weight first; that is the error.
    assert!(
        err.contains("missing tensors `_blocks.15._expand_conv.weight`"),
        "{err}"
    );
    // With its own weight back, the extra coded one is named as not part of the network.
    let both = dir.path().join("extra.qnz");
    {
        let r = qn_format::Reader::open(&qnz).unwrap();
        let mut w = qn_format::Writer::new();
        for (k, v) in &r.header().metadata {
            w = w.with_metadata(k.clone(), v.clone());
        }
        for view in r.views() {
            w.add_record(view).unwrap();
            if view.entry.name == "_blocks.15._expand_conv.weight" {
                let mut entry = view.entry.clone();
                entry.name = "_blocks.16._expand_conv.weight".into();
                w.add_record(qn_format::TensorView {
                    entry: &entry,
                    ..view
                })
                .unwrap();
            }
        }
        w.write_file(&both).unwrap();
    }
    let err =
        qn_models::vision::load_efficientnet_with(&both, Some("b0"), None, 0, &Device::Cpu, true)
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("unexpected tensors `_blocks.16._expand_conv.weight`"),
        "{err}"
    );
}
