//! `qn train-mlp` as a user runs it: pause with `--stop-at`, continue, finish; interrupt with Ctrl-C
//! and rerun; refuse to mix runs.
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

/// Starts `qn train-mlp` with `args`, waits until `run`'s metrics log more than `after` steps, then
/// sends SIGINT `signals` times back to back; returns the exit code and stderr.
#[cfg(unix)]
fn interrupt_after(
    args: &[std::ffi::OsString],
    run: &Path,
    after: usize,
    signals: usize,
) -> (Option<i32>, String) {
    use std::process::{Command, Stdio};
    let child = Command::new(qn_tests::qn_bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    // Counted leniently: the last line may be half-written while the run appends it.
    let logged = || {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.ends_with('}') && l.contains("\"loss\""))
            .count()
    };
    while logged() <= after {
        assert!(
            started.elapsed().as_secs() < 120,
            "no step {} logged",
            after + 1
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    for _ in 0..signals {
        let sent = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Ctrl-C as a user presses it: the run finishes its step, writes a checkpoint and exits 130 with a
/// line saying how to continue; pressed twice, it exits at once. Rerunning the same command
/// finishes with the same model as an uninterrupted run, each step logged once.
#[cfg(unix)]
#[test]
fn an_interrupted_run_checkpoints_exits_130_and_resumes_to_the_same_model() {
    let data = asset("fashion-mnist-subset");
    let dir = tempfile::tempdir().unwrap();
    let args = |run: &Path| -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = [
            "train-mlp",
            "--max-steps",
            "300",
            "--hidden",
            "256",
            "--batch-size",
            "256",
            "--noise",
            "block:p=0.1,bs=4",
            "--data",
        ]
        .iter()
        .map(Into::into)
        .collect();
        a.extend([data.clone().into(), "-o".into(), run.into()]);
        a
    };
    let whole = dir.path().join("whole");
    let done = ok(&qn(&args(&whole)
        .iter()
        .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
        .collect::<Vec<_>>()));
    assert!(done.contains("trained 300 steps"), "{done}");

    let run = dir.path().join("run");
    let (code, err) = interrupt_after(&args(&run), &run, 0, 1);
    assert_eq!(code, Some(130), "{err}");
    let last = err.trim().lines().last().unwrap().to_string();
    assert!(
        last.starts_with("qn: interrupted after step ") && last.contains("rerun the same command"),
        "{err}"
    );
    let step: u64 = last["qn: interrupted after step ".len()..]
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The checkpoint interval is 200: only the interrupt wrote this checkpoint.
    assert!((1..200).contains(&step), "{err}");
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("latest.json")).unwrap()).unwrap();
    assert_eq!(latest["global_step"].as_u64(), Some(step));
    assert_eq!(metric_steps(&run), (1..=step).collect::<Vec<_>>());
    assert!(!run.join("model.qnz").exists());

    // Twice: out at once, with 130 too; what is on disk still resumes.
    let (code, err) = interrupt_after(&args(&run), &run, step as usize + 1, 2);
    assert_eq!(code, Some(130), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let again = ok(&qn(&args(&run)
        .iter()
        .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
        .collect::<Vec<_>>()));
    assert!(again.contains("trained 300 steps"), "{again}");
    assert_eq!(metric_steps(&run), (1..=300).collect::<Vec<_>>());
    assert_eq!(
        std::fs::read(run.join("model.qnz")).unwrap(),
        std::fs::read(whole.join("model.qnz")).unwrap(),
        "the resumed model differs from the uninterrupted one"
    );
}
