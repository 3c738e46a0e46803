//! `qn train-mlp` as a user runs it: pause with `--stop-at`, continue, finish; refuse to mix runs.
//! Uses the Fashion-MNIST subset in `assets/`.

use std::path::Path;

use qn_tests::{asset, ok, one_line_error, qn};

fn metric_steps(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["stage_end"].is_null())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn stop_at_then_continue_logs_each_step_once_and_finishes() {
    let data = asset("fashion-mnist-subset");
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let base: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"train-mlp",
        &"--data",
        &data,
        &"-o",
        &run,
        &"--max-steps",
        &"15",
        &"--hidden",
        &"32",
        &"--batch-size",
        &"32",
    ];
    let with = |extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut a = base.clone();
        a.extend_from_slice(extra);
        qn(&a)
    };
    let out = ok(&with(&[&"--stop-at", &"5"]));
    assert!(out.contains("paused at step 5"), "{out}");
    let out = ok(&with(&[&"--stop-at", &"12"]));
    assert!(out.contains("paused at step 12"), "{out}");
    assert_eq!(metric_steps(&run), (1..=12).collect::<Vec<_>>());
    assert!(!run.join("model.qnz").exists());
    // --max-steps is the run's length: 15 is not a multiple of the checkpoint interval (200), and
    // the run still finishes and writes its model.
    let out = ok(&with(&[]));
    assert!(out.contains("trained 15 steps"), "{out}");
    assert!(
        !out.contains("[]"),
        "stage results survive the pauses: {out}"
    );
    assert_eq!(metric_steps(&run), (1..=15).collect::<Vec<_>>());
    let model = std::fs::read(run.join("model.qnz")).unwrap();
    // A rerun of the finished run changes nothing.
    let again = ok(&with(&[]));
    assert_eq!(again, out);
    assert_eq!(std::fs::read(run.join("model.qnz")).unwrap(), model);
    // Other settings on the same directory are refused, naming the field.
    let o = qn(&[
        &"train-mlp",
        &"--data",
        &data,
        &"-o",
        &run,
        &"--max-steps",
        &"15",
        &"--hidden",
        &"32",
        &"--batch-size",
        &"32",
        &"--lr",
        &"0.01",
    ]);
    one_line_error(&o, &["different lr", "afresh"]);
    // `--out` is an alias of `-o`/`--output`.
    let other = dir.path().join("other");
    ok(&qn(&[
        &"train-mlp",
        &"--data",
        &data,
        &"--out",
        &other,
        &"--max-steps",
        &"2",
        &"--hidden",
        &"32",
        &"--noise",
        &"block:p=0.2,bs=4",
    ]));
    assert!(other.join("model.qnz").exists());
}
