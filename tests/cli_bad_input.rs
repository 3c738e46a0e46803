//! Every subcommand fed zeros, negatives, NaN, huge values, block and group sizes that do not
//! divide, malformed files and TOML: each gives a one-line error naming what is wrong, with exit 1
//! or 2 — never a panic (exit 101) — and leaves no output behind. Training arguments are checked
//! before any data is read.

use std::path::Path;
use std::process::Output;

use qn_tests::{asset, qn};

/// Exit 1 or 2 with a non-empty message naming every needle; a runtime error (exit 1) is one line.
fn refused(out: &Output, what: &str, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let code = out.status.code();
    assert!(
        matches!(code, Some(1) | Some(2)),
        "{what}: exit {code:?} (101 is a panic): {err}"
    );
    assert!(!err.trim().is_empty(), "{what}: no message");
    if code == Some(1) {
        assert_eq!(err.trim().lines().count(), 1, "{what}: not one line: {err}");
        // One context per level: no message repeats itself.
        let line = err.trim();
        for part in line.split(": ").filter(|p| p.len() > 12) {
            assert_eq!(
                line.matches(part).count(),
                1,
                "{what}: `{part}` repeated in: {line}"
            );
        }
    }
    for n in needles {
        assert!(
            err.to_lowercase().contains(&n.to_lowercase()),
            "{what}: `{n}` missing from: {err}"
        );
    }
    err
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn nothing_written(dir: &Path, keep: &[&str]) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn quantize_refuses_bad_numbers_sizes_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = asset("minilm-l6-layer0.safetensors").display().to_string();
    let out = d.join("out.qnz").display().to_string();
    let bad_rules = [
        (
            "zero-k.toml",
            "[[rule]]\nmatch = 'dense'\nmethod = 'pq'\ncentroids = 0\n",
            "centroids",
        ),
        (
            "zero-bs.toml",
            "[[rule]]\nmatch = 'dense'\nmethod = 'pq'\nblock_size = 0\n",
            "block_size",
        ),
        (
            "regex.toml",
            "[[rule]]\nmatch = '('\nmethod = 'pq'\n",
            "regex",
        ),
        ("field.toml", "[[rule]]\nmatch = 'x'\nbits = 3\n", "bits"),
        (
            "group.toml",
            "[[rule]]\nmatch = 'x'\nmethod = 'int4'\ngranularity = 'group:0'\n",
            "group",
        ),
        ("garbage.toml", "this is not toml ][", "garbage.toml"),
    ];
    for (name, text, needle) in bad_rules {
        let rules = write(d, name, text);
        let o = qn(&[
            &"quantize",
            &input,
            &"-o",
            &out,
            &"--method",
            &"int8",
            &"--rules",
            &rules,
        ]);
        refused(&o, name, &[needle]);
    }
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--method", "pq", "--block-size", "0"], "block-size"),
        (vec!["--method", "pq", "--block-size", "-1"], "block-size"),
        (
            vec!["--method", "pq", "--block-size", "99999999999999999999999"],
            "block-size",
        ),
        (vec!["--method", "pq", "--centroids", "0"], "centroids"),
        (vec!["--method", "pq", "--centroids", "70000"], "centroids"),
        (vec!["--method", "pq", "--iters", "0"], "iters"),
        (vec!["--method", "pq", "--max-points", "0"], "max-points"),
        (
            vec!["--method", "int4", "--granularity", "group:0"],
            "granularity",
        ),
        (
            vec!["--method", "int4", "--granularity", "group:-3"],
            "granularity",
        ),
        (
            vec!["--method", "int4", "--granularity", "nonsense"],
            "granularity",
        ),
        (vec!["--method", "int9"], "int9"),
        (vec!["--method", "NaN"], "method"),
        (vec!["--method", "int8", "--include", "("], "include"),
        // Runtime: a block size that does not divide a tensor's rows, an axis out of range.
        (vec!["--method", "pq", "--block-size", "7"], "block size 7"),
        (
            vec!["--method", "int4", "--granularity", "channel:9"],
            "axis 9",
        ),
        (
            vec!["--method", "int4", "--granularity", "group:7"],
            "group size 7",
        ),
    ];
    for (args, needle) in cases {
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"quantize", &input, &"-o", &out];
        all.extend(args.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
        refused(&qn(&all), &format!("{args:?}"), &[needle]);
    }
    // Files that are not what they should be.
    let empty = write(d, "empty.safetensors", "");
    let junk = write(d, "junk.safetensors", "\u{1}\u{2}not safetensors at all");
    for (file, needle) in [
        (empty.as_str(), "empty.safetensors"),
        (junk.as_str(), "junk.safetensors"),
        (
            "/nonexistent/model.safetensors",
            "/nonexistent/model.safetensors",
        ),
        (d.to_str().unwrap(), d.to_str().unwrap()),
    ] {
        let o = qn(&[&"quantize", &file, &"-o", &out, &"--method", &"int8"]);
        refused(&o, file, &[needle]);
    }
    // An output whose directory cannot exist (its parent is a file).
    let blocked = format!("{empty}/out.qnz");
    let o = qn(&[&"quantize", &input, &"-o", &blocked, &"--method", &"int8"]);
    refused(&o, "output under a file", &[&blocked]);
    nothing_written(
        d,
        &[
            "zero-k.toml",
            "zero-bs.toml",
            "regex.toml",
            "field.toml",
            "group.toml",
            "garbage.toml",
            "empty.safetensors",
            "junk.safetensors",
        ],
    );
}

#[test]
fn inspect_and_decompress_refuse_what_is_not_a_qnz() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let empty = write(d, "empty.qnz", "");
    let junk = write(d, "junk.qnz", "QNZ\0 but nothing else of a file");
    let out = d.join("out.safetensors").display().to_string();
    for file in [
        empty.as_str(),
        junk.as_str(),
        "/nonexistent.qnz",
        d.to_str().unwrap(),
    ] {
        refused(&qn(&[&"inspect", &file]), file, &[file]);
        refused(&qn(&[&"inspect", &file, &"--json"]), file, &[file]);
        refused(&qn(&[&"decompress", &file, &"-o", &out]), file, &[file]);
    }
    // Another format's bytes: named once, with what the file starts with, by every command that
    // reads a .qnz (eval and predict go through the model loader, which adds its own context).
    let zip = write(d, "model.qnz", "PK\u{3}\u{4} a zip archive, not a model");
    let needles = [
        zip.as_str(),
        r#"starts with b"PK\x03\x04""#,
        "not a .qnz file",
    ];
    refused(&qn(&[&"inspect", &zip]), "zip", &needles);
    refused(
        &qn(&[&"predict", &"--model", &zip, &"--text", &"fine"]),
        "zip to predict",
        &needles,
    );
    refused(
        &qn(&[
            &"eval",
            &"--model",
            &zip,
            &"--data",
            &asset("text/sst2-validation-100.tsv"),
            &"--task",
            &"sst2",
        ]),
        "zip to eval",
        &needles,
    );
    nothing_written(d, &["empty.qnz", "junk.qnz", "model.qnz"]);
}

#[test]
fn train_mlp_checks_every_argument_before_reading_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = d.join("run").display().to_string();
    let plans = [
        ("steps0.toml", "[[stage]]\nname = 'a'\nsteps = 0\n", "steps"),
        (
            "epochs.toml",
            "[[stage]]\nname = 'a'\nepochs = -1.0\n",
            "epochs",
        ),
        (
            "nan.toml",
            "[[stage]]\nname = 'a'\nepochs = nan\n",
            "epochs",
        ),
        (
            "k0.toml",
            "[[stage]]\nname = 'a'\nsteps = 3\nlayers = 'fc1'\ncentroids = 0\n",
            "centroids",
        ),
        (
            "bs0.toml",
            "[[stage]]\nname = 'a'\nsteps = 3\nlayers = 'fc1'\nblock_size = 0\n",
            "block_size",
        ),
        (
            "regex.toml",
            "[[stage]]\nname = 'a'\nsteps = 3\nlayers = '('\n",
            "layers",
        ),
        ("none.toml", "", "stage"),
        (
            "unknown.toml",
            "[[stage]]\nname = 'a'\nsteps = 3\nlearning_rate = 1\n",
            "learning_rate",
        ),
    ];
    let mut cases: Vec<(Vec<String>, String)> = plans
        .iter()
        .map(|(n, t, needle)| (vec!["--plan".into(), write(d, n, t)], needle.to_string()))
        .collect();
    for (args, needle) in [
        (vec!["--batch-size", "0"], "batch-size"),
        (vec!["--batch-size", "-3"], "batch-size"),
        (vec!["--batch-size", "1e99"], "batch-size"),
        (vec!["--lr", "0"], "lr"),
        (vec!["--lr", "NaN"], "lr"),
        (vec!["--lr", "inf"], "lr"),
        (vec!["--lr", "-1"], "lr"),
        (vec!["--lr", "1e9"], "lr"),
        (vec!["--epochs", "0"], "epochs"),
        (vec!["--epochs", "NaN"], "epochs"),
        (vec!["--max-steps", "0"], "max-steps"),
        (vec!["--stop-at", "0"], "stop-at"),
        (vec!["--hidden", "0"], "hidden"),
        (vec!["--noise", "1.5"], "1.5"),
        (vec!["--noise", "NaN"], "noise"),
        (vec!["--noise", "-0.1"], "noise"),
        (vec!["--noise", "block:p=2"], "p = 2"),
        (vec!["--noise", "block:p=0.1,bs=0"], "bs"),
        (vec!["--noise", "block:p=0.1,bs=7"], "fc2"),
        (vec!["--noise", "pq:p=0.1,k=0"], "k"),
        (vec!["--noise", "scalar:bits=9,p=0.5"], "bits"),
        (vec!["--noise", "scalar:p=0.5"], "bits"),
        (vec!["--noise", "gaussian:p=0.1"], "gaussian"),
        (vec!["--noise", "block:p=0.1,colour=red"], "colour"),
        (
            vec!["--plan", "/nonexistent/plan.toml"],
            "/nonexistent/plan.toml",
        ),
        (vec!["--plan", "x.toml", "--max-steps", "3"], "max-steps"),
    ] {
        cases.push((
            args.iter().map(|s| s.to_string()).collect(),
            needle.to_string(),
        ));
    }
    for (args, needle) in cases {
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"train-mlp", &"--data", &"/nonexistent-data", &"-o", &run];
        all.extend(args.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
        let err = refused(&qn(&all), &format!("{args:?}"), &[&needle]);
        assert!(
            !err.contains("/nonexistent-data"),
            "{args:?}: the data was looked at before the arguments were checked: {err}"
        );
    }
    // The data itself: a missing directory, a directory without IDX files.
    let o = qn(&[&"train-mlp", &"--data", &"/nonexistent-data", &"-o", &run]);
    refused(&o, "missing data", &["/nonexistent-data", "file"]);
    let o = qn(&[
        &"train-mlp",
        &"--data",
        &d,
        &"-o",
        &run,
        &"--max-steps",
        &"2",
    ]);
    refused(&o, "no IDX files", &["file"]);
    assert!(!Path::new(&run).join("model.qnz").exists());
}

#[test]
fn demo_refuses_bad_weights() {
    let dir = tempfile::tempdir().unwrap();
    let junk = write(dir.path(), "junk.safetensors", "nope");
    refused(
        &qn(&[&"demo", &"--weights", &junk]),
        "junk",
        &["junk.safetensors"],
    );
    refused(
        &qn(&[&"demo", &"--weights", &"/nonexistent.safetensors"]),
        "missing",
        &["/nonexistent.safetensors"],
    );
}

/// `QN_SIMD` (the instruction-set cap of the fused kernels) takes `baseline`, `avx2` or `avx512`;
/// anything else is refused up front by every command rather than silently ignored, and a valid cap
/// runs the command.
#[test]
fn an_unknown_qn_simd_value_is_refused() {
    let run = |v: &str| {
        std::process::Command::new(qn_tests::qn_bin())
            .args(["inspect", "/nonexistent.qnz"])
            .env("QN_SIMD", v)
            .output()
            .unwrap()
    };
    for bad in ["avx1024", "", "AVX2"] {
        let err = refused(&run(bad), bad, &["QN_SIMD", "baseline, avx2, avx512"]);
        assert!(err.contains(&format!("`{bad}`")), "{err}");
    }
    // A valid cap reaches the command, which then names its own problem (the missing file).
    refused(&run("baseline"), "baseline", &["/nonexistent.qnz"]);
}
