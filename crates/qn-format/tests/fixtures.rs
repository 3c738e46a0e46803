//! Every fixture of every format version still decodes to the values recorded when it was made.

use std::path::Path;

use qn_format::Reader;

#[test]
fn every_version_fixture_decodes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut checked = 0;
    for version in std::fs::read_dir(&root).unwrap() {
        let dir = version.unwrap().path();
        for file in std::fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            if path.extension().is_some_and(|e| e == "qnz") {
                let expect: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
                    &std::fs::read_to_string(path.with_extension("json")).unwrap(),
                )
                .unwrap();
                let r = Reader::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(r.tensors().len(), expect.len(), "{}", path.display());
                for v in r.views() {
                    let want: Vec<f32> =
                        serde_json::from_value(expect[&v.entry.name].clone()).unwrap();
                    assert_eq!(
                        v.decode_f32().unwrap(),
                        want,
                        "{}: {}",
                        path.display(),
                        v.entry.name
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 1, "no fixture found under {}", root.display());
    // The current version's fixture exercises every encoding, rANS-coded assignments included.
    let current = root.join(format!("v{}/all-encodings.qnz", qn_format::FORMAT_VERSION));
    let r = Reader::open(&current).unwrap();
    assert!(r.views().any(|v| matches!(
        v.entry.encoding,
        qn_format::Encoding::Pq {
            rans_words: Some(_),
            ..
        }
    )));
    assert!(r
        .views()
        .any(|v| matches!(v.entry.encoding, qn_format::Encoding::Scalar { .. })));
}
