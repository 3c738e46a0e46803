//! `qn compress` (iPQ) as a user runs it on the tiny RoBERTa of `assets/`: distillation from the
//! uncompressed model (rows without labels accepted then, refused without it), a teacher whose
//! labels differ refused, held-out stage checks reported beside the uncompressed model's accuracy,
//! activation-aware codebooks on by default, and a compression killed with SIGKILL mid-stage
//! resuming to the very file an uninterrupted run writes.

use std::path::{Path, PathBuf};
use std::process::Output;

use qn_tests::{asset, ok, qn};

fn args_of(extra: &[&str], train: &Path, out: &Path) -> Vec<String> {
    let mut a: Vec<String> = [
        "compress",
        "--model",
        asset("tiny-roberta").to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--task",
        "sst2",
        "--batch-size",
        "8",
        "--max-len",
        "32",
        "--threads",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn compress(extra: &[&str], train: &Path, out: &Path) -> Output {
    let a = args_of(extra, train, out);
    qn(&a
        .iter()
        .map(|s| s as &dyn AsRef<std::ffi::OsStr>)
        .collect::<Vec<_>>())
}

/// The SST-2 slice with its label column (and header's) cut off.
fn unlabelled(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(asset("text/sst2-train-200.tsv")).unwrap();
    let body: String = text
        .lines()
        .map(|l| format!("{}\n", l.split('\t').next().unwrap()))
        .collect();
    let p = dir.join("unlabelled.tsv");
    std::fs::write(&p, body).unwrap();
    p
}

fn last_error(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err.trim().lines().last().unwrap().to_string()
}

#[test]
fn distillation_needs_no_labels_and_the_checks_are_held_out() {
    let tmp = tempfile::tempdir().unwrap();
    let train = unlabelled(tmp.path());
    let f = tmp.path().join("kd.qnz");
    let out = compress(&["--steps", "2"], &train, &f);
    let stdout = ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("200 of 200 rows") && err.contains("have no label"),
        "{err}"
    );
    assert!(
        err.contains("distilling from the uncompressed model"),
        "{err}"
    );
    // A tenth of the rows, drawn with the seed, is held out of every stage.
    assert!(
        err.contains("the stage checks use 20 held-out training rows"),
        "{err}"
    );
    assert!(
        stdout.contains("on 20 held-out training rows") && stdout.contains("% uncompressed"),
        "{stdout}"
    );
    assert!(f.is_file());

    // The labels alone cannot train on rows that have none: refused before any work, no file.
    let g = tmp.path().join("labels.qnz");
    let e = last_error(&compress(
        &["--steps", "2", "--distill", "none"],
        &train,
        &g,
    ));
    assert!(e.contains("line 1") && e.contains("field"), "{e}");
    assert!(!g.exists());

    // Held out more rows than there are: refused, naming the flag.
    let e = last_error(&compress(
        &["--steps", "2", "--check-rows", "200"],
        &asset("text/sst2-train-200.tsv"),
        &g,
    ));
    assert!(e.contains("--check-rows 200"), "{e}");
    assert!(
        !tmp.path().join("labels.qnz.work").exists(),
        "a refused compression leaves no work directory"
    );
    for (flag, bad) in [("--distill-alpha", "1.5"), ("--temperature", "0")] {
        let out = compress(
            &["--steps", "2", flag, bad],
            &asset("text/sst2-train-200.tsv"),
            &g,
        );
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(flag) || err.contains(&flag[2..].replace('-', " ")),
            "{flag}: {err}"
        );
        assert!(!g.exists());
    }
}

#[test]
fn a_teacher_with_other_labels_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A fine-tune on SST-2 has two labels; the tiny RoBERTa's head has three.
    let run = tmp.path().join("run");
    ok(&qn(&[
        &"finetune",
        &"--model",
        &asset("tiny-roberta"),
        &"--train",
        &asset("text/sst2-train-200.tsv"),
        &"--eval",
        &asset("text/sst2-validation-100.tsv"),
        &"--task",
        &"sst2",
        &"--max-len",
        &"32",
        &"--max-steps",
        &"2",
        &"--batch-size",
        &"8",
        &"-o",
        &run,
    ]));
    let f = tmp.path().join("t.qnz");
    let e = last_error(&compress(
        &["--steps", "2", "--teacher", run.to_str().unwrap()],
        &asset("text/sst2-train-200.tsv"),
        &f,
    ));
    assert!(e.contains("--teacher") && e.contains("labels"), "{e}");
    assert!(!f.exists());
    // A teacher with the student's labels is taken (here the fine-tuned model itself).
    let g = tmp.path().join("u.qnz");
    let out = qn(&[
        &"compress",
        &"--model",
        &run,
        &"--teacher",
        &run,
        &"--train",
        &asset("text/sst2-train-200.tsv"),
        &"--task",
        &"sst2",
        &"--steps",
        &"1",
        &"--batch-size",
        &"8",
        &"--max-len",
        &"32",
        &"-o",
        &g,
    ]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("distilling from `"));
}

/// SIGKILL once a stage has written a mid-stage checkpoint, then the same command: the file is
/// byte-identical to an uninterrupted run's (the teacher logits are read back from the work
/// directory, the calibration of the stages not yet begun runs on the restored model).
#[cfg(unix)]
#[test]
fn a_compression_killed_mid_stage_resumes_to_the_same_file() {
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let train = asset("text/sst2-train-200.tsv");
    let steps = ["--steps", "400"];
    let whole = tmp.path().join("whole.qnz");
    ok(&compress(&steps, &train, &whole));
    for stage in [0u64, 1] {
        let f = tmp.path().join(format!("killed{stage}.qnz"));
        let work = tmp.path().join(format!("killed{stage}.work"));
        let mut extra = steps.to_vec();
        extra.extend(["--work-dir", work.to_str().unwrap()]);
        let a = args_of(&extra, &train, &f);
        let mut child = Command::new(qn_tests::qn_bin())
            .args(&a)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        // The checkpoint interval is 50 steps: wait for one taken inside the stage.
        loop {
            let latest = std::fs::read(work.join("latest.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
            if let Some(l) = latest {
                if l["stage"].as_u64() == Some(stage) && l["step_in_stage"].as_u64() > Some(0) {
                    break;
                }
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before a checkpoint of stage {stage}"
            );
            assert!(started.elapsed().as_secs() < 300, "no checkpoint");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!f.exists());
        ok(&compress(&extra, &train, &f));
        assert_eq!(
            std::fs::read(&f).unwrap(),
            std::fs::read(&whole).unwrap(),
            "killed in stage {stage}: the resumed file differs from the uninterrupted one"
        );
    }
}

/// The plan file the README and BENCHMARKS name parses and runs: the word embedding in blocks of
/// 16, the FFN in blocks of 4 (the stage log names the block sizes the file then holds).
#[test]
fn the_documented_emb16_ffn4_plan_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = qn_tests::root().join("docs/runs/minilm-ipq-emb16-ffn4.toml");
    let f = tmp.path().join("p.qnz");
    ok(&compress(
        &["--steps", "1", "--plan", plan.to_str().unwrap()],
        &asset("text/sst2-train-200.tsv"),
        &f,
    ));
    let j: serde_json::Value =
        serde_json::from_str(&ok(&qn(&[&"inspect", &f, &"--json"]))).unwrap();
    let method = |name: &str| -> String {
        let t = j["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {j}"));
        t["method"].as_str().unwrap().to_string()
    };
    for (name, want) in [
        ("roberta.embeddings.word_embeddings.weight", "pq d=16 K=256"),
        (
            "roberta.encoder.layer.0.intermediate.dense.weight",
            "pq d=4 K=256",
        ),
        (
            "roberta.encoder.layer.0.attention.self.query.weight",
            "pq d=4 K=256",
        ),
    ] {
        let m = method(name);
        assert!(m.starts_with(want), "{name}: {m}");
    }
}

/// `--target-size` lands the file within 1 % under the size asked, stores the plan it chose in
/// the header, and that plan given back as `--plan` writes a file of the same size; a size no plan
/// reaches is a one-line error naming the smallest one; a rerun reads the plan back.
#[test]
fn a_target_size_is_hit_within_one_percent_and_its_plan_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let train = asset("text/sst2-train-200.tsv");
    let budget = ["--budget-centroids", "16,32,64,128,256", "--steps", "1"];
    for target in [26_000u64, 36_000] {
        let f = tmp.path().join(format!("t{target}.qnz"));
        let work = tmp.path().join(format!("w{target}"));
        let t = target.to_string();
        let mut extra = budget.to_vec();
        extra.extend(["--target-size", &t, "--work-dir", work.to_str().unwrap()]);
        let out = compress(&extra, &train, &f);
        ok(&out);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            err.contains(&format!("bit budget: {target} bytes asked")),
            "{err}"
        );
        let bytes = std::fs::metadata(&f).unwrap().len();
        assert!(
            bytes <= target && bytes as f64 >= 0.99 * target as f64,
            "{bytes} bytes for a target of {target}"
        );
        // The same command again: the plan is read back from the work directory.
        let again = tmp.path().join(format!("again{target}.qnz"));
        let out = compress(&extra, &train, &again);
        ok(&out);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains("the plan chosen before, read from"), "{err}");
        assert_eq!(std::fs::metadata(&again).unwrap().len(), bytes);
        // The stored plan, given back, makes the same file.
        let j: serde_json::Value =
            serde_json::from_str(&ok(&qn(&[&"inspect", &f, &"--json"]))).unwrap();
        let plan = j["metadata"]["stage_plan"].as_str().unwrap();
        assert!(plan.contains("[[stage.override]]"), "{plan}");
        let plan_file = tmp.path().join(format!("plan{target}.toml"));
        std::fs::write(&plan_file, plan).unwrap();
        let g = tmp.path().join(format!("p{target}.qnz"));
        ok(&compress(
            &["--steps", "1", "--plan", plan_file.to_str().unwrap()],
            &train,
            &g,
        ));
        assert_eq!(std::fs::metadata(&g).unwrap().len(), bytes);
    }
    let e = last_error(&compress(
        &["--target-size", "2kB", "--steps", "1"],
        &train,
        &tmp.path().join("small.qnz"),
    ));
    assert!(
        e.contains("2000 bytes is below the smallest file the candidates give"),
        "{e}"
    );
    assert!(!tmp.path().join("small.qnz").exists());
    let out = compress(
        &["--target-size", "4 parsecs"],
        &train,
        &tmp.path().join("x.qnz"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a size unit"), "{err}");
}

/// `--distill hidden` trains on the teacher's hidden states too: it runs and writes a file that
/// differs from the logits-only one; a bad weight is refused.
#[test]
fn hidden_state_distillation_runs_and_changes_the_result() {
    let tmp = tempfile::tempdir().unwrap();
    let train = asset("text/sst2-train-200.tsv");
    let (h, l) = (tmp.path().join("h.qnz"), tmp.path().join("l.qnz"));
    let out = compress(
        &["--steps", "3", "--distill", "hidden", "--lr", "1e-2"],
        &train,
        &h,
    );
    ok(&out);
    ok(&compress(&["--steps", "3", "--lr", "1e-2"], &train, &l));
    let decoded = |f: &Path| -> Vec<u8> {
        let r = qn_format::Reader::open(f).unwrap();
        let name = "roberta.encoder.layer.0.attention.self.query.weight";
        r.tensor(name).unwrap().record.to_vec()
    };
    assert_ne!(decoded(&h), decoded(&l), "the hidden term changed nothing");
    let out = compress(
        &[
            "--steps",
            "1",
            "--distill",
            "hidden",
            "--hidden-weight",
            "-1",
        ],
        &train,
        &tmp.path().join("bad.qnz"),
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("--hidden-weight"),
        "{e}"
    );
}
