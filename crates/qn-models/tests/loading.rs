//! Bad checkpoints and configs: each refused with an error naming the tensor or field.

use std::path::Path;

use candle_core::Device;
use qn_models::encoder::{build_encoder, read_weights, EncoderConfig};

fn tiny() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny-roberta")
}

fn config() -> EncoderConfig {
    EncoderConfig::from_file(&tiny().join("config.json")).unwrap()
}

#[test]
fn unsupported_config_options_are_named() {
    let text = std::fs::read_to_string(tiny().join("config.json")).unwrap();
    for (from, to, field) in [
        (
            "\"model_type\": \"roberta\"",
            "\"model_type\": \"gpt2\"",
            "model_type",
        ),
        (
            "\"is_decoder\": false",
            "\"is_decoder\": true",
            "is_decoder",
        ),
        (
            "\"hidden_act\": \"gelu\"",
            "\"hidden_act\": \"swish\"",
            "hidden_act",
        ),
        (
            "\"num_attention_heads\": 4",
            "\"num_attention_heads\": 5",
            "num_attention_heads",
        ),
        ("\"hidden_size\": 32", "\"hidden_size\": 0", "hidden_size"),
        (
            "\"model_type\": \"roberta\"",
            "\"model_type\": \"roberta\", \"position_embedding_type\": \"relative_key\"",
            "position_embedding_type",
        ),
        (
            "\"vocab_size\": 1000",
            "\"vocab_sizes\": 1000",
            "vocab_size",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        let e = EncoderConfig::from_json(&text.replace(from, to), Path::new("cfg.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cfg.json") && e.contains(&format!("`{field}`")),
            "{field}: {e}"
        );
    }
}

#[test]
fn missing_unexpected_and_misshapen_tensors_are_listed() {
    let cfg = config();
    let w = tiny().join("model.safetensors");
    let read = || read_weights(&w, cfg.family(), &Device::Cpu).unwrap();

    let mut t = read();
    t.remove("roberta.encoder.layer.1.output.dense.weight");
    let e = build_encoder(&cfg, t, &w, 3, 0, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing") && e.contains("roberta.encoder.layer.1.output.dense.weight"),
        "{e}"
    );

    let mut t = read();
    let extra = t["roberta.embeddings.LayerNorm.bias"].clone();
    t.insert("roberta.encoder.layer.9.mystery".into(), extra);
    let e = build_encoder(&cfg, t, &w, 3, 0, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unexpected") && e.contains("layer.9.mystery"),
        "{e}"
    );

    let mut t = read();
    let wrong = t["roberta.embeddings.LayerNorm.bias"]
        .narrow(0, 0, 16)
        .unwrap();
    t.insert("roberta.embeddings.LayerNorm.weight".into(), wrong);
    let e = build_encoder(&cfg, t, &w, 3, 0, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("roberta.embeddings.LayerNorm.weight") && e.contains("[16]"),
        "{e}"
    );
}

#[test]
fn a_missing_head_is_seeded_and_reported() {
    let cfg = config();
    let w = tiny().join("model.safetensors");
    let load = |seed| {
        let mut t = read_weights(&w, cfg.family(), &Device::Cpu).unwrap();
        t.retain(|k, _| !k.starts_with("classifier."));
        build_encoder(&cfg, t, &w, 2, seed, &Device::Cpu).unwrap()
    };
    let a = load(7);
    assert!(
        a.warnings
            .iter()
            .any(|w| w.contains("no classification head")),
        "{:?}",
        a.warnings
    );
    let head = |m: &qn_models::encoder::Encoder| {
        let sd = qn_models::hf_dir::state_dict(m).unwrap();
        let (_, t) = sd
            .into_iter()
            .find(|(n, _)| n == "classifier.out_proj.weight")
            .unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(head(&a.model), head(&load(7).model), "same seed, same head");
    assert_ne!(head(&a.model), head(&load(8).model));
    // A head with another number of classes is re-initialised, with a warning.
    let t = read_weights(&w, cfg.family(), &Device::Cpu).unwrap();
    let b = build_encoder(&cfg, t, &w, 5, 0, &Device::Cpu).unwrap();
    assert!(
        b.warnings
            .iter()
            .any(|w| w.contains("does not fit 5 labels")),
        "{:?}",
        b.warnings
    );
}

#[test]
fn unprefixed_checkpoints_are_renamed() {
    use qn_models::encoder::{canonical_name, Family};
    assert_eq!(
        canonical_name("embeddings.word_embeddings.weight", Family::Bert),
        "bert.embeddings.word_embeddings.weight"
    );
    assert_eq!(
        canonical_name("encoder.layer.0.output.LayerNorm.gamma", Family::Roberta),
        "roberta.encoder.layer.0.output.LayerNorm.weight"
    );
    assert_eq!(
        canonical_name("classifier.weight", Family::Bert),
        "classifier.weight"
    );
    assert_eq!(
        canonical_name("bert.pooler.dense.bias", Family::Bert),
        "bert.pooler.dense.bias"
    );
}
