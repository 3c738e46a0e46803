//! The bit budget: its plans land on the size asked (the file as written, within 1 % and never
//! over), its choices follow the measured errors, and impossible budgets are refused.

use std::collections::BTreeMap;

use candle_core::{Device, ModuleT, Tensor, Var};
use qn_format::header::CodebookKind;
use qn_train::data::Dataset;
use qn_train::layers::{QLinear, QuantNoiseLayer};
use qn_train::trainer::budget::{
    choose, probe_layers, solve, BudgetOptions, Candidate, LayerOptions, Sensitivity,
};
use qn_train::trainer::{
    export_qnz_with, planned_size, run_stages, RunOutput, StagePlan, TrainConfig,
};
use qn_train::QuantModel;
use rand::{Rng, SeedableRng};

/// Six 128 → 128 layers and a head: enough layers for a budget to have fine steps.
struct Deep {
    layers: Vec<QLinear>,
}

impl Deep {
    fn seeded(seed: u64) -> Deep {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let dev = Device::Cpu;
        let mut layer = |name: String, i: usize, o: usize| {
            let w: Vec<f32> = (0..o * i).map(|_| rng.random_range(-0.1f32..0.1)).collect();
            let w = Var::from_tensor(&Tensor::from_vec(w, (o, i), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::zeros(o, candle_core::DType::F32, &dev).unwrap())
                .unwrap();
            QLinear::new(&name, w, Some(b)).unwrap()
        };
        let mut layers: Vec<QLinear> = (0..6).map(|i| layer(format!("fc{i}"), 128, 128)).collect();
        layers.push(layer("head".into(), 128, 4));
        Deep { layers }
    }
}

impl QuantModel for Deep {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward_t(&h, train)?;
            if i < last {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
    fn layers(&self) -> Vec<&dyn QuantNoiseLayer> {
        self.layers
            .iter()
            .map(|l| l as &dyn QuantNoiseLayer)
            .collect()
    }
    fn layers_mut(&mut self) -> Vec<&mut dyn QuantNoiseLayer> {
        self.layers
            .iter_mut()
            .map(|l| l as &mut dyn QuantNoiseLayer)
            .collect()
    }
}

fn data() -> Dataset {
    data_seeded(0)
}

/// Gaussian inputs drawn from `seed` (candle's CPU `randn` cannot be seeded).
fn data_seeded(seed: u64) -> Dataset {
    use rand_distr::{Distribution, Normal};
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0f32, 1.0).unwrap();
    let x: Vec<f32> = (0..256 * 128).map(|_| normal.sample(&mut rng)).collect();
    let x = Tensor::from_vec(x, (256, 128), &dev).unwrap();
    let y = Tensor::from_vec((0..256u32).map(|i| i % 4).collect::<Vec<_>>(), 256, &dev).unwrap();
    Dataset::new(x, y)
}

fn plan() -> StagePlan {
    StagePlan::from_toml(
        "int8_centroids = true\n[[stage]]\nname = \"all\"\nlayers = '^fc|^head'\nsteps = 2\n",
    )
    .unwrap()
}

fn options() -> BudgetOptions {
    BudgetOptions {
        block_sizes: vec![2, 4, 8, 16],
        centroids: vec![16, 32, 64, 128, 256],
        probe_points: 4096,
        probe_iters: 6,
        codebook: CodebookKind::Int8,
        sensitivity: Sensitivity::Fisher { batches: 4 },
    }
}

fn cfg() -> TrainConfig {
    TrainConfig {
        batch_size: 32,
        lr: 1e-4,
        calibration_rows: 64,
        kmeans_iters: 4,
        ..TrainConfig::default()
    }
}

/// What the CLI stores: the plan in the header.
fn metadata(plan: &StagePlan) -> Vec<(String, String)> {
    vec![("stage_plan".into(), toml::to_string(plan).unwrap())]
}

fn size_of(
    m: &dyn QuantModel,
    plan: &StagePlan,
    planned: &BTreeMap<String, (usize, usize)>,
) -> qn_train::Result<u64> {
    planned_size(m, CodebookKind::Int8, &metadata(plan), planned)
}

#[test]
fn the_written_file_lands_within_one_percent_of_each_target_and_never_over() {
    for seed in 0..3 {
        lands_on_every_target(seed);
    }
}

fn lands_on_every_target(seed: u64) {
    let data = data_seeded(seed);
    let layers = probe_layers(&mut Deep::seeded(seed), &plan(), &options(), &cfg(), &data).unwrap();
    assert_eq!(layers.len(), 7, "every layer is probed");
    // The head (4 x 128) has 256 blocks at most: no 256-centroid choice past d = 2.
    let head = layers.iter().find(|l| l.layer == "head").unwrap();
    assert!(head
        .candidates
        .iter()
        .all(|c| 512 / c.block_size >= c.centroids));
    let smallest = solve(
        &Deep::seeded(seed),
        &plan(),
        u64::MAX,
        layers.clone(),
        &mut size_of,
    )
    .unwrap()
    .smallest_bytes;
    let largest: u64 = size_of(
        &Deep::seeded(seed),
        &plan(),
        &layers
            .iter()
            .map(|l| {
                let c = l.candidates.iter().max_by_key(|c| c.bytes).unwrap();
                (l.layer.clone(), (c.block_size, c.centroids))
            })
            .collect(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for frac in [0.15, 0.4, 0.7, 0.95] {
        let target = smallest + ((largest - smallest) as f64 * frac) as u64;
        let mut model = Deep::seeded(seed);
        let budget = solve(&model, &plan(), target, layers.clone(), &mut size_of).unwrap();
        run_stages(
            &mut model,
            &data,
            &data,
            &budget.plan,
            &cfg(),
            &RunOutput::default(),
        )
        .unwrap();
        qn_train::trainer::int8_centroids(&model).unwrap();
        let path = dir.path().join(format!("{seed}-{frac}.qnz"));
        let written =
            export_qnz_with(&model, &path, CodebookKind::Int8, &metadata(&budget.plan)).unwrap();
        assert_eq!(written, std::fs::metadata(&path).unwrap().len());
        println!(
            "seed {seed}, target {target}: planned {}, written {written} ({:+.3} %)",
            budget.planned_bytes,
            100.0 * (written as f64 / target as f64 - 1.0)
        );
        assert!(written <= target, "{written} bytes over the {target} asked");
        assert!(
            written as f64 >= 0.99 * target as f64,
            "{written} bytes: more than 1 % under the {target} asked"
        );
        // The dry run is the file, up to the checksums' effect on the compressed header.
        assert!(
            written.abs_diff(budget.planned_bytes) <= 64,
            "{written} vs {}",
            budget.planned_bytes
        );
        // Every layer was quantized as planned.
        for (name, (d, k)) in budget.planned() {
            let layer = model
                .layers()
                .into_iter()
                .find(|l| l.name() == name)
                .unwrap();
            let codes = match layer.qweight().state() {
                qn_train::WeightState::Pq(pq) => pq.codes().unwrap(),
                _ => panic!("layer {name} is not product-quantized"),
            };
            assert_eq!((codes.layout.block_size(), codes.k()), (d, k), "{name}");
        }
    }
}

#[test]
fn a_target_below_the_smallest_file_is_refused_with_both_sizes() {
    let data = data();
    let layers = probe_layers(&mut Deep::seeded(0), &plan(), &options(), &cfg(), &data).unwrap();
    let err = solve(&Deep::seeded(0), &plan(), 1000, layers, &mut size_of)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1000 bytes is below the smallest file"),
        "{err}"
    );
}

#[test]
fn the_probes_fall_with_rate_and_loud_inputs_make_a_layer_costlier() {
    let data = data();
    let layers = probe_layers(&mut Deep::seeded(0), &plan(), &options(), &cfg(), &data).unwrap();
    for l in &layers {
        for d in [2, 4, 8, 16] {
            let by_k: Vec<f64> = l
                .candidates
                .iter()
                .filter(|c| c.block_size == d)
                .map(|c| c.distortion)
                .collect();
            assert!(
                by_k.windows(2).all(|w| w[1] < w[0]),
                "{}: error must fall as K grows at d = {d}: {by_k:?}",
                l.layer
            );
        }
        assert!(l
            .candidates
            .iter()
            .all(|c| c.distortion > 0.0 && c.distortion < 1.0));
    }
}

fn option(bytes: u64, distortion: f64) -> Candidate {
    Candidate {
        block_size: 8,
        centroids: 256,
        bytes,
        distortion,
    }
}

#[test]
fn marginal_analysis_spends_bytes_where_they_remove_the_most_error() {
    // `steep` loses 0.5 → 0.1 for 100 bytes; `flat` loses 0.5 → 0.45 for the same 100 bytes.
    let layers = vec![
        LayerOptions {
            layer: "flat".into(),
            stage: 0,
            candidates: vec![option(100, 0.5), option(200, 0.45)],
        },
        LayerOptions {
            layer: "steep".into(),
            stage: 0,
            candidates: vec![option(100, 0.5), option(200, 0.1)],
        },
    ];
    assert_eq!(
        choose(&layers, 199),
        None,
        "the smallest choice needs 200 bytes"
    );
    assert_eq!(choose(&layers, 299), Some(vec![0, 0]), "no upgrade fits");
    assert_eq!(choose(&layers, 300), Some(vec![0, 1]));
    assert_eq!(choose(&layers, 400), Some(vec![1, 1]));
}

#[test]
fn marginal_analysis_stops_only_when_no_improvement_fits() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for _ in 0..200 {
        let layers: Vec<LayerOptions> = (0..5)
            .map(|i| LayerOptions {
                layer: format!("l{i}"),
                stage: 0,
                candidates: (0..4)
                    .map(|_| option(rng.random_range(10..500), rng.random_range(0.0..1.0)))
                    .collect(),
            })
            .collect();
        let min: u64 = layers
            .iter()
            .map(|l| l.candidates.iter().map(|c| c.bytes).min().unwrap())
            .sum();
        let budget = min + rng.random_range(0..1500);
        let pick = choose(&layers, budget).unwrap();
        let used: u64 = layers
            .iter()
            .zip(&pick)
            .map(|(l, &c)| l.candidates[c].bytes)
            .sum();
        assert!(used <= budget);
        for (l, &c) in layers.iter().zip(&pick) {
            let now = l.candidates[c];
            for other in &l.candidates {
                let fits = used + other.bytes <= budget + now.bytes;
                assert!(
                    !(fits && other.distortion < now.distortion),
                    "{}: {other:?} fits and beats {now:?}",
                    l.layer
                );
            }
        }
    }
}

/// A layer that no listed block size fits keeps its plan's block size and centroids as a
/// candidate instead of staying float.
#[test]
fn the_plans_own_choice_is_always_a_candidate() {
    let opts = BudgetOptions {
        block_sizes: vec![3],
        centroids: vec![16],
        ..options()
    };
    let plan = StagePlan::from_toml(
        "[[stage]]\nname = \"all\"\nlayers = '^fc'\nblock_size = 4\ncentroids = 32\nsteps = 1\n",
    )
    .unwrap();
    let layers = probe_layers(&mut Deep::seeded(0), &plan, &opts, &cfg(), &data()).unwrap();
    assert_eq!(
        layers.len(),
        6,
        "the six fc layers; the head is not in the plan"
    );
    for l in &layers {
        let got: Vec<(usize, usize)> = l
            .candidates
            .iter()
            .map(|c| (c.block_size, c.centroids))
            .collect();
        // d = 3 fits no 128-wide row; at the plan's d = 4 both the listed K and its own.
        assert_eq!(got, vec![(4, 16), (4, 32)], "{}", l.layer);
    }
}
