//! Parity with Hugging Face transformers (goldens from `scripts/make_encoder_goldens.py`) and with
//! candle-transformers' BERT, fp32 CPU, max |Δ| ≤ 1e-4.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use qn_models::encoder::{build_encoder, pack_batch, read_weights, Encoder, EncoderConfig};
use qn_models::hub::{resolve, ModelRef};
use qn_models::text::TextTokenizer;
use qn_train::{named_vars, vars_without_gradient, QuantModel};
use serde_json::Value;

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

fn golden(name: &str) -> Value {
    let p = assets().join("golden").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn load(dir: &Path, labels: usize) -> (Encoder, TextTokenizer) {
    let files = resolve(&ModelRef::Dir(dir.to_path_buf()), None).unwrap();
    let cfg = EncoderConfig::from_file(&files.config).unwrap();
    let tensors = read_weights(&files.weights, cfg.family(), &Device::Cpu).unwrap();
    let loaded = build_encoder(&cfg, tensors, &files.weights, labels, 0, &Device::Cpu).unwrap();
    let tok =
        TextTokenizer::from_file(files.tokenizer.as_ref().unwrap(), None, cfg.pad_id()).unwrap();
    (loaded.model, tok)
}

fn minilm_dir() -> Option<PathBuf> {
    match std::env::var_os("QN_DATA_DIR") {
        Some(d) => Some(PathBuf::from(d).join("models/all-MiniLM-L6-v2")),
        None => {
            eprintln!(
                "skipped: QN_DATA_DIR is not set (all-MiniLM-L6-v2 lives in $QN_DATA_DIR/models)"
            );
            None
        }
    }
}

#[test]
fn tiny_roberta_matches_transformers_on_sentences_and_pairs() {
    let (model, tok) = load(&assets().join("tiny-roberta"), 3);
    let g = golden("tiny-roberta.json");
    for (case, rows) in [("single", None), ("pair", Some(()))] {
        let want_ids = ids(&g[case]["input_ids"]);
        let texts: Vec<(String, Option<String>)> = match rows {
            None => g["sentences"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s.as_str().unwrap().to_string(), None))
                .collect(),
            Some(()) => g["pairs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p[0].as_str().unwrap().to_string(),
                        Some(p[1].as_str().unwrap().to_string()),
                    )
                })
                .collect(),
        };
        let enc: Vec<(Vec<u32>, Vec<u32>)> = texts
            .iter()
            .map(|(a, b)| tok.encode(a, b.as_deref()).unwrap())
            .collect();
        for (got, want) in enc.iter().zip(&want_ids) {
            let n = got.0.len();
            assert_eq!(
                &got.0[..],
                &want[..n],
                "{case}: token ids differ from transformers"
            );
            assert!(
                want[n..].iter().all(|&t| t == 1),
                "{case}: only padding follows"
            );
        }
        let x = pack_batch(&enc, tok.pad_id(), &Device::Cpu).unwrap();
        let logits = model.forward_t(&x, false).unwrap();
        let d = max_diff(
            &logits.flatten_all().unwrap().to_vec1().unwrap(),
            &floats(&g[case]["logits"]),
        );
        assert!(d <= 1e-4, "{case}: logits differ by {d}");
        let (i, t, m) = Encoder::unpack(&x).unwrap();
        let h = model.hidden_states(&i, &t, &m, false).unwrap();
        let shape: Vec<usize> = g[case]["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(h.dims(), &shape[..]);
        let d = max_diff(
            &h.flatten_all().unwrap().to_vec1().unwrap(),
            &floats(&g[case]["last_hidden_state"]),
        );
        assert!(d <= 1e-4, "{case}: hidden states differ by {d}");
    }
}

#[test]
fn every_variable_gets_a_gradient_in_training() {
    let (model, tok) = load(&assets().join("tiny-roberta"), 3);
    let rows = vec![
        tok.encode("a charming journey", None).unwrap(),
        tok.encode("bleak", Some("and desperate")).unwrap(),
    ];
    let x = pack_batch(&rows, tok.pad_id(), &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
    let logits = model.forward_t(&x, true).unwrap();
    let loss = qn_train::trainer::cross_entropy(&logits, &y).unwrap();
    let grads = loss.backward().unwrap();
    let missing = vars_without_gradient(&grads, &named_vars(&model));
    // RoBERTa's single token type never varies: its row still gets a gradient.
    assert!(missing.is_empty(), "no gradient: {missing:?}");
}

#[test]
fn minilm_embedding_matches_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let (model, tok) = load(&dir, 2);
    let g = golden("minilm.json");
    let sentences: Vec<&str> = g["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let enc: Vec<_> = sentences
        .iter()
        .map(|s| tok.encode(s, None).unwrap())
        .collect();
    let want_ids = ids(&g["input_ids"]);
    for (got, want) in enc.iter().zip(&want_ids) {
        assert_eq!(&got.0[..], &want[..got.0.len()]);
    }
    let x = pack_batch(&enc, tok.pad_id(), &Device::Cpu).unwrap();
    let (i, t, m) = Encoder::unpack(&x).unwrap();
    let h = model.hidden_states(&i, &t, &m, false).unwrap();
    let e = model.mean_pooled(&h, &m, true).unwrap();
    let e: Vec<Vec<f32>> = e.to_vec2().unwrap();
    // The figure the shared README states, to four decimals.
    let stated = [0.0843f32, 0.0580, 0.0045, 0.1058, 0.0071];
    for (a, b) in e[0].iter().zip(stated) {
        assert!((a - b).abs() < 6e-5, "embedding starts {:?}", &e[0][..5]);
    }
    for (row, want) in e.iter().zip(g["embeddings"].as_array().unwrap()) {
        let d = max_diff(row, &floats(want));
        assert!(d <= 1e-4, "embedding differs by {d}");
    }
    // A sentence pair: token types 1 on the second segment, hidden states and pooler output.
    let pair = tok
        .encode(
            g["pair"][0].as_str().unwrap(),
            Some(g["pair"][1].as_str().unwrap()),
        )
        .unwrap();
    assert_eq!(vec![pair.0.clone()], ids(&g["pair_input_ids"]));
    assert_eq!(vec![pair.1.clone()], ids(&g["pair_token_type_ids"]));
    let x = pack_batch(&[pair], 0, &Device::Cpu).unwrap();
    let (i, t, m) = Encoder::unpack(&x).unwrap();
    let h = model.hidden_states(&i, &t, &m, false).unwrap();
    let d = max_diff(
        &h.flatten_all().unwrap().to_vec1().unwrap(),
        &floats(&g["pair_last_hidden_state"]),
    );
    assert!(d <= 1e-4, "pair hidden states differ by {d}");
    let pooled = model.pooled(&h).unwrap();
    let d = max_diff(
        &pooled.flatten_all().unwrap().to_vec1().unwrap(),
        &floats(&g["pair_pooler_output"]),
    );
    assert!(d <= 1e-4, "pooler output differs by {d}");
}

#[test]
fn minilm_agrees_with_candle_transformers_bert() {
    let Some(dir) = minilm_dir() else { return };
    let (model, tok) = load(&dir, 2);
    let cfg: candle_transformers::models::bert::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let reference = candle_transformers::models::bert::BertModel::load(vb, &cfg).unwrap();
    let rows = vec![
        tok.encode("The quick brown fox jumps over the lazy dog.", None)
            .unwrap(),
        tok.encode("Short one", Some("and its pair")).unwrap(),
    ];
    let x = pack_batch(&rows, 0, &Device::Cpu).unwrap();
    let (i, t, m) = Encoder::unpack(&x).unwrap();
    let ours = model.hidden_states(&i, &t, &m, false).unwrap();
    let theirs = reference.forward(&i, &t, Some(&m)).unwrap();
    let d = max_diff(
        &ours.flatten_all().unwrap().to_vec1().unwrap(),
        &theirs.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert!(d <= 1e-4, "differs from candle-transformers by {d}");
}
