//! The encoder commands end to end on the tiny RoBERTa of `assets/` (and all-MiniLM-L6-v2 when
//! `QN_DATA_DIR` is set): finetune → compress → eval → predict → embed → decompress, resume after a
//! pause, and bad input.

use std::path::Path;
use std::process::Output;

use qn_tests::{asset, ok, qn, shared};
use serde_json::Value;

fn json(out: &Output) -> Value {
    let s = ok(out);
    assert_eq!(
        s.trim().lines().count(),
        1,
        "stdout is one JSON object: {s}"
    );
    serde_json::from_str(s.trim()).unwrap()
}

/// Exit 1 or 2, the last stderr line an error naming every needle (warnings may precede it).
fn refused(out: &Output, what: &str, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let code = out.status.code();
    assert!(
        matches!(code, Some(1) | Some(2)),
        "{what}: exit {code:?}: {err}"
    );
    let last = err.trim().lines().last().unwrap_or_default().to_string();
    if code == Some(1) {
        assert!(last.starts_with("qn: error: "), "{what}: {err}");
        assert!(
            !err.lines().any(|l| l.contains("panicked")),
            "{what}: {err}"
        );
    }
    for n in needles {
        assert!(err.contains(n), "{what}: `{n}` missing from: {err}");
    }
}

fn finetune(out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<String> = [
        "finetune",
        "--model",
        asset("tiny-roberta").to_str().unwrap(),
        "--train",
        asset("text/sst2-train-200.tsv").to_str().unwrap(),
        "--eval",
        asset("text/sst2-validation-100.tsv").to_str().unwrap(),
        "--task",
        "sst2",
        "--max-len",
        "32",
        "--max-steps",
        "6",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|s| s as _).collect();
    qn(&refs)
}

fn eval_json(model: &Path) -> Value {
    json(&qn(&[
        &"eval",
        &"--model",
        &model,
        &"--data",
        &asset("text/sst2-validation-100.tsv"),
        &"--task",
        &"sst2",
        &"--max-len",
        &"32",
        &"--json",
    ]))
}

#[test]
fn finetune_compress_eval_predict_embed_decompress() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let noise = ["--noise", "block:p=0.1"];
    ok(&finetune(&run, &noise));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "metrics.jsonl",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["architectures"][0],
        "RobertaForSequenceClassification"
    );
    assert_eq!(config["id2label"]["1"], "positive");
    assert_eq!(config["label2id"]["negative"], 0);
    // Rerunning a finished run changes nothing.
    let before = std::fs::read(run.join("model.safetensors")).unwrap();
    ok(&finetune(&run, &noise));
    assert_eq!(
        before,
        std::fs::read(run.join("model.safetensors")).unwrap()
    );

    let e = eval_json(&run);
    assert_eq!(e["examples"], 100);
    let acc = e["accuracy"].as_f64().unwrap();
    assert!(
        (0.0..=1.0).contains(&acc) && e["seconds"].as_f64().unwrap() >= 0.0 && e["f1"].is_number()
    );

    let qnz = tmp.path().join("model.qnz");
    ok(&qn(&[
        &"compress",
        &"--model",
        &run,
        &"--train",
        &asset("text/sst2-train-200.tsv"),
        &"--task",
        &"sst2",
        &"--steps",
        &"2",
        &"--batch-size",
        &"8",
        &"--max-len",
        &"32",
        &"-o",
        &qnz,
    ]));
    assert!(
        !tmp.path().join("model.qnz.work").exists(),
        "the default stage checkpoints go once the file is written"
    );
    // The file carries the tokenizer too: the weights alone must be far smaller than fp32.
    let size = tensor_bytes(&qnz);
    assert!(
        size * 3
            < std::fs::metadata(run.join("model.safetensors"))
                .unwrap()
                .len()
    );
    let eq = eval_json(&qnz);

    let p = json(&qn(&[
        &"predict",
        &"--model",
        &qnz,
        &"--text",
        &"a charming journey",
        &"--json",
    ]));
    assert_eq!(p["logits"].as_array().unwrap().len(), 2);
    assert!(p["label"] == "positive" || p["label"] == "negative");
    let many = json(&qn(&[
        &"predict", &"--model", &qnz, &"--text", &"good", &"--text", &"bad", &"--json",
    ]));
    assert_eq!(many["predictions"].as_array().unwrap().len(), 2);
    let emb = json(&qn(&[
        &"embed",
        &"--model",
        &qnz,
        &"--text",
        &"a charming journey",
        &"--json",
    ]));
    let v: Vec<f64> = emb["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(v.len(), 32);
    assert!(
        (v.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4,
        "L2-normalised"
    );

    // Decompress into an existing empty directory: a Hugging Face directory giving the same
    // accuracy, with the source's tokenizer files byte for byte.
    let hf = tmp.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    ok(&qn(&[&"decompress", &qnz, &"-o", &hf]));
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(hf.join(f)).unwrap(),
            std::fs::read(asset("tiny-roberta").join(f)).unwrap(),
            "{f}"
        );
    }
    let names = safetensors_names(&hf.join("model.safetensors"));
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("roberta.") || n.starts_with("classifier.")),
        "{names:?}"
    );
    assert_eq!(eval_json(&hf)["correct"], eq["correct"]);
    // The `.qnz` runs from its codes; its decompressed directory is dense: the same logits.
    let dense = json(&qn(&[
        &"predict",
        &"--model",
        &hf,
        &"--text",
        &"a charming journey",
        &"--json",
    ]));
    let logits = |j: &Value| -> Vec<f64> {
        j["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (a, b) = (logits(&p), logits(&dense));
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4 * scale, "{a:?} vs {b:?}");
    }
    // A non-empty directory is refused, and left as it was.
    refused(
        &qn(&[&"decompress", &qnz, &"-o", &hf]),
        "non-empty output",
        &["not an empty directory"],
    );
}

fn safetensors_names(p: &Path) -> Vec<String> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.names().into_iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_paused_finetune_resumes_to_the_same_model_and_logs_each_step_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let noise = ["--noise", "block:p=0.1"];
    ok(&finetune(&a, &noise));
    let out = ok(&finetune(&b, &["--noise", "block:p=0.1", "--stop-at", "3"]));
    assert!(out.contains("paused at step 3"), "{out}");
    assert!(!b.join("model.safetensors").exists());
    ok(&finetune(&b, &noise));
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap(),
        "dropout, noise and batches depend on the step only"
    );
    let steps: Vec<u64> = std::fs::read_to_string(b.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
}

#[test]
fn noise_goes_to_the_encoder_layers_projections_unless_told_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    // tiny-roberta: 3 embeddings, 2 layers x 6 projections, a 2-Linear head = 17 layers.
    for (i, (extra, said)) in [
        (vec![], "noise on 12 of 17 layers"),
        (vec!["--noise-layers", "."], "noise on 17 of 17 layers"),
        (
            vec!["--noise-layers", r"\.intermediate\.dense$"],
            "noise on 2 of 17 layers",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let out = tmp.path().join(format!("run{i}"));
        let mut args = vec!["--noise", "block:p=0.1", "--stop-at", "1"];
        args.extend(extra.iter().copied());
        let o = finetune(&out, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{extra:?}: {err}");
        assert!(err.contains(said), "{extra:?}: wanted `{said}` in {err}");
    }
}

#[test]
fn int8_and_int4_files_evaluate_and_shrink() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sizes = Vec::new();
    for m in ["int8", "int4"] {
        let f = tmp.path().join(format!("{m}.qnz"));
        ok(&qn(&[
            &"compress",
            &"--model",
            &asset("tiny-roberta"),
            &"--method",
            &m,
            &"-o",
            &f,
        ]));
        let e = eval_json(&f);
        assert_eq!(e["examples"], 100);
        sizes.push(tensor_bytes(&f));
    }
    // Post-training int-N reads no data: a --train given anyway is named as unread, not used.
    let f = tmp.path().join("with-train.qnz");
    let o = qn(&[
        &"compress",
        &"--model",
        &asset("tiny-roberta"),
        &"--method",
        &"int8",
        &"--train",
        &asset("text/sst2-validation-100.tsv"),
        &"--task",
        &"sst2",
        &"-o",
        &f,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("--train is not read by --method int8"),
        "{err}"
    );
    let fp32 = std::fs::metadata(asset("tiny-roberta/model.safetensors"))
        .unwrap()
        .len();
    // Per-row scales weigh a lot on rows of 32: int8 is ~2.6x smaller here, not 4x.
    assert!(
        sizes[1] < sizes[0] && sizes[0] < fp32 / 2,
        "{sizes:?} vs {fp32}"
    );
}

/// The bytes of a `.qnz`'s tensor records (`qn inspect`'s ledger): the file less its header (which
/// carries the tokenizer and config) and padding.
fn tensor_bytes(qnz: &Path) -> u64 {
    let j: Value = serde_json::from_str(&ok(&qn(&[&"inspect", &qnz, &"--json"]))).unwrap();
    j["total_bytes"].as_u64().unwrap()
        - j["header_bytes"].as_u64().unwrap()
        - j["padding_bytes"].as_u64().unwrap()
}

#[test]
fn sentence_pairs_train_and_evaluate() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("rte");
    let rte = asset("text/rte-dev-40.tsv");
    ok(&qn(&[
        &"finetune",
        &"--model",
        &asset("tiny-roberta"),
        &"--train",
        &rte,
        &"--eval",
        &rte,
        &"--task",
        &"rte",
        &"--max-steps",
        &"2",
        &"--batch-size",
        &"8",
        &"--max-len",
        &"64",
        &"-o",
        &run,
    ]));
    let e = json(&qn(&[
        &"eval", &"--model", &run, &"--data", &rte, &"--task", &"rte", &"--json",
    ]));
    assert_eq!(e["examples"], 40);
    let p = json(&qn(&[
        &"predict",
        &"--model",
        &run,
        &"--text",
        &"A cat sat.",
        &"--text-pair",
        &"A cat is sitting.",
        &"--json",
    ]));
    assert!(
        p["label"] == "entailment" || p["label"] == "not_entailment",
        "{p}"
    );
}

#[test]
fn bad_input_is_one_line_naming_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    for (extra, what, needles) in [
        (vec!["--batch-size", "0"], "batch 0", vec!["--batch-size"]),
        (vec!["--max-len", "0"], "max-len 0", vec!["--max-len"]),
        (
            vec!["--max-examples", "0"],
            "max-examples 0",
            vec!["--max-examples", "0 is not a positive count"],
        ),
        (
            vec!["--max-examples", "-3"],
            "max-examples -3",
            vec!["--max-examples", "`-3` is not a positive whole number"],
        ),
        (vec!["--noise", "1.5"], "noise 1.5", vec!["--noise"]),
        (vec!["--lr", "nan"], "lr nan", vec!["--lr"]),
        (
            vec!["--noise-layers", "("],
            "bad regex",
            vec!["--noise-layers"],
        ),
        (
            vec![
                "--noise",
                "block:p=0.1",
                "--noise-layers",
                "^nothing-matches$",
            ],
            "no layer",
            vec!["matches no layer"],
        ),
    ] {
        let mut args = vec!["--stop-at", "1"];
        args.extend(extra);
        refused(&finetune(&out, &args), what, &needles);
        assert!(
            !out.join("model.safetensors").exists(),
            "{what}: wrote output"
        );
    }
    // predict and embed refuse an empty or negative batch before loading anything.
    for cmd in ["predict", "embed"] {
        for b in ["0", "-2"] {
            refused(
                &qn(&[
                    &cmd,
                    &"--model",
                    &asset("tiny-roberta"),
                    &"--text",
                    &"hi",
                    &"--batch-size",
                    &b,
                ]),
                &format!("{cmd} --batch-size {b}"),
                &["--batch-size"],
            );
        }
    }
    // --input: an empty file, three fields on a line, an empty pair or text: file and line named.
    let inputs = tmp.path().join("inputs.txt");
    for (body, what, needles) in [
        ("\n \n", "empty input file", vec!["inputs.txt", "no text"]),
        (
            "good\na\tb\tc\n",
            "three fields",
            vec!["inputs.txt", "line 2", "3 tab-separated"],
        ),
        (
            "good\tfine\nbad\t \n",
            "empty pair",
            vec!["inputs.txt", "line 2", "empty text"],
        ),
    ] {
        std::fs::write(&inputs, body).unwrap();
        for cmd in ["predict", "embed"] {
            refused(
                &qn(&[
                    &cmd,
                    &"--model",
                    &asset("tiny-roberta"),
                    &"--input",
                    &inputs,
                ]),
                &format!("{cmd}: {what}"),
                &needles,
            );
        }
    }
    refused(
        &qn(&[
            &"predict",
            &"--model",
            &asset("tiny-roberta"),
            &"--text",
            &"good",
            &"--text-pair",
            &"",
        ]),
        "empty --text-pair",
        &["--text 1", "empty"],
    );
    // A malformed row names the file and line; a label outside the map names it.
    let bad = tmp.path().join("bad.tsv");
    std::fs::write(&bad, "sentence\tlabel\ngood\t1\nno label here\n").unwrap();
    refused(
        &qn(&[
            &"eval",
            &"--model",
            &asset("tiny-roberta"),
            &"--data",
            &bad,
            &"--task",
            &"sst2",
        ]),
        "row",
        &["bad.tsv", "line 3"],
    );
    std::fs::write(&bad, "sentence\tlabel\ngood\t7\n").unwrap();
    refused(
        &qn(&[
            &"eval",
            &"--model",
            &asset("tiny-roberta"),
            &"--data",
            &bad,
            &"--task",
            &"sst2",
        ]),
        "label",
        &["line 2", "`7`"],
    );
    std::fs::write(&bad, "a\tb\tc\tfoo\n").unwrap();
    refused(
        &qn(&[
            &"eval",
            &"--model",
            &asset("tiny-roberta"),
            &"--data",
            &bad,
            &"--task",
            &"rte",
        ]),
        "rte label",
        &["line 1", "`foo`"],
    );
    // A sequence beyond the positions without truncation.
    let long = "word ".repeat(200);
    refused(
        &qn(&[
            &"predict",
            &"--model",
            &asset("tiny-roberta"),
            &"--text",
            &long,
        ]),
        "too long",
        &["max_position_embeddings", "--max-len"],
    );
    // A model directory without tokenizer.json, an unsupported config, an unknown hub id offline.
    let m = tmp.path().join("m");
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(asset("tiny-roberta").join(f), m.join(f)).unwrap();
    }
    refused(
        &qn(&[&"predict", &"--model", &m, &"--text", &"hi"]),
        "no tokenizer",
        &["tokenizer.json"],
    );
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    std::fs::write(
        m.join("config.json"),
        cfg.replace(
            "\"model_type\": \"roberta\"",
            "\"model_type\": \"roberta\", \"position_embedding_type\": \"relative_key\"",
        ),
    )
    .unwrap();
    refused(
        &qn(&[&"embed", &"--model", &m, &"--text", &"hi"]),
        "relative",
        &["position_embedding_type"],
    );
    let o = std::process::Command::new(qn_tests::qn_bin())
        .args(["embed", "--model", "nobody/no-such-model", "--text", "hi"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", tmp.path())
        .output()
        .unwrap();
    refused(
        &o,
        "unknown hub id",
        &["nobody/no-such-model", tmp.path().to_str().unwrap()],
    );
    // A bare tensor file is not a model.
    let bare = tmp.path().join("bare.qnz");
    ok(&qn(&[
        &"quantize",
        &asset("minilm-l6-layer0.safetensors"),
        &"--method",
        &"int8",
        &"-o",
        &bare,
    ]));
    refused(
        &qn(&[
            &"eval",
            &"--model",
            &bare,
            &"--data",
            &asset("text/sst2-validation-100.tsv"),
            &"--task",
            &"sst2",
        ]),
        "bare",
        &["qn compress"],
    );
    refused(
        &qn(&[
            &"predict",
            &"--model",
            &asset("tiny-roberta"),
            &"--text",
            &"a",
            &"--text",
            &"b",
            &"--text-pair",
            &"c",
        ]),
        "pairs",
        &["--text-pair"],
    );
    refused(
        &qn(&[
            &"compress",
            &"--model",
            &asset("tiny-roberta"),
            &"-o",
            &tmp.path().join("x.qnz"),
        ]),
        "ipq without data",
        &["--train"],
    );
    assert!(!tmp.path().join("x.qnz").exists());
}

#[test]
fn minilm_embed_and_int8_round_trip() {
    let Some(m) = shared("models/all-MiniLM-L6-v2") else {
        return;
    };
    let e = json(&qn(&[
        &"embed",
        &"--model",
        &m,
        &"--text",
        &"This is a test sentence.",
        &"--json",
    ]));
    let v: Vec<f64> = e["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    for (a, b) in v.iter().zip([0.0843, 0.0580, 0.0045, 0.1058, 0.0071]) {
        assert!((a - b).abs() < 6e-5, "{:?}", &v[..5]);
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("minilm-int8.qnz");
    ok(&qn(&[
        &"compress",
        &"--model",
        &m,
        &"--method",
        &"int8",
        &"-o",
        &f,
    ]));
    let e8 = json(&qn(&[
        &"embed",
        &"--model",
        &f,
        &"--text",
        &"This is a test sentence.",
        &"--json",
    ]));
    let w: Vec<f64> = e8["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let cos: f64 = v.iter().zip(&w).map(|(a, b)| a * b).sum();
    assert!(cos > 0.99, "int8 embedding cosine {cos}");
    let hf = tmp.path().join("hf");
    ok(&qn(&[&"decompress", &f, &"-o", &hf]));
    let names = safetensors_names(&hf.join("model.safetensors"));
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("bert.") || n.starts_with("classifier.")),
        "prefix added"
    );
    for file in [
        "tokenizer.json",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "modules.json",
        "1_Pooling/config.json",
    ] {
        assert_eq!(
            std::fs::read(hf.join(file)).unwrap(),
            std::fs::read(m.join(file)).unwrap(),
            "{file}"
        );
    }
}

/// `scripts/check_hf_load.py` loaded our decompressed directories with transformers
/// (`output_loading_info`): no missing or unexpected keys, the same logits. This checks that the
/// directory written today has exactly the tensors transformers found then.
#[test]
fn decompressed_directories_have_the_tensors_transformers_loaded() {
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(asset("golden/hf-load-check.json")).unwrap())
            .unwrap();
    for (name, g) in golden.as_object().unwrap() {
        for k in ["missing_keys", "unexpected_keys", "mismatched_keys"] {
            assert!(g[k].as_array().unwrap().is_empty(), "{name}: {k} {}", g[k]);
        }
        assert!(g["max_abs_logit_diff"].as_f64().unwrap() <= 1e-4, "{name}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let qnz = tmp.path().join("m.qnz");
    ok(&qn(&[
        &"compress",
        &"--model",
        &asset("tiny-roberta"),
        &"--method",
        &"int8",
        &"-o",
        &qnz,
    ]));
    let hf = tmp.path().join("hf");
    ok(&qn(&[&"decompress", &qnz, &"-o", &hf]));
    let mut ours = safetensors_names(&hf.join("model.safetensors"));
    ours.sort();
    let want: Vec<String> = golden["tiny-roberta"]["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ours, want);
}

#[test]
fn freeze_embeddings_leaves_the_tables_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("frozen");
    ok(&finetune(&run, &["--freeze-embeddings", "--lr", "1e-2"]));
    let read = |p: &Path, name: &str| -> Vec<u8> {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor(name).unwrap().data().to_vec()
    };
    let src = asset("tiny-roberta/model.safetensors");
    let out = run.join("model.safetensors");
    for t in [
        "roberta.embeddings.word_embeddings.weight",
        "roberta.embeddings.position_embeddings.weight",
    ] {
        assert_eq!(read(&src, t), read(&out, t), "{t} changed");
    }
    let t = "roberta.encoder.layer.0.attention.self.query.weight";
    assert_ne!(read(&src, t), read(&out, t), "{t} did not train");
}

/// What `cargo xtask bench` relies on: an evaluation subset while fine-tuning, PQ noise on a model
/// with a layer too small for K centroids (warned, not refused), and `qn compress`'s codebook and
/// k-means settings.
#[test]
fn bench_flags_eval_subset_pq_noise_codebook_and_kmeans_iters() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // The tiny RoBERTa's token-type table has 1 x 32 weights: 4 blocks of 8, fewer than 16.
    let out = finetune(
        &run,
        &[
            "--max-eval-examples",
            "20",
            "--noise",
            "pq:p=1,k=16,every=3",
            // As the bench: every layer, embeddings included.
            "--noise-layers",
            ".",
        ],
    );
    let stdout = ok(&out);
    assert!(stdout.contains("on 20 examples"), "{stdout}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("token_type_embeddings") && err.contains("gets no PQ noise"),
        "{err}"
    );
    let compress_with =
        |codebook: &str, iters: &str, out: &Path, extra: &[&dyn AsRef<std::ffi::OsStr>]| {
            let train = asset("text/sst2-train-200.tsv");
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
                &"compress",
                &"--model",
                &run,
                &"--train",
                &train,
                &"--task",
                &"sst2",
                &"--steps",
                &"1",
                &"--batch-size",
                &"8",
                &"--max-len",
                &"32",
                &"--codebook",
                &codebook,
                &"--kmeans-iters",
                &iters,
                &"-o",
                &out,
            ];
            args.extend_from_slice(extra);
            qn(&args)
        };
    let compress =
        |codebook: &str, iters: &str, out: &Path| compress_with(codebook, iters, out, &[]);
    let (f16, int8) = (tmp.path().join("f16.qnz"), tmp.path().join("int8.qnz"));
    ok(&compress("f16", "3", &f16));
    // A work directory the user names is kept, with the stage checkpoints a rerun resumes from.
    let work = tmp.path().join("stages");
    ok(&compress_with(
        "f16",
        "3",
        &tmp.path().join("kept.qnz"),
        &[&"--work-dir", &work],
    ));
    assert!(work.join("latest.json").exists());
    ok(&compress("int8", "3", &int8));
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    // Same codes, centroids of 2 bytes against 1: the f16 file is the larger.
    assert!(
        size(&f16) > size(&int8),
        "{} vs {}",
        size(&f16),
        size(&int8)
    );
    for f in [&f16, &int8] {
        assert_eq!(eval_json(f)["examples"], 100);
    }
    for (flag, bad) in [("--codebook", "int5"), ("--kmeans-iters", "0")] {
        let (c, i) = if flag == "--codebook" {
            (bad, "3")
        } else {
            ("f16", bad)
        };
        refused(&compress(c, i, &tmp.path().join("bad.qnz")), flag, &[flag]);
    }
}
