//! EfficientNet: the shared pretrained Lite0 classifies real photos; architecture facts.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, D};
use qn_models::train::QuantModel;
use qn_models::vision::{load_efficientnet, load_image, EfficientNetConfig, Normalization};

fn shared() -> Option<PathBuf> {
    match std::env::var_os("QN_DATA_DIR") {
        Some(d) => Some(PathBuf::from(d)),
        None => {
            eprintln!(
                "skipped: QN_DATA_DIR is not set (the pretrained Lite0 and photos live there)"
            );
            None
        }
    }
}

fn top5(model: &dyn QuantModel, img: &Tensor) -> Vec<(usize, f32)> {
    let logits = model.forward_t(&img.unsqueeze(0).unwrap(), false).unwrap();
    let p = candle_nn::ops::softmax(&logits, D::Minus1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    idx.into_iter().take(5).map(|i| (i, p[i])).collect()
}

#[test]
fn pretrained_lite0_recognises_the_cat_and_the_espresso() {
    let Some(dir) = shared() else { return };
    let dev = Device::Cpu;
    let loaded = load_efficientnet(
        &dir.join("models/efficientnet-lite0/model.safetensors"),
        None,
        None,
        0,
        &dev,
    )
    .unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(loaded.model.config().variant, "lite0");
    let img = |name: &str, norm| {
        load_image(&dir.join("data/images").join(name), 224, norm, &dev).unwrap()
    };
    let signed = Normalization::SIGNED_UNIT;
    let cat = top5(&loaded.model, &img("chelsea.png", signed));
    let coffee = top5(&loaded.model, &img("coffee.png", signed));
    eprintln!("cat {cat:?}\ncoffee {coffee:?}");
    // ImageNet 281-285 are domestic cats; 967 espresso, 968 cup.
    assert!((281..=285).contains(&cat[0].0), "chelsea.png top-5 {cat:?}");
    assert!(
        cat.iter().take(3).all(|(c, _)| (281..=285).contains(c)),
        "{cat:?}"
    );
    assert_eq!(coffee[0].0, 967, "coffee.png top-5 {coffee:?}");
    assert!(coffee.iter().any(|(c, _)| *c == 968), "{coffee:?}");
    // The experiment that picked the normalisation: pixels in [-1, 1] make the model surer of
    // both photos than torchvision's ImageNet statistics do.
    let imagenet = Normalization::IMAGENET;
    let cat_mass = |t: &[(usize, f32)]| {
        t.iter()
            .filter(|(c, _)| (281..=285).contains(c))
            .map(|(_, p)| p)
            .sum::<f32>()
    };
    let cat_i = top5(&loaded.model, &img("chelsea.png", imagenet));
    let coffee_i = top5(&loaded.model, &img("coffee.png", imagenet));
    eprintln!("imagenet statistics: cat {cat_i:?}\ncoffee {coffee_i:?}");
    assert!(coffee[0].1 > coffee_i[0].1 && cat_mass(&cat) > cat_mass(&cat_i));
}

#[test]
fn variants_have_the_published_parameter_counts() {
    // Trainable parameters with a 1000-way head (EfficientNet-PyTorch / TF reference):
    // B0 5,288,548; Lite0 4,652,008 (4,694,024 with the batch-norm running statistics, the
    // element count of the shared Lite0 file without `num_batches_tracked`).
    let params = |v: &str| -> (usize, usize) {
        let cfg = EfficientNetConfig::variant(v, 1000).unwrap();
        let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
        let m = qn_models::vision::EfficientNet::new(&cfg, 0, vb).unwrap();
        let trainable = qn_models::train::named_vars(&m)
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        let buffers = m.buffers().iter().map(|(_, t)| t.elem_count()).sum();
        (trainable, buffers)
    };
    let (b0, _) = params("b0");
    assert_eq!(b0, 5_288_548);
    let (lite0, lite0_buffers) = params("lite0");
    assert_eq!(lite0 + lite0_buffers, 4_694_024);
    assert_eq!(
        EfficientNetConfig::variant("b3", 10)
            .unwrap()
            .blocks()
            .len(),
        26
    );
    assert!(EfficientNetConfig::variant("b9", 10).is_err());
}

#[test]
fn training_reaches_every_variable_and_updates_running_statistics_with_noise_on_every_conv() {
    let dev = Device::Cpu;
    // A B0 with squeeze-excitation, randomly initialised, 4 classes, 32x32 inputs.
    let cfg = EfficientNetConfig::variant("b0", 4).unwrap();
    let tensors = std::collections::HashMap::new();
    let loaded = qn_models::vision::build_efficientnet(
        &cfg,
        tensors,
        std::path::Path::new("<random>"),
        3,
        &dev,
    );
    // Nothing in the file: every body tensor is missing, which the loader refuses by name.
    let e = loaded.unwrap_err().to_string();
    assert!(
        e.contains("missing tensors") && e.contains("_conv_stem.weight"),
        "{e}"
    );

    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = qn_models::vision::EfficientNet::new(&cfg, 3, vb).unwrap();
    let layers = model.layers();
    let all = regex::Regex::new(".*").unwrap();
    // Block drop at the paper's default block size of each layer: whole k x k kernels for the
    // stem and depthwise convolutions, runs of input channels for 1x1 (3 for the SE reduce of 6).
    let spec: qn_models::train::NoiseSpec = "block:p=0.1".parse().unwrap();
    qn_models::train::apply_noise_spec(&layers, &all, |name, layout| spec.resolve(name, layout), 7)
        .unwrap();
    assert!(layers
        .iter()
        .all(|l| l.qweight().noise() != qn_models::train::NoiseConfig::None));
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
    let before = model.buffers()[0].1.to_vec1::<f32>().unwrap();
    let logits = model.forward_t(&x, true).unwrap();
    assert_eq!(logits.dims(), &[2, 4]);
    let grads = logits
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .backward()
        .unwrap();
    let vars = qn_models::train::named_vars(&model);
    let missing = qn_models::train::vars_without_gradient(&grads, &vars);
    assert!(missing.is_empty(), "no gradient: {missing:?}");
    let after = model.buffers()[0].1.to_vec1::<f32>().unwrap();
    assert_ne!(before, after, "training must move the running mean");
    // Evaluation uses the running statistics: the same input twice gives the same logits.
    let a = model.forward_t(&x, false).unwrap();
    let b = model.forward_t(&x, false).unwrap();
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
}

#[test]
fn any_png_or_jpeg_colour_type_and_tiny_images_become_three_channel_crops() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    // 16-bit grayscale, smaller than the crop and not square.
    let g16 =
        image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(10, 7, image::Luma([40_000u16]));
    let p16 = dir.path().join("gray16.png");
    g16.save(&p16).unwrap();
    // RGBA.
    let rgba = image::RgbaImage::from_pixel(50, 40, image::Rgba([255, 0, 0, 128]));
    let prgba = dir.path().join("rgba.png");
    rgba.save(&prgba).unwrap();
    // 8-bit grayscale JPEG.
    let g8 = image::GrayImage::from_pixel(33, 33, image::Luma([128u8]));
    let pjpg = dir.path().join("gray.jpg");
    g8.save(&pjpg).unwrap();
    for p in [&p16, &prgba, &pjpg] {
        let t = load_image(p, 32, Normalization::SIGNED_UNIT, &dev).unwrap();
        assert_eq!(t.dims(), &[3, 32, 32], "{}", p.display());
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite() && (-1.0..=1.0).contains(x)));
    }
    // A uniform gray image is the same value in every channel: 40000/65535 -> 156/255 in 8 bits.
    let t = load_image(&p16, 32, Normalization::SIGNED_UNIT, &dev).unwrap();
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let expect = 156.0 / 255.0 * 2.0 - 1.0;
    assert!(v.iter().all(|x| (x - expect).abs() < 1e-2), "{:?}", &v[..3]);
    // Red stays red (alpha dropped).
    let t = load_image(&prgba, 32, Normalization::SIGNED_UNIT, &dev).unwrap();
    let r = t
        .get(0)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let g = t
        .get(1)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((r - 1.0).abs() < 1e-3 && (g + 1.0).abs() < 1e-3, "{r} {g}");
}

/// At the end of a noisy stage the trainer re-estimates batch-norm statistics without noise: the
/// weights are those of the same run without recalibration, the statistics those that the same
/// number of noise-free training-mode passes give, and the layers keep their noise.
#[test]
fn trainer_recalibrates_batch_norm_without_noise_after_a_noisy_stage() {
    use qn_models::vision::EfficientNet;
    use qn_train::data::Dataset;
    use qn_train::trainer::{run_stages, RunOutput, StagePlan, TrainConfig};
    use qn_train::{named_vars, NoiseSpec};
    let dev = Device::Cpu;
    let cfg = EfficientNetConfig::custom(0.1, 0.25, true, 3).unwrap();
    let build = |noisy: bool| {
        let vm = candle_nn::VarMap::new();
        let m = EfficientNet::new(
            &cfg,
            0,
            candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &dev),
        )
        .unwrap();
        // The same start for every run: weights from a fixed seed, not the VarMap's RNG.
        for (i, (_, v)) in named_vars(&m).into_iter().enumerate() {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|k| (((k * 7919 + i * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.4)
                .collect();
            v.set(&Tensor::from_vec(vals, v.dims(), &dev).unwrap())
                .unwrap();
        }
        if noisy {
            let spec: NoiseSpec = "block:p=0.2".parse().unwrap();
            qn_train::apply_noise_spec(
                &m.layers(),
                &regex::Regex::new(".").unwrap(),
                |n, l| spec.resolve(n, l),
                0,
            )
            .unwrap();
        }
        m
    };
    let x = Tensor::randn(0f32, 1.0, (24, 3, 32, 32), &dev).unwrap();
    let y = Tensor::from_vec((0..24u32).map(|i| i % 3).collect(), 24, &dev).unwrap();
    let data = Dataset::new(x, y);
    let train_with = |recal: usize, noisy: bool, always: bool| {
        let mut m = build(noisy);
        let tc = TrainConfig {
            batch_size: 8,
            recalibrate_batches: recal,
            recalibrate_always: always,
            progress: false,
            ..TrainConfig::default()
        };
        run_stages(
            &mut m,
            &data,
            &data,
            &StagePlan::float(2),
            &tc,
            &RunOutput::default(),
        )
        .unwrap();
        m
    };
    let train = |recal: usize| train_with(recal, true, false);
    let plain = train(0);
    let recal = train(5);
    let buffers = |m: &EfficientNet| -> Vec<Vec<f32>> {
        m.buffers()
            .into_iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let weights = |m: &EfficientNet| -> Vec<Vec<f32>> {
        named_vars(m)
            .into_iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    assert_eq!(
        weights(&plain),
        weights(&recal),
        "recalibration changed weights"
    );
    assert_ne!(
        buffers(&plain),
        buffers(&recal),
        "recalibration changed no statistic"
    );
    // Replay: the same five noise-free training-mode passes on the plain run's model.
    for l in plain.layers() {
        l.qweight()
            .set_noise(qn_train::NoiseConfig::None, 0)
            .unwrap();
    }
    for b in 0..5usize {
        plain.set_step(qn_train::NoiseStep {
            step: (2 + b) as u64,
            micro: u32::MAX,
        });
        let (xb, _) = data
            .batch((1 << 30) + b, 8, TrainConfig::default().seed)
            .unwrap();
        plain.forward_t(&xb, true).unwrap();
    }
    let (a, b) = (buffers(&plain), buffers(&recal));
    let worst = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-5,
        "recalibrated statistics differ from noise-free passes by {worst}"
    );
    // The noise is back on every layer.
    assert!(recal
        .layers()
        .iter()
        .all(|l| !l.qweight().noises().is_empty()));
    // Without noise the statistics are left alone, unless asked (a network trained from scratch).
    let quiet = buffers(&train_with(0, false, false));
    assert_eq!(buffers(&train_with(5, false, false)), quiet);
    assert_ne!(buffers(&train_with(5, false, true)), quiet);
}
