//! Training with block-drop noise on real data, iterative PQ in two stages, export, and resume.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Device;
use qn_train::data::{fashion_mnist, Dataset};
use qn_train::layers::QuantNoiseLayer;
use qn_train::mlp::Mlp;
use qn_train::trainer::{export_qnz, run_stages, RunOutput, StagePlan, TrainConfig};
use qn_train::{named_vars, NoiseConfig, NoiseStep, QuantModel};

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
        )
        .unwrap();
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
        centroids = 64
        steps = 150
        [[stage]]
        name = "head"
        layers = "head"
        block_size = 4
        centroids = 32
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
        stop_at: None,
        cancel: None,
    };
    let report = run_stages(&mut mlp, &train, &test, &plan, &cfg, &out).unwrap();
    // The float baseline trains as many steps (600) as the whole staged run, from the same start.
    let mut baseline = noisy_mlp(1);
    let float = run_stages(
        &mut baseline,
        &train,
        &test,
        &StagePlan::float(600),
        &cfg,
        &RunOutput::default(),
    )
    .unwrap()
    .stage_accuracy[0];
    let compressed = *report.stage_accuracy.last().unwrap();
    eprintln!(
        "accuracy after 600 steps: float {float:.3}, after iPQ + int8 {compressed:.3}; stages {:?}",
        report.stage_accuracy
    );
    assert_eq!(report.steps, 600);
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

/// Two stages of 20 steps (float, then PQ of both layers with an override), checkpoints every 7.
fn two_stage_plan() -> (StagePlan, TrainConfig) {
    let plan = StagePlan::from_toml(
        r#"
        [[stage]]
        name = "float"
        steps = 20
        [[stage]]
        name = "fc2"
        layers = "fc1|fc2"
        centroids = 16
        steps = 20
        [[stage.override]]
        match = "fc1"
        block_size = 16
        centroids = 8
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
    (plan, cfg)
}

/// Every variable's bits, by name.
fn weights(m: &dyn QuantModel) -> Vec<(String, Vec<u32>)> {
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
}

/// The steps `metrics.jsonl` logs, stage-end lines left out.
fn logged_steps(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["stage_end"].is_null())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_killed_run_resumes_to_identical_weights() {
    let (train, test) = datasets();
    let (plan, cfg) = two_stage_plan();
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
            stop_at: None,
            cancel: None,
        },
    )
    .unwrap();
    assert!(!ra.stopped && ra.steps == 40);

    // Paused twice (stop_at 25, then 30), then run to the end. Each restart builds the model
    // afresh, as a new process would.
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
                stop_at: stop,
                cancel: None,
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
            // Stage results survive the pauses.
            assert_eq!(ra.stage_accuracy, rb.stage_accuracy);
            assert_eq!(rb.stage_accuracy.len(), 2);
        } else {
            assert!(rb.stopped);
            assert_eq!(Some(rb.steps), stop);
        }
    }
    // Every step is logged exactly once, as in the uninterrupted run.
    assert_eq!(logged_steps(killed.path()), (1..=40).collect::<Vec<_>>());
    assert_eq!(logged_steps(killed.path()), logged_steps(whole.path()));
}

/// The MLP, raising a cancel flag when the trainer starts step `at` (0-based), as a Ctrl-C handler
/// would in the middle of that step.
struct CancelDuring {
    inner: Mlp,
    at: u64,
    flag: Arc<AtomicBool>,
}

impl QuantModel for CancelDuring {
    fn forward_t(
        &self,
        x: &candle_core::Tensor,
        train: bool,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.inner.forward_t(x, train)
    }
    fn layers(&self) -> Vec<&dyn QuantNoiseLayer> {
        self.inner.layers()
    }
    fn layers_mut(&mut self) -> Vec<&mut dyn QuantNoiseLayer> {
        self.inner.layers_mut()
    }
    fn other_vars(&self) -> Vec<(String, candle_core::Var)> {
        self.inner.other_vars()
    }
    fn set_step(&self, at: NoiseStep) {
        if at.step == self.at {
            self.flag.store(true, Ordering::SeqCst);
        }
        self.inner.set_step(at)
    }
}

#[test]
fn a_cancelled_run_finishes_its_step_checkpoints_and_resumes_to_identical_weights() {
    let (train, test) = datasets();
    let (plan, cfg) = two_stage_plan();
    let whole = tempfile::tempdir().unwrap();
    let mut a = noisy_mlp(7);
    let out = RunOutput {
        dir: Some(whole.path().into()),
        ..RunOutput::default()
    };
    let ra = run_stages(&mut a, &train, &test, &plan, &cfg, &out).unwrap();
    assert!(!ra.stopped && !ra.interrupted && ra.steps == 40);

    // Cancelled during step 13 (not a checkpoint multiple), then during step 20 (the last of the
    // float stage: it stops before the PQ stage's k-means), then run to the end; a fresh model per
    // call, as a new process would build.
    let dir = tempfile::tempdir().unwrap();
    for (at, stops_after) in [(Some(12), 13), (Some(19), 20), (None, 40)] {
        let flag = Arc::new(AtomicBool::new(false));
        let mut b = CancelDuring {
            inner: noisy_mlp(7),
            at: at.unwrap_or(u64::MAX),
            flag: flag.clone(),
        };
        let out = RunOutput {
            dir: Some(dir.path().into()),
            cancel: Some(flag),
            ..RunOutput::default()
        };
        let rb = run_stages(&mut b, &train, &test, &plan, &cfg, &out).unwrap();
        assert_eq!(rb.steps, stops_after);
        assert_eq!((rb.stopped, rb.interrupted), (at.is_some(), at.is_some()));
        assert_eq!(
            logged_steps(dir.path()),
            (1..=stops_after as u64).collect::<Vec<_>>()
        );
        if at.is_none() {
            assert_eq!(weights(&a), weights(&b.inner), "resumed weights differ");
            assert_eq!(ra.stage_accuracy, rb.stage_accuracy);
        }
    }

    // A flag raised before the first step: nothing trained, nothing to resume from.
    let early = tempfile::tempdir().unwrap();
    let out = RunOutput {
        dir: Some(early.path().into()),
        cancel: Some(Arc::new(AtomicBool::new(true))),
        ..RunOutput::default()
    };
    let r = run_stages(&mut noisy_mlp(7), &train, &test, &plan, &cfg, &out).unwrap();
    assert!(r.interrupted && r.steps == 0);
    assert!(!early.path().join("metrics.jsonl").exists() || logged_steps(early.path()).is_empty());
}

fn pause_plan() -> (StagePlan, TrainConfig) {
    (
        StagePlan::float(13),
        TrainConfig {
            lr: 1e-3,
            batch_size: 32,
            checkpoint_every: 200,
            ..TrainConfig::default()
        },
    )
}

fn run_to(dir: &Path, stop_at: Option<usize>) -> qn_train::Result<qn_train::trainer::RunReport> {
    let (train, test) = small();
    let (plan, cfg) = pause_plan();
    let mut m = noisy_mlp(5);
    run_stages(
        &mut m,
        &train,
        &test,
        &plan,
        &cfg,
        &RunOutput {
            dir: Some(dir.into()),
            stop_at,
            cancel: None,
        },
    )
}

fn small() -> (Dataset, Dataset) {
    let dir = data_dir();
    (
        fashion_mnist(&dir, "train", Some(2_000), &Device::Cpu).unwrap(),
        fashion_mnist(&dir, "t10k", Some(200), &Device::Cpu).unwrap(),
    )
}

/// `stop_at` pauses at any step (not only at a checkpoint multiple), a larger value continues, and
/// a run whose length is not a multiple of the checkpoint interval finishes; each step is logged
/// once, and a finished run rerun does no more work.
#[test]
fn stop_at_pauses_anywhere_and_a_rerun_continues_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_to(dir.path(), Some(5)).unwrap();
    assert!(r.stopped && r.steps == 5);
    // The same pause again: nothing to do.
    let r = run_to(dir.path(), Some(5)).unwrap();
    assert!(r.stopped && r.steps == 5);
    let r = run_to(dir.path(), Some(12)).unwrap();
    assert!(r.stopped && r.steps == 12);
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    let done = run_to(dir.path(), None).unwrap();
    assert!(!done.stopped && done.steps == 13 && done.stage_accuracy.len() == 1);
    // Rerun of the finished run: same report, nothing more logged.
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let again = run_to(dir.path(), None).unwrap();
    assert_eq!(again, done);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap(),
        log
    );
    assert_eq!(log.lines().count(), 14, "13 steps and the stage end");
    // An uninterrupted run reaches the same weights and accuracy.
    let whole = tempfile::tempdir().unwrap();
    assert_eq!(
        run_to(whole.path(), None).unwrap().stage_accuracy,
        done.stage_accuracy
    );
}

#[test]
fn resuming_with_other_settings_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    run_to(dir.path(), Some(3)).unwrap();
    let (train, test) = small();
    let (plan, cfg) = pause_plan();
    let mut m = noisy_mlp(5);
    let out = RunOutput {
        dir: Some(dir.path().into()),
        stop_at: None,
        cancel: None,
    };
    let other = TrainConfig {
        lr: 5e-4,
        ..cfg.clone()
    };
    let err = run_stages(&mut m, &train, &test, &plan, &other, &out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`lr` was 0.001, is now 0.0005") && err.contains("afresh"),
        "{err}"
    );
    let err = run_stages(&mut m, &train, &test, &StagePlan::float(14), &cfg, &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("different plan"), "{err}");
    // Other noise on a layer.
    let mut noisier = noisy_mlp(5);
    noisier.layers()[1]
        .set_noise(
            NoiseConfig::BlockDrop {
                p: 0.2,
                block_size: 4,
            },
            101,
        )
        .unwrap();
    let err = run_stages(&mut noisier, &train, &test, &plan, &cfg, &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("different noise"), "{err}");
    // Where it pauses is not part of the run: a different stop_at resumes.
    let r = run_stages(
        &mut noisy_mlp(5),
        &train,
        &test,
        &plan,
        &cfg,
        &RunOutput {
            dir: Some(dir.path().into()),
            stop_at: Some(7),
            cancel: None,
        },
    )
    .unwrap();
    assert_eq!(r.steps, 7);
}

/// A second run into a directory another run is writing to is refused before it touches anything
/// (the lock is the OS's: here a second open file description in the same process holds it).
#[test]
fn a_directory_in_use_by_another_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lock = std::fs::File::create(dir.path().join(qn_train::trainer::LOCK_FILE)).unwrap();
    lock.lock().unwrap();
    let (train, test) = small();
    let (plan, cfg) = pause_plan();
    let out = RunOutput {
        dir: Some(dir.path().into()),
        stop_at: Some(2),
        cancel: None,
    };
    let err = run_stages(&mut noisy_mlp(5), &train, &test, &plan, &cfg, &out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another run is writing") && err.contains(&dir.path().display().to_string()),
        "{err}"
    );
    assert!(
        !dir.path().join("metrics.jsonl").exists(),
        "nothing written"
    );
    // Once the other run lets go, the directory is usable.
    drop(lock);
    let r = run_stages(&mut noisy_mlp(5), &train, &test, &plan, &cfg, &out).unwrap();
    assert_eq!(r.steps, 2);
}

/// Two micro-batches of 32 per step give the gradient of one batch of 64 when both cover the same
/// examples (here: the whole 64-example set every step), so the runs agree to rounding.
#[test]
fn gradient_accumulation_matches_one_large_batch() {
    let (train, _) = small();
    let idx = candle_core::Tensor::arange(0u32, 64, &Device::Cpu).unwrap();
    let data = train.select(&idx).unwrap();
    let run = |batch: usize, accum: usize| {
        let mut m = Mlp::seeded(784, 32, 10, 4, &Device::Cpu).unwrap();
        let cfg = TrainConfig {
            batch_size: batch,
            grad_accum: accum,
            ..TrainConfig::default()
        };
        run_stages(
            &mut m,
            &data,
            &data,
            &StagePlan::float(3),
            &cfg,
            &RunOutput::default(),
        )
        .unwrap();
        named_vars(&m)
            .into_iter()
            .flat_map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let (one, two) = (run(64, 1), run(32, 2));
    for (i, (a, b)) in one.iter().zip(&two).enumerate() {
        assert!((a - b).abs() < 1e-5, "value {i}: {a} vs {b}");
    }
    assert_ne!(
        one,
        run(32, 1),
        "a smaller batch without accumulation differs"
    );
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
