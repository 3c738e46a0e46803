//! The `qn` binary as a user runs it.

use std::process::Command;

fn qn() -> Command {
    Command::new(qn_tests::qn_bin())
}

#[test]
fn demo_prints_a_rate_distortion_table_for_the_shipped_layer() {
    let out = qn().arg("demo").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for method in ["int8 per-channel", "int4 per-channel", "PQ d=8 K=256"] {
        assert!(text.contains(method), "missing {method}:\n{text}");
    }
    // The PQ d=8 K=256 row of the FFN weight: about 1 bit per weight and a relative MSE in the
    // Gaussian-like range (real weights are close to Gaussian: between Shannon and Lloyd-Max).
    let row = text
        .lines()
        .find(|l| l.contains("intermediate.dense.weight") && l.contains("PQ d=8 K=256"))
        .expect("FFN PQ row");
    let cols: Vec<f64> = row
        .split_whitespace()
        .rev()
        .take(3)
        .map(|c| c.parse().unwrap())
        .collect();
    let (rel_mse, bits) = (cols[1], cols[2]);
    assert!((1.0..1.1).contains(&bits), "{row}");
    assert!(rel_mse > 0.25 && rel_mse < 0.363, "{row}");
}

#[test]
fn demo_on_a_missing_file_is_a_one_line_error() {
    let out = qn()
        .args(["demo", "--weights", "/nonexistent/w.safetensors"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("/nonexistent/w.safetensors"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn demo_on_a_file_that_is_not_safetensors_is_an_error() {
    let dir = std::env::temp_dir().join(format!("qn-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, b"this is not a safetensors file").unwrap();
    let out = qn()
        .arg("demo")
        .arg("--weights")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.safetensors"));
    std::fs::remove_dir_all(&dir).unwrap();
}
