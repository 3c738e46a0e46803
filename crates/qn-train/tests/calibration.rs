//! Activation-aware iPQ stages: the layers measure their inputs in evaluation-mode forwards, and a
//! stage with `calibration_rows` learns codebooks with a smaller output error than plain k-means.

use candle_core::{DType, Device, ModuleT, Tensor};
use qn_train::data::Dataset;
use qn_train::layers::QuantNoiseLayer;
use qn_train::mlp::Mlp;
use qn_train::trainer::{run_stages, RunOutput, StagePlan, TrainConfig};
use qn_train::{Calibration, QuantModel};

/// Inputs whose 32 features span three decades of scale, neighbours far apart (as a transformer's
/// outlier features sit among ordinary ones): every block of 4 inputs is strongly anisotropic.
fn anisotropic(n: usize, seed: u64) -> Dataset {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for i in 0..n {
        for d in 0..32 {
            let scale = 10f32.powf(((d * 7) % 32) as f32 / 31.0 * 3.0 - 1.5);
            x.push(scale * rng.random_range(-1.0f32..1.0));
        }
        y.push((i % 3) as u32);
    }
    Dataset::new(
        Tensor::from_vec(x, (n, 32), &Device::Cpu).unwrap(),
        Tensor::from_vec(y, n, &Device::Cpu).unwrap(),
    )
}

/// `‖X (W − Ŵ)ᵀ‖²` of `fc1` over the data, against its float weight `w`.
fn fc1_output_error(m: &Mlp, w: &Tensor, x: &Tensor) -> f64 {
    let w_hat = m.layers()[0].qweight().stored().unwrap();
    let e = (w - w_hat).unwrap();
    x.matmul(&e.t().unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn a_calibrated_stage_has_a_smaller_output_error() {
    let data = anisotropic(512, 1);
    let plan = StagePlan::from_toml(
        r#"
        [[stage]]
        name = "fc1"
        layers = "^fc1$"
        block_size = 4
        centroids = 16
        steps = 1
        "#,
    )
    .unwrap();
    let mut errors = Vec::new();
    for rows in [0usize, 256] {
        let mut m = Mlp::seeded(32, 64, 3, 3, &Device::Cpu).unwrap();
        let w = m.layers()[0].qweight().stored().unwrap().copy().unwrap();
        let cfg = TrainConfig {
            // One step at a negligible rate: the codebook is k-means' alone.
            lr: 1e-12,
            batch_size: 32,
            kmeans_iters: 15,
            calibration_rows: rows,
            ..TrainConfig::default()
        };
        run_stages(&mut m, &data, &data, &plan, &cfg, &RunOutput::default()).unwrap();
        errors.push(fc1_output_error(&m, &w, &data.x));
        // The recorders are off again once the stage has quantized.
        assert!(m.layers()[0].qweight().take_calibration().is_none());
    }
    println!(
        "fc1 output error: plain k-means {:.4}, calibrated on 256 rows {:.4}",
        errors[0], errors[1]
    );
    assert!(
        errors[1] < 0.7 * errors[0],
        "calibrated {} against plain {}",
        errors[1],
        errors[0]
    );
}

#[test]
fn evaluation_forwards_record_and_training_forwards_do_not() {
    let m = Mlp::seeded(32, 16, 3, 0, &Device::Cpu).unwrap();
    let data = anisotropic(40, 2);
    let fc1 = m.layers()[0];
    assert!(fc1.qweight().start_calibration());
    m.forward_t(&data.x, true).unwrap();
    m.forward_t(&data.x.narrow(0, 0, 30).unwrap(), false)
        .unwrap();
    let Some(Calibration::Inputs(moments)) = fc1.qweight().take_calibration() else {
        panic!("a Linear layer measures its inputs");
    };
    assert_eq!(moments.count(), 30, "evaluation rows only");
    // Blocks of 4 read off the kept span: position 0's block is the mean of x xᵀ over the rows.
    let metric = moments.metric(4, 16).unwrap();
    assert_eq!(metric.positions(), 8);
    let x = data.x.narrow(0, 0, 30).unwrap().to_vec2::<f32>().unwrap();
    for (pos, r, c) in [(0usize, 1usize, 2usize), (5, 3, 3), (7, 0, 2)] {
        let want: f64 = x
            .iter()
            .map(|row| row[pos * 4 + r] as f64 * row[pos * 4 + c] as f64)
            .sum::<f64>()
            / 30.0;
        let got = metric.block(pos)[r * 4 + c] as f64;
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "block {pos} ({r}, {c}): {got} against {want}"
        );
    }
    assert!(fc1.qweight().take_calibration().is_none());

    // An embedding counts the rows it reads.
    let w =
        candle_core::Var::from_tensor(&Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
    let e = qn_train::layers::QEmbedding::new("emb", w, None).unwrap();
    assert!(e.qweight().start_calibration());
    let ids = Tensor::new(&[[0u32, 3, 3], [4, 3, 0]], &Device::Cpu).unwrap();
    e.forward_t(&ids, false).unwrap();
    let Some(Calibration::Rows(counts)) = e.qweight().take_calibration() else {
        panic!("an embedding counts its rows");
    };
    assert_eq!(counts, vec![2.0, 0.0, 0.0, 3.0, 1.0]);
    // A padding row is kept exactly beside the codes: its reads are not counted.
    let w =
        candle_core::Var::from_tensor(&Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
    let e = qn_train::layers::QEmbedding::new("emb", w, Some(3)).unwrap();
    e.qweight().start_calibration();
    e.forward_t(&ids, false).unwrap();
    let Some(Calibration::Rows(counts)) = e.qweight().take_calibration() else {
        panic!("an embedding counts its rows");
    };
    assert_eq!(counts, vec![2.0, 0.0, 0.0, 0.0, 1.0]);
}

/// A 1x1 convolution at stride 1 measures its pixels' channel moments (it is a Linear layer over
/// each pixel); a 3x3 one records nothing, so that its stage falls back to plain k-means.
#[test]
fn a_pointwise_convolution_records_its_pixels_and_a_3x3_one_nothing() {
    use candle_core::Var;
    use candle_nn::Conv2dConfig;
    use qn_train::layers::QConv2d;
    let dev = Device::Cpu;
    let conv = |k: usize| {
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (6, 8, k, k), &dev).unwrap()).unwrap();
        let cfg = Conv2dConfig {
            padding: k / 2,
            ..Default::default()
        };
        QConv2d::new(&format!("conv{k}"), w, None, cfg).unwrap()
    };
    let x = Tensor::randn(0f32, 1.0, (3, 8, 5, 4), &dev).unwrap();
    let pointwise = conv(1);
    pointwise.qweight().start_calibration();
    pointwise.forward_t(&x, true).unwrap();
    pointwise.forward_t(&x, false).unwrap();
    let Some(Calibration::Inputs(m)) = pointwise.qweight().take_calibration() else {
        panic!("a 1x1 convolution measures its inputs");
    };
    assert_eq!(
        m.count(),
        3 * 5 * 4,
        "one row per pixel of the evaluation pass"
    );
    let metric = m.metric(4, 6).unwrap();
    let px = x.permute((0, 2, 3, 1)).unwrap().reshape((60, 8)).unwrap();
    let px = px.to_vec2::<f32>().unwrap();
    for (pos, r, c) in [(0usize, 0usize, 3usize), (1, 2, 1)] {
        let want: f64 = px
            .iter()
            .map(|p| p[pos * 4 + r] as f64 * p[pos * 4 + c] as f64)
            .sum::<f64>()
            / 60.0;
        let got = metric.block(pos)[r * 4 + c] as f64;
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }
    let spatial = conv(3);
    spatial.qweight().start_calibration();
    spatial.forward_t(&x, false).unwrap();
    let Some(Calibration::Inputs(m)) = spatial.qweight().take_calibration() else {
        panic!("moments are started for every convolution");
    };
    assert_eq!(m.count(), 0);
    assert!(m.metric(8, 6).is_none(), "no metric: plain k-means");
}
