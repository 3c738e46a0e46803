//! `qn predict --image` on the shared pretrained EfficientNet-Lite0 and the two photos; bad images.

use qn_tests::{ok, one_line_error, qn, shared};
use serde_json::Value;

#[test]
fn lite0_top5_names_the_cat_and_the_espresso() {
    let (Some(model), Some(images)) = (shared("models/efficientnet-lite0"), shared("data/images"))
    else {
        return;
    };
    let out = qn(&[
        &"predict",
        &"--model",
        &model,
        &"--image",
        &images.join("coffee.png"),
        &"--json",
    ]);
    let j: Value = serde_json::from_str(ok(&out).trim()).unwrap();
    let top5 = j["top5"].as_array().unwrap();
    assert_eq!(top5.len(), 5);
    assert_eq!(top5[0]["label"], 967);
    assert_eq!(top5[0]["name"], "espresso");
    let probs: Vec<f64> = top5.iter().map(|t| t["prob"].as_f64().unwrap()).collect();
    assert!(probs.windows(2).all(|w| w[0] >= w[1]), "sorted: {probs:?}");

    let out = qn(&[
        &"predict",
        &"--model",
        &model,
        &"--image",
        &images.join("chelsea.png"),
    ]);
    let text = ok(&out);
    let first = text.lines().nth(1).unwrap();
    let label: usize = first.split('\t').nth(1).unwrap().parse().unwrap();
    assert!((281..=285).contains(&label), "{text}");
}

#[test]
fn bad_images_and_wrong_variants_are_one_line_errors() {
    let Some(model) = shared("models/efficientnet-lite0") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.png");
    std::fs::write(&garbage, b"not a png at all").unwrap();
    let out = qn(&[&"predict", &"--model", &model, &"--image", &garbage]);
    one_line_error(&out, &["garbage.png", "decode"]);
    let truncated = dir.path().join("truncated.png");
    if let Some(images) = shared("data/images") {
        let bytes = std::fs::read(images.join("coffee.png")).unwrap();
        std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
        let out = qn(&[&"predict", &"--model", &model, &"--image", &truncated]);
        one_line_error(&out, &["truncated.png"]);
    }
    let out = qn(&[
        &"predict",
        &"--model",
        &model,
        &"--image",
        &garbage,
        &"--variant",
        &"b0",
    ]);
    one_line_error(&out, &["_se_reduce", "b0"]);
    let out = qn(&[
        &"predict",
        &"--model",
        &model,
        &"--image",
        &garbage,
        &"--image-size",
        &"0",
    ]);
    one_line_error(&out, &["--image-size"]);
    let out = qn(&[&"predict", &"--model", &dir.path(), &"--image", &garbage]);
    one_line_error(&out, &["model.safetensors"]);
}
