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
