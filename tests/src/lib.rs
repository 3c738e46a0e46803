//! Helpers of the end-to-end tests: the `qn` binary (built on first use, in the profile the tests
//! run in), the assets, and the shared data directory.
//!
//! ```no_run
//! let out = qn_tests::qn(&[&"inspect", &"model.qnz"]);
//! assert!(out.status.success());
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// A file of `assets/`.
pub fn asset(name: &str) -> PathBuf {
    root().join("assets").join(name)
}

/// The path of the `qn` binary beside this test executable, built once if it is missing or stale.
/// (A package's tests can only ask Cargo for its own binaries; these tests live in their own
/// package, so they build `qn-cli` with the same profile and target directory.)
pub fn qn_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe.parent().and_then(Path::parent).expect("target layout");
        let target_dir = profile_dir.parent().expect("target layout");
        let profile = profile_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root())
            .args([
                "build",
                "--quiet",
                "-p",
                "qn-cli",
                "--bin",
                "qn",
                "--target-dir",
            ])
            .arg(target_dir);
        if profile == "release" {
            cmd.arg("--release");
        } else if profile != "debug" {
            cmd.args(["--profile", &profile]);
        }
        let status = cmd.status().expect("cargo runs");
        assert!(status.success(), "building qn failed: {status}");
        profile_dir.join(format!("qn{}", std::env::consts::EXE_SUFFIX))
    })
}

/// Runs `qn` with `args`.
pub fn qn(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(qn_bin());
    for a in args {
        c.arg(a);
    }
    c.output().expect("qn runs")
}

/// stdout of a successful run (panics with stderr otherwise).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}

/// Exit code 1, one line on stderr containing every `needle`.
pub fn one_line_error(out: &Output, needles: &[&str]) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` missing from: {err}");
    }
}

/// The shared data directory (`QN_DATA_DIR`) when it holds `rel`, else `None` after saying why.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let Some(dir) = std::env::var_os("QN_DATA_DIR") else {
        eprintln!("skipped: QN_DATA_DIR is not set (point it at the shared data directory)");
        return None;
    };
    let p = Path::new(&dir).join(rel);
    if !p.exists() {
        eprintln!("skipped: {} does not exist", p.display());
        return None;
    }
    Some(p)
}
