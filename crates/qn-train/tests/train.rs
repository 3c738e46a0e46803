//! Training with block-drop noise on real data, iterative PQ in two stages, export, and resume.

use std::path::{Path, PathBuf};

use candle_core::Device;
use qn_train::data::{fashion_mnist, Dataset};
use qn_train::mlp::Mlp;
use qn_train::trainer::{export_qnz, run_stages, RunOutput, StagePlan, TrainConfig};
use qn_train::{named_vars, NoiseConfig, QuantModel};

/// Fashion-MNIST from `$QN_DATA_DIR/data/fashion-mnist`, else the subset in `assets/`.
fn data_dir() -> PathBuf {
    match std::env::var_os("QN_DATA_DIR") {
        Some(d) if Path::new(&d).join("data/fashion-mnist").exists() => {
            Path::new(&d).join("data/fashion-mnist")
        }
        _ => {
            eprintln!("QN_DATA_DIR is not set: using the 2,000-image subset in assets/");
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/fashion-mnist-subset")
        }
    }
}

fn datasets() -> (Dataset, Dataset) {
    let dir = data_dir();
    (
        fashion_mnist(&dir, "train", Some(10_000), &Device::Cpu).unwrap(),
        fashion_mnist(&dir, "t10k", Some(1_000), &Device::Cpu).unwrap(),
    )
}

fn noisy_mlp(seed: u64) -> Mlp {
    let mlp = Mlp::seeded(784, 128, 10, seed, &Device::Cpu).unwrap();
    for (i, l) in mlp.layers().iter().enumerate() {
        l.set_noise(
            NoiseConfig::BlockDrop {
                p: 0.1,
                block_size: 4,
            },
            100 + i as u64,
        );
    }
    mlp
}

#[test]
fn block_drop_training_then_two_ipq_stages_keeps_accuracy() {
    let (train, test) = datasets();
    let mut mlp = noisy_mlp(1);
    let plan = StagePlan::from_toml(
        r#"
        int8_centroids = true
        [[stage]]
        name = "float"
        steps = 400
        [[stage]]
        name = "hidden"
        layers = "fc1|fc2"
        block_size = 8
        n_centroids = 64
        steps = 150
        [[stage]]
        name = "head"
        layers = "head"
        block_size = 4
        n_centroids = 32
        steps = 50
        "#,
    )
    .unwrap();
    let cfg = TrainConfig {
        lr: 2e-3,
        warmup: 20,
        batch_size: 64,
        ..TrainConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let out = RunOutput {
        dir: Some(dir.path().to_path_buf()),
        stop_after: None,
    };
    let report = run_stages(&mut mlp, &train, &test, &plan, &cfg, &out).unwrap();
    let (float, compressed) = (
        report.stage_accuracy[0],
        *report.stage_accuracy.last().unwrap(),
    );
    eprintln!(
        "accuracy: float {float:.3}, after iPQ + int8 {compressed:.3}; stages {:?}",
        report.stage_accuracy
    );
    assert!(float > 0.75, "float model reached only {float}");
    // Stated margin: iPQ at 0.75 bits per hidden weight (+ int8 codebooks) loses at most 3 points.
    assert!(
        compressed >= float - 0.03,
        "compressed {compressed} vs float {float}"
    );

    // Export: the decoded file is the model the accuracy was measured on.
    let path = dir.path().join("mlp.qnz");
    let size = export_qnz(&mlp, &path, qn_format::header::CodebookKind::Int8).unwrap();
    let reader = qn_format::Reader::open(&path).unwrap();
    for layer in mlp.layers() {
        let stored = layer
            .qweight()
            .stored()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let decoded = reader
            .tensor(&format!("{}.weight", layer.name()))
            .unwrap()
            .decode_f32()
            .unwrap();
        assert_eq!(stored, decoded, "{}", layer.name());
    }
    let float_bytes = (784 * 128 + 128 * 128 + 128 * 10 + 128 + 128 + 10) * 4;
    assert!(
        size * 10 < float_bytes as u64,
        "{size} bytes vs {float_bytes} in f32"
    );

    // Metrics: one JSON line per step with the fields a dashboard needs.
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in ["step", "stage", "loss", "lr", "noise_rate"] {
        assert!(!first[key].is_null(), "{key} missing: {first}");
    }
    assert_eq!(
        metrics.lines().filter(|l| !l.contains("stage_end")).count(),
        600
    );
}

#[test]
fn a_killed_run_resumes_to_identical_weights() {
    let (train, test) = datasets();
    let plan = StagePlan::from_toml(
        r#"
        [[stage]]
        name = "float"
        steps = 20
        [[stage]]
        name = "fc2"
        layers = "fc1|fc2"
        n_centroids = 16
        steps = 20
        [[stage.override]]
        match = "fc1"
        block_size = 16
        n_centroids = 8
        "#,
    )
    .unwrap();
    let cfg = TrainConfig {
        lr: 1e-3,
        batch_size: 32,
        checkpoint_every: 7,
        kmeans_iters: 5,
        ..TrainConfig::default()
    };
    let weights = |m: &Mlp| -> Vec<(String, Vec<u32>)> {
        named_vars(m)
            .into_iter()
            .map(|(n, v)| {
                (
                    n,
                    v.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect(),
                )
            })
            .collect()
    };

    let whole = tempfile::tempdir().unwrap();
    let mut a = noisy_mlp(7);
    let ra = run_stages(
        &mut a,
        &train,
        &test,
        &plan,
        &cfg,
        &RunOutput {
            dir: Some(whole.path().into()),
            stop_after: None,
        },
    )
    .unwrap();
    assert!(!ra.stopped && ra.steps == 40);

    // Killed twice: mid-way through stage 2 (last checkpoint: end of stage 1), then later in stage 2
    // (last checkpoint: step 7 of stage 2). Each restart builds the model afresh, as a new process would.
    let killed = tempfile::tempdir().unwrap();
    for stop in [Some(25), Some(30), None] {
        let mut b = noisy_mlp(7);
        let rb = run_stages(
            &mut b,
            &train,
            &test,
            &plan,
            &cfg,
            &RunOutput {
                dir: Some(killed.path().into()),
                stop_after: stop,
            },
        )
        .unwrap();
        if stop.is_none() {
            assert_eq!(rb.steps, 40);
            assert_eq!(weights(&a), weights(&b), "resumed weights differ");
            // The override reached fc1: 8 centroids of 16 values.
            let names: Vec<_> = named_vars(&b)
                .into_iter()
                .map(|(n, v)| (n, v.dims().to_vec()))
                .collect();
            assert!(
                names.contains(&("fc1.centroids".to_string(), vec![8, 16])),
                "{names:?}"
            );
            assert!(
                names.contains(&("fc2.centroids".to_string(), vec![16, 8])),
                "{names:?}"
            );
            assert_eq!(ra.stage_accuracy.last(), rb.stage_accuracy.last());
        } else {
            assert!(rb.stopped);
        }
    }
}

#[test]
fn every_mlp_variable_gets_a_gradient_before_and_after_pq() {
    use qn_train::trainer::cross_entropy;
    let (train, _) = datasets();
    let (x, y) = train.batch(0, 64, 0).unwrap();
    let mut mlp = noisy_mlp(3);
    for round in 0..2 {
        let loss = cross_entropy(&mlp.forward_t(&x, true).unwrap(), &y).unwrap();
        let grads = loss.backward().unwrap();
        let vars = named_vars(&mlp);
        assert_eq!(vars.len(), 6);
        assert!(
            qn_train::vars_without_gradient(&grads, &vars).is_empty(),
            "round {round}"
        );
        if round == 0 {
            for l in mlp.layers_mut() {
                l.quantize_pq(
                    4,
                    &qn_train::kernels::pq::KMeansConfig::new(16).with_iters(3),
                    qn_train::CentroidGrad::Mean,
                )
                .unwrap();
            }
        }
    }
}
