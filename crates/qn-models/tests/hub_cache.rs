//! The hub cache rules against a hand-made cache directory (one test: the environment is
//! process-wide).

use std::path::Path;

use qn_models::hub::{cache_dir, resolve, ModelRef};

fn snapshot(root: &Path, id: &str, rev: &str, commit: &str, files: &[&str]) {
    let repo = root.join(format!("models--{}", id.replace('/', "--")));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join(rev), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny-roberta");
    for f in files {
        let src = tiny.join(f);
        if src.exists() {
            std::fs::copy(src, snap.join(f)).unwrap();
        } else {
            std::fs::write(snap.join(f), b"x").unwrap();
        }
    }
}

#[test]
fn cache_rules_offline_revisions_and_misses() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let main = "a".repeat(40);
    let v1 = "b".repeat(40);
    snapshot(
        &cache,
        "org/tiny",
        "main",
        &main,
        &["config.json", "model.safetensors", "tokenizer.json"],
    );
    snapshot(
        &cache,
        "org/tiny",
        "v1",
        &v1,
        &["config.json", "model.safetensors"],
    );
    snapshot(
        &cache,
        "org/torch-only",
        "main",
        &main,
        &["config.json", "pytorch_model.bin"],
    );

    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HOME", tmp.path().join("elsewhere"));
    assert_eq!(cache_dir(), cache, "HF_HUB_CACHE comes first");

    let f = resolve(&ModelRef::parse("org/tiny"), None).unwrap();
    assert!(f
        .weights
        .starts_with(cache.join("models--org--tiny/snapshots").join(&main)));
    assert!(f.tokenizer.is_some());
    // Optional files absent from the snapshot are skipped, not errors.
    assert!(f.pooling.is_none() && f.modules.is_none());

    let f = resolve(&ModelRef::parse("org/tiny"), Some("v1")).unwrap();
    assert!(f.config.to_str().unwrap().contains(&v1));
    assert!(f.tokenizer.is_none(), "revision v1 has no tokenizer");
    // A commit hash is a revision too.
    assert!(resolve(&ModelRef::parse("org/tiny"), Some(&main)).is_ok());

    let e = resolve(&ModelRef::parse("org/missing"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("org/missing")
            && e.contains(cache.to_str().unwrap())
            && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    let e = resolve(&ModelRef::parse("org/tiny"), Some("v2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("revision v2"), "{e}");
    let e = resolve(&ModelRef::parse("org/torch-only"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pytorch_model.bin") && e.contains("safe_serialization"),
        "{e}"
    );
    let e = resolve(&ModelRef::parse("not a valid id!"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("neither a directory nor a hub id"), "{e}");

    // Without HF_HUB_CACHE: $HF_HOME/hub.
    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_HOME", tmp.path());
    std::fs::rename(&cache, tmp.path().join("hub")).unwrap();
    assert_eq!(cache_dir(), tmp.path().join("hub"));
    assert!(resolve(&ModelRef::parse("org/tiny"), None).is_ok());
    // Without either: ~/.cache/huggingface/hub.
    std::env::remove_var("HF_HOME");
    std::env::set_var("HOME", tmp.path());
    assert_eq!(cache_dir(), tmp.path().join(".cache/huggingface/hub"));
}
