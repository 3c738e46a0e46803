//! EfficientNet checkpoints in torchvision's and timm's layouts: loaded by renaming, with each
//! layout's padding and batch-norm conventions, they give the logits of the libraries' own models
//! (goldens from `scripts/make_efficientnet_layout_goldens.py`); the renaming maps back to the
//! very names of the file; names a layout does not explain are errors naming them.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use qn_models::vision::layout::{detect, from_canonical, to_canonical, WeightLayout};
use qn_models::vision::{
    build_efficientnet, read_image_weights_with_layout, ConvPadding, EfficientNetConfig,
};
use qn_train::QuantModel;
use serde_json::Value;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/golden")
}

/// The script's input: x[c, h, w] = sin(0.05 (c + 1) h + 0.03 w).
fn synthetic_image(size: usize) -> Tensor {
    let mut v = Vec::with_capacity(3 * size * size);
    for c in 0..3 {
        for h in 0..size {
            for w in 0..size {
                v.push((0.05 * (c + 1) as f64 * h as f64 + 0.03 * w as f64).sin() as f32);
            }
        }
    }
    Tensor::from_vec(v, (1, 3, size, size), &Device::Cpu).unwrap()
}

#[test]
fn torchvision_and_timm_checkpoints_give_their_libraries_logits() {
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir().join("efficientnet-layouts.json")).unwrap(),
    )
    .unwrap();
    let (width, depth) = (g["width"].as_f64().unwrap(), g["depth"].as_f64().unwrap());
    let classes = g["classes"].as_u64().unwrap() as usize;
    let x = synthetic_image(g["size"].as_u64().unwrap() as usize);
    for (name, m) in g["models"].as_object().unwrap() {
        let path = golden_dir().join(format!("efficientnet-{name}.safetensors"));
        let (tensors, mut layout) = read_image_weights_with_layout(&path, &Device::Cpu).unwrap();
        let expected_layout = if m["library"] == "torchvision" {
            WeightLayout::Torchvision
        } else {
            WeightLayout::Timm {
                tf_conventions: false,
            }
        };
        assert_eq!(layout, expected_layout, "{name}");
        if name.contains("-tf-") {
            // As `--variant tf_efficientnet_b0` says: timm's names do not tell.
            layout = WeightLayout::Timm {
                tf_conventions: true,
            };
        }
        let lite = m["lite"].as_bool().unwrap();
        let cfg =
            layout.conventions(EfficientNetConfig::custom(width, depth, lite, classes).unwrap());
        assert_eq!(
            cfg.padding,
            if name.contains("-tf-") {
                ConvPadding::TfSame
            } else {
                ConvPadding::Symmetric
            }
        );
        let loaded = build_efficientnet(&cfg, tensors, &path, 0, &Device::Cpu).unwrap();
        assert!(loaded.warnings.is_empty(), "{name}: {:?}", loaded.warnings);
        let logits = loaded
            .model
            .forward_t(&x, false)
            .unwrap()
            .flatten_all()
            .unwrap();
        let ours = logits
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let want: Vec<f64> = m["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let d = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        eprintln!("{name}: max |Δ logit| = {d:.2e}");
        assert!(d <= 1e-3, "{name}: max |Δ logit| = {d}");

        // The trained model's names map back to exactly the file's names.
        let file_names: Vec<String> = candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
        let mut canonical: Vec<String> = qn_train::named_vars(&loaded.model)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        canonical.extend(loaded.model.buffers().into_iter().map(|(n, _)| n));
        let back = from_canonical(&canonical, layout, &cfg.blocks_per_stage()).unwrap();
        let mut mapped: Vec<String> = back.into_values().collect();
        let mut file_sorted = file_names.clone();
        mapped.sort();
        file_sorted.sort();
        assert_eq!(mapped, file_sorted, "{name}: names written back");
    }
}

#[test]
fn unexplained_names_are_errors_that_name_them() {
    let names = [
        "features.0.0.weight",
        "features.1.0.block.0.0.weight",
        "features.1.0.extra.weight",
    ];
    let layout = detect(names.iter().copied());
    assert_eq!(layout, WeightLayout::Torchvision);
    let err = to_canonical(names.iter().copied(), layout).unwrap_err();
    assert!(err.contains("features.1.0.extra.weight"), "{err}");
    let names = [
        "conv_stem.weight",
        "blocks.0.0.conv_dw.weight",
        "blocks.0.0.mystery.weight",
    ];
    let err = to_canonical(names.iter().copied(), detect(names.iter().copied())).unwrap_err();
    assert!(err.contains("blocks.0.0.mystery.weight"), "{err}");
    assert_eq!(
        detect(["_conv_stem.weight"].iter().copied()),
        WeightLayout::EfficientNetPytorch
    );
    for l in [
        WeightLayout::EfficientNetPytorch,
        WeightLayout::Torchvision,
        WeightLayout::Timm {
            tf_conventions: false,
        },
        WeightLayout::Timm {
            tf_conventions: true,
        },
    ] {
        assert_eq!(WeightLayout::parse(l.as_str()), Some(l));
    }
}
