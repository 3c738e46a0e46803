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

#[test]
fn lite0_fine_tunes_on_fashion_mnist_pauses_resumes_and_evaluates_what_it_wrote() {
    let Some(model) = shared("models/efficientnet-lite0") else {
        return;
    };
    let data = qn_tests::asset("fashion-mnist-subset");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let finetune = |extra: &[&str]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"finetune",
            &"--model",
            &model,
            &"--task",
            &"idx",
            &"--train",
            &data,
            &"--eval",
            &data,
            &"--image-size",
            &"16",
            &"--max-steps",
            &"4",
            &"--batch-size",
            &"8",
            &"--max-examples",
            &"64",
            &"--noise",
            &"block:p=0.1",
            &"-o",
            &out,
        ];
        for e in extra {
            args.push(e);
        }
        qn(&args)
    };
    let paused = ok(&finetune(&["--stop-at", "2"]));
    assert!(paused.contains("paused at step 2"), "{paused}");
    assert!(
        !out.join("model.safetensors").exists(),
        "a paused run writes no model"
    );
    let done = ok(&finetune(&[]));
    assert!(
        done.contains("fine-tuned EfficientNet-lite0 4 steps"),
        "{done}"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            // Training records carry the loss; the final evaluation record has the step too.
            v.get("loss")?;
            v["step"].as_u64()
        })
        .collect();
    assert_eq!(
        steps,
        vec![1, 2, 3, 4],
        "each step logged once across the pause"
    );
    // The accuracy the trainer reported is what `qn eval` measures on the file it wrote (the
    // running statistics travel with it).
    let reported: f64 = done
        .split("eval accuracy ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    let j: Value = serde_json::from_str(
        ok(&qn(&[
            &"eval",
            &"--model",
            &out,
            &"--task",
            &"idx",
            &"--data",
            &data,
            &"--image-size",
            &"16",
            &"--json",
        ]))
        .trim(),
    )
    .unwrap();
    assert!(
        (j["accuracy"].as_f64().unwrap() * 100.0 - reported).abs() < 0.01,
        "{j} vs {reported}"
    );
    assert_eq!(j["examples"], 1000);

    // Degenerate input: one-line errors, nothing written.
    let bad = qn(&[
        &"finetune",
        &"--model",
        &model,
        &"--task",
        &"idx",
        &"--train",
        &dir.path(),
        &"--eval",
        &data,
        &"-o",
        &dir.path().join("x"),
    ]);
    one_line_error(&bad, &["train-images-idx3-ubyte.gz"]);
    assert!(!dir.path().join("x").join("model.safetensors").exists());
}

#[test]
fn image_models_compress_to_self_contained_qnz_files_that_eval_reads_alone() {
    let Some(model) = shared("models/efficientnet-lite0") else {
        return;
    };
    let data = qn_tests::asset("fashion-mnist-subset");
    let dir = tempfile::tempdir().unwrap();
    // A 10-class model to compress: two steps of fine-tuning at 16 px.
    let tuned = dir.path().join("tuned");
    ok(&qn(&[
        &"finetune",
        &"--model",
        &model,
        &"--task",
        &"idx",
        &"--train",
        &data,
        &"--eval",
        &data,
        &"--image-size",
        &"16",
        &"--max-steps",
        &"2",
        &"--batch-size",
        &"8",
        &"--max-examples",
        &"32",
        &"-o",
        &tuned,
    ]));
    let dense = std::fs::metadata(tuned.join("model.safetensors"))
        .unwrap()
        .len();
    let ipq = dir.path().join("ipq.qnz");
    let work = dir.path().join("ipq-work");
    let text = ok(&qn(&[
        &"compress",
        &"--model",
        &tuned,
        &"--task",
        &"idx",
        &"--train",
        &data,
        &"--image-size",
        &"16",
        &"--steps",
        &"1",
        &"--batch-size",
        &"8",
        &"--max-examples",
        &"32",
        &"--bn-recalibrate",
        &"2",
        &"--work-dir",
        &work,
        &"-o",
        &ipq,
    ]));
    assert!(text.contains("compressed with 3 stages"), "{text}");
    // Every stage ends with the batch-norm statistics re-estimated (the stages' metrics say so).
    let metrics = std::fs::read_to_string(work.join("metrics.jsonl")).unwrap();
    let recalibrated = metrics
        .lines()
        .filter(|l| l.contains("\"recalibrated_batches\":2"))
        .count();
    assert_eq!(recalibrated, 3, "{metrics}");
    // Hidden-state distillation compares encoder layers: an image model is told so.
    let out = qn(&[
        &"compress",
        &"--model",
        &tuned,
        &"--task",
        &"idx",
        &"--train",
        &data,
        &"--distill",
        &"hidden",
        &"-o",
        &dir.path().join("hidden.qnz"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--distill hidden compares an encoder's layers"),
        "{err}"
    );
    let int8 = dir.path().join("int8.qnz");
    ok(&qn(&[
        &"compress",
        &"--model",
        &tuned,
        &"--task",
        &"idx",
        &"--method",
        &"int8",
        &"-o",
        &int8,
    ]));
    let (ipq_size, int8_size) = (
        std::fs::metadata(&ipq).unwrap().len(),
        std::fs::metadata(&int8).unwrap().len(),
    );
    // iPQ at K = 256 with int8 centroids is about 10x smaller than f32 here (the early depthwise
    // layers and the batch norms stay float); int8 about 3.6x.
    assert!(ipq_size * 8 < dense, "iPQ {ipq_size} vs f32 {dense}");
    assert!(
        int8_size * 3 < dense && int8_size > ipq_size,
        "int8 {int8_size} vs f32 {dense}"
    );
    let eval = |file: &std::path::Path| -> f64 {
        let j: Value = serde_json::from_str(
            ok(&qn(&[
                &"eval",
                &"--model",
                &file,
                &"--task",
                &"idx",
                &"--data",
                &data,
                &"--image-size",
                &"16",
                &"--max-examples",
                &"50",
                &"--json",
            ]))
            .trim(),
        )
        .unwrap();
        assert_eq!(j["examples"], 50);
        j["accuracy"].as_f64().unwrap()
    };
    let (ipq_acc, int8_acc) = (eval(&ipq), eval(&int8));
    assert!((0.0..=1.0).contains(&ipq_acc) && (0.0..=1.0).contains(&int8_acc));
    // Decompressed, the file keeps EfficientNet-PyTorch names (running statistics included) and
    // evaluates exactly as the .qnz does.
    let restored = dir.path().join("restored.safetensors");
    ok(&qn(&[&"decompress", &ipq, &"-o", &restored]));
    assert_eq!(eval(&restored), ipq_acc);
    // `qn eval` and `qn predict` run a `.qnz` from its codes (convolutions and classifier are
    // never decoded whole): the same probabilities as its decompressed file, PQ and int8.
    let restored_int8 = dir.path().join("restored-int8.safetensors");
    ok(&qn(&[&"decompress", &int8, &"-o", &restored_int8]));
    assert_eq!(eval(&restored_int8), int8_acc);
    let img = dir.path().join("pattern.png");
    image::RgbImage::from_fn(20, 20, |x, y| {
        image::Rgb([(x * 12) as u8, (y * 12) as u8, ((x + y) * 5) as u8])
    })
    .save(&img)
    .unwrap();
    let probs = |m: &std::path::Path| -> Vec<(i64, f64)> {
        let out = qn(&[
            &"predict",
            &"--model",
            &m,
            &"--image",
            &img,
            &"--image-size",
            &"32",
            &"--json",
        ]);
        let j: Value = serde_json::from_str(ok(&out).trim()).unwrap();
        j["top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["label"].as_i64().unwrap(), t["prob"].as_f64().unwrap()))
            .collect()
    };
    for (coded, dense) in [(&ipq, &restored), (&int8, &restored_int8)] {
        let (a, b) = (probs(coded), probs(dense));
        let mut common = 0;
        for (label, p) in &a {
            if let Some((_, q)) = b.iter().find(|(l, _)| l == label) {
                common += 1;
                assert!((p - q).abs() <= 1e-4, "{coded:?} label {label}: {p} vs {q}");
            }
        }
        // Only a near-tie at the fifth place may swap a label in or out.
        assert!(common >= 4, "{coded:?}: {a:?} vs {b:?}");
    }
}

/// Writes `n` images per class of simple patterns (stripes one way or the other) under
/// `dir/<class>/`, as PNG and JPEG.
fn write_image_folder(dir: &std::path::Path, classes: &[&str], n: usize) {
    for (c, class) in classes.iter().enumerate() {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..n {
            let img = image::RgbImage::from_fn(20 + i as u32, 24, |x, y| {
                let on = if c == 0 {
                    (x / 3) % 2 == 0
                } else {
                    (y / 3) % 2 == 0
                };
                let v = if on { 230 } else { 20 + (i * 7) as u8 };
                image::Rgb([v, v / 2, 255 - v])
            });
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            img.save(dir.join(class).join(format!("{i:03}.{ext}")))
                .unwrap();
        }
    }
    // Files that are not images are ignored, as torchvision's ImageFolder does.
    std::fs::write(dir.join(classes[0]).join("README.txt"), b"not an image").unwrap();
}

/// An image folder trains a network from scratch (a variant name instead of weights), writes its
/// class names, and eval / compress / predict label by them, also for an evaluation folder that
/// holds only some of the classes; unknown classes, empty folders and bad variant names are
/// one-line errors.
#[test]
fn image_folders_train_from_scratch_and_keep_their_class_names() {
    let dir = tempfile::tempdir().unwrap();
    let (train, eval, out) = (
        dir.path().join("train"),
        dir.path().join("eval"),
        dir.path().join("run"),
    );
    write_image_folder(&train, &["horizontal", "vertical"], 6);
    write_image_folder(&eval, &["vertical"], 3);
    let common = |cmd: &str| -> Vec<String> {
        [cmd, "--task", "imagefolder", "--image-size", "32"]
            .map(String::from)
            .to_vec()
    };
    let run = |args: Vec<String>| {
        qn(&args
            .iter()
            .map(|s| s as &dyn AsRef<std::ffi::OsStr>)
            .collect::<Vec<_>>())
    };
    let mut args = common("finetune");
    args.extend(
        [
            "--model",
            "efficientnet-lite0",
            "--train",
            train.to_str().unwrap(),
            "--eval",
            eval.to_str().unwrap(),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "-o",
            out.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let text = ok(&run(args));
    assert!(
        text.contains("trained EfficientNet-lite0 3 steps on 12 images"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("classes.txt")).unwrap(),
        "horizontal\nvertical\n"
    );

    // The evaluation folder has only `vertical`: it keeps label 1, the model's.
    let mut args = common("eval");
    args.extend(
        [
            "--model",
            out.to_str().unwrap(),
            "--data",
            eval.to_str().unwrap(),
            "--json",
        ]
        .map(String::from),
    );
    let j: Value = serde_json::from_str(ok(&run(args)).trim()).unwrap();
    assert_eq!(j["examples"], 3);

    // Compressed, the class names ride in the .qnz.
    let qnz = dir.path().join("m.qnz");
    let mut args = common("compress");
    args.extend(
        [
            "--model",
            out.to_str().unwrap(),
            "--method",
            "int8",
            "-o",
            qnz.to_str().unwrap(),
        ]
        .map(String::from),
    );
    ok(&run(args));
    let mut args = common("eval");
    args.extend(
        [
            "--model",
            qnz.to_str().unwrap(),
            "--data",
            eval.to_str().unwrap(),
            "--json",
        ]
        .map(String::from),
    );
    let j2: Value = serde_json::from_str(ok(&run(args)).trim()).unwrap();
    assert_eq!(j2["examples"], 3);
    let out_p = qn(&[
        &"predict",
        &"--model",
        &qnz,
        &"--image",
        &eval.join("vertical/000.png"),
        &"--image-size",
        &"32",
        &"--json",
    ]);
    let p: Value = serde_json::from_str(ok(&out_p).trim()).unwrap();
    let names: Vec<&str> = p["top5"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "a two-class model has two entries: {names:?}"
    );
    assert!(
        names.contains(&"vertical") && names.contains(&"horizontal"),
        "{names:?}"
    );

    // An evaluation folder with a class the model does not know.
    let odd = dir.path().join("odd");
    write_image_folder(&odd, &["diagonal"], 1);
    let mut args = common("eval");
    args.extend(
        [
            "--model",
            out.to_str().unwrap(),
            "--data",
            odd.to_str().unwrap(),
        ]
        .map(String::from),
    );
    one_line_error(
        &run(args),
        &["diagonal", "not one of the model's 2 classes"],
    );
    // A class folder without images, and a folder without class folders.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("vertical")).unwrap();
    let mut args = common("eval");
    args.extend(
        [
            "--model",
            out.to_str().unwrap(),
            "--data",
            empty.to_str().unwrap(),
        ]
        .map(String::from),
    );
    one_line_error(&run(args), &["vertical", "no .png/.jpg images"]);
    let mut args = common("eval");
    args.extend(
        [
            "--model",
            out.to_str().unwrap(),
            "--data",
            empty.join("vertical").to_str().unwrap(),
        ]
        .map(String::from),
    );
    one_line_error(&run(args), &["no class folders"]);
    // A variant name that does not exist.
    let mut args = common("finetune");
    args.extend(
        [
            "--model",
            "efficientnet-b9",
            "--train",
            train.to_str().unwrap(),
            "--eval",
            eval.to_str().unwrap(),
            "--max-steps",
            "1",
            "-o",
            dir.path().join("x").to_str().unwrap(),
        ]
        .map(String::from),
    );
    one_line_error(&run(args), &["efficientnet-b9", "not a variant"]);
}

/// A torchvision checkpoint (a small random one, `assets/golden`) fine-tunes, compresses and
/// decompresses with torchvision's tensor names all the way: every file written loads where the
/// checkpoint came from.
#[test]
fn torchvision_checkpoints_keep_their_names_through_finetune_compress_decompress() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tv");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(
        qn_tests::asset("golden/efficientnet-torchvision-b0.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();
    let data = dir.path().join("data");
    write_image_folder(&data, &["horizontal", "vertical"], 4);
    let out = dir.path().join("run");
    let text = ok(&qn(&[
        &"finetune",
        &"--model",
        &model,
        &"--task",
        &"imagefolder",
        &"--train",
        &data,
        &"--eval",
        &data,
        &"--image-size",
        &"32",
        &"--max-steps",
        &"2",
        &"--batch-size",
        &"4",
        &"-o",
        &out,
    ]));
    assert!(text.contains("fine-tuned EfficientNet-custom"), "{text}");
    let names = |path: &std::path::Path| -> Vec<String> {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut n: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        n.sort();
        n
    };
    let original = names(&model.join("model.safetensors"));
    let tuned = names(&out.join("model.safetensors"));
    // The 10-way head became 2-way; every name is torchvision's.
    assert_eq!(tuned, original);
    let qnz = dir.path().join("m.qnz");
    ok(&qn(&[
        &"compress",
        &"--model",
        &out,
        &"--task",
        &"imagefolder",
        &"--method",
        &"int8",
        &"-o",
        &qnz,
    ]));
    let back = dir.path().join("back.safetensors");
    ok(&qn(&[&"decompress", &qnz, &"-o", &back]));
    assert_eq!(names(&back), original);
    // The decompressed file loads again and predicts.
    let img = data.join("vertical/000.png");
    let out_p = qn(&[
        &"predict",
        &"--model",
        &back,
        &"--image",
        &img,
        &"--image-size",
        &"32",
        &"--json",
    ]);
    let p: Value = serde_json::from_str(ok(&out_p).trim()).unwrap();
    assert_eq!(p["top5"].as_array().unwrap().len(), 2);
}
