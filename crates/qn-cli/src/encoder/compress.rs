//! `qn compress`: an encoder to a self-contained `.qnz` — by default iterative PQ with centroid
//! fine-tuning on the task data (the paper's RoBERTa schedule), or post-training int8/int4.
//!
//! The iPQ stages checkpoint into `--work-dir` (default `<output>.work`, removed once the file is
//! written), so an interrupted compression resumes when rerun; Ctrl-C stops it after the current
//! step with a checkpoint (exit 130). The `.qnz` carries the config,
//! label map and tokenizer files.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use qn_format::header::CodebookKind;
use qn_kernels::scalar::{Granularity, ObserverKind, ScalarConfig, Scheme};
use qn_models::bundle::qnz_metadata;
use qn_models::text::{read_examples_with, LabelMap, TextExample, TextTokenizer, NO_LABEL};
use qn_train::data::Dataset;
use qn_train::distill::{cached_teacher_logits, Distill};
use qn_train::trainer::budget::{plan_for_budget, BudgetOptions, BudgetPlan, Sensitivity};
use qn_train::trainer::{
    accuracy, export_qnz_with, planned_size, run_stages_with_teacher, RunOutput, StagePlan,
    TrainConfig,
};
use qn_train::QuantModel;
use rand::{seq::SliceRandom, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{parse_any_task, parse_max_len, task_labels, AnyTask, ModelArgs};
use crate::args::{parse_positive_count, parse_positive_f64, parse_size};
use crate::interrupt;
use crate::rules::{parse_granularity, parse_observer};

/// The compression method.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Iterative product quantization with centroid fine-tuning.
    Ipq,
    /// Post-training int8 scalar quantization.
    Int8,
    /// Post-training int4 scalar quantization.
    Int4,
}

/// How iPQ centroids are stored in the `.qnz`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codebook {
    /// Centroids rounded to int8 with a scale per layer (the paper's iPQ + int8).
    Int8,
    /// Centroids as f16.
    F16,
}

/// How the bit budget weighs layers (see `qn_train::trainer::budget::Sensitivity`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSensitivity {
    /// Relative output error times the layer's mean Fisher information and weight energy.
    Fisher,
    /// Relative output error alone.
    Relative,
}

/// What the iPQ stages fine-tune on.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DistillMode {
    /// The teacher's logits (the uncompressed model, or `--teacher`), mixed with the labels by
    /// `--distill-alpha`; rows without a label train on the teacher alone.
    Logits,
    /// `logits`, plus the mean squared difference of every layer's hidden states from the
    /// teacher's (weighted by `--hidden-weight`; the teacher runs beside the student at every
    /// step, about a third more time per step). Encoders only.
    Hidden,
    /// The labels alone (every row needs one).
    None,
}

/// Arguments of `qn compress`.
#[derive(clap::Args, Debug)]
pub struct CompressArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Training data for the centroid fine-tuning (TSV; iPQ only).
    #[arg(long)]
    pub(crate) train: Option<PathBuf>,
    /// Data checked at the end of each stage (default: `--check-rows` rows held out of the
    /// training data, which no stage trains on).
    #[arg(long)]
    pub(crate) eval: Option<PathBuf>,
    /// Without `--eval`: how many training rows (a seeded draw) are held out for the stage checks
    /// and the final accuracy (default: a tenth of the rows, at most 500).
    #[arg(long, value_parser = parse_positive_count, allow_negative_numbers = true)]
    pub(crate) check_rows: Option<u64>,
    /// iPQ: fine-tune on the teacher's logits (`logits`, default), on its logits and hidden states
    /// (`hidden`), or on the labels alone (`none`). With distillation, training rows need no
    /// label.
    #[arg(long, value_enum, default_value_t = DistillMode::Logits)]
    pub(crate) distill: DistillMode,
    /// The teacher (a directory, hub id or weights file; default: the model being compressed, as
    /// it is before the first stage).
    #[arg(long)]
    pub(crate) teacher: Option<String>,
    /// Weight of the labels' cross-entropy in the distillation loss, in [0, 1] (0: the teacher
    /// alone, as the iPQ paper).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub(crate) distill_alpha: f64,
    /// With `--distill hidden`: the weight of the hidden-state term.
    #[arg(long, default_value_t = 1.0, value_parser = parse_positive_f64, allow_negative_numbers = true)]
    pub(crate) hidden_weight: f64,
    /// Softmax temperature of the distillation loss.
    #[arg(long, default_value_t = 1.0, value_parser = parse_positive_f64, allow_negative_numbers = true)]
    pub(crate) temperature: f64,
    /// iPQ: training rows run through the model before each stage so that every Linear layer's
    /// codebook minimises its output error on them (activation-aware k-means) and every embedding
    /// favours the rows read most; 0: plain k-means on the weights.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1_000_000), allow_negative_numbers = true)]
    pub(crate) calibration: u64,
    /// With `--calibration`: weigh embedding rows by how often the calibration rows read them
    /// (true), or give embeddings plain k-means (false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) calibrate_embeddings: bool,
    /// Learning rate of the PQ centroids (default: `--lr`, as every other parameter).
    #[arg(long, value_parser = parse_positive_f64, allow_negative_numbers = true)]
    pub(crate) centroid_lr: Option<f64>,
    /// Data layout: sst2, rte or tsv; idx for (Fashion-)MNIST images (the data paths are then
    /// directories holding `train-*` / `t10k-*` IDX files); imagefolder for `<dir>/<class>/<image>`
    /// trees (png/jpg).
    #[arg(long, value_parser = parse_any_task)]
    pub(crate) task: Option<AnyTask>,
    /// Image models: input resolution.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(8..=1024), allow_negative_numbers = true)]
    pub(crate) image_size: u64,
    /// ipq (default), int8 or int4.
    #[arg(long, value_enum, default_value_t = Method::Ipq)]
    pub(crate) method: Method,
    /// TOML stage plan (default: the paper's RoBERTa schedule: embeddings, FFN, attention with
    /// blocks 8 / 8 / 4, K = 256, int8 centroids).
    #[arg(long)]
    pub(crate) plan: Option<PathBuf>,
    /// How iPQ stores its centroids: int8 or f16 (default: the plan's `int8_centroids`; the
    /// default plans say int8).
    #[arg(long, value_enum)]
    pub(crate) codebook: Option<Codebook>,
    /// k-means iterations when a stage quantizes a layer (iPQ).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000), allow_negative_numbers = true)]
    pub(crate) kmeans_iters: u64,
    /// Image models: after every iPQ stage, this many noise-free training-mode batches re-estimate
    /// the batch-norm statistics, which the stage's quantization shifted and its few fine-tuning
    /// steps (momentum 0.01) only partly refresh (0: off; models without batch norm are never
    /// touched). Measured on Lite0 / Fashion-MNIST: 80.50 % -> 86.20 % (BENCHMARKS.md).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=1_000_000), allow_negative_numbers = true)]
    pub(crate) bn_recalibrate: u64,
    /// iPQ: the size of the file to write, every byte counted (bytes, or with a unit: 4MB,
    /// 3.5MiB). Each layer's block size and centroids are chosen from `--budget-block-sizes` and
    /// `--budget-centroids` by the error each choice measures on the calibration rows, to land
    /// within 1 % under it; the stages and their lengths stay the plan's. The chosen plan is
    /// printed and stored in the file's header (`qn inspect --json`, key `stage_plan`).
    #[arg(long, value_parser = parse_size, conflicts_with = "target_ratio")]
    pub(crate) target_size: Option<u64>,
    /// iPQ: `--target-size` as a compression ratio against the model written uncompressed
    /// (its float32 tensors and the same header).
    #[arg(long, value_parser = parse_positive_f64, allow_negative_numbers = true)]
    pub(crate) target_ratio: Option<f64>,
    /// With a target: the block sizes a layer may take.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8,16", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) budget_block_sizes: Vec<u64>,
    /// With a target: the centroid counts a layer may take. Counts other than 256 give the finer
    /// steps of rate that let a file land within 1 % of its target: at K = 256 alone the word
    /// embedding of all-MiniLM-L6-v2 jumps by 1.5-3 MB between block sizes, and a 10x target
    /// landed 7 % under until 1024 was offered (measured).
    #[arg(long, value_delimiter = ',', default_value = "64,128,256,1024", value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub(crate) budget_centroids: Vec<u64>,
    /// With a target: how layers' errors are weighed against each other — `fisher` (by the
    /// loss's squared gradient per weight times the weights' energy, from 8 batches) or
    /// `relative` (every layer's relative output error alike).
    #[arg(long, value_enum, default_value_t = BudgetSensitivity::Fisher)]
    pub(crate) budget_sensitivity: BudgetSensitivity,
    /// Fine-tuning steps of every stage (overrides the plan's).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000), allow_negative_numbers = true)]
    pub(crate) steps: Option<u64>,
    /// iPQ: a last stage of this many steps that quantizes nothing and trains every centroid and
    /// every float parameter together, with a fresh optimizer (0: none).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000_000), allow_negative_numbers = true)]
    pub(crate) final_steps: u64,
    /// Use a seeded subset of this many training rows.
    #[arg(long, value_parser = parse_positive_count, allow_negative_numbers = true)]
    pub(crate) max_examples: Option<u64>,
    /// Centroid fine-tuning learning rate.
    #[arg(long, default_value_t = 1e-4, value_parser = parse_positive_f64, allow_negative_numbers = true)]
    pub(crate) lr: f64,
    /// Examples per step.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=65_536), allow_negative_numbers = true)]
    pub(crate) batch_size: u64,
    /// Truncate inputs to this many tokens.
    #[arg(long, default_value_t = 128, value_parser = parse_max_len)]
    pub(crate) max_len: usize,
    /// Scalar granularity (int8/int4): tensor, channel[:axis] or group:<size>.
    #[arg(long, default_value = "channel", value_parser = parse_granularity, allow_negative_numbers = true)]
    pub(crate) granularity: Granularity,
    /// Scalar observer (int8/int4): minmax or histogram.
    #[arg(long, default_value = "minmax", value_parser = parse_observer)]
    pub(crate) observer: ObserverKind,
    /// Where the iPQ stages checkpoint (default: `<output>.work`, removed after success; a
    /// directory named here is kept).
    #[arg(long)]
    pub(crate) work_dir: Option<PathBuf>,
    /// Seed of k-means, batches and dropout.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// The `.qnz` to write.
    #[arg(short, long, visible_alias = "out")]
    pub(crate) output: PathBuf,
}

/// The paper's RoBERTa iPQ schedule with `steps` of fine-tuning per stage.
pub fn default_plan(steps: usize) -> StagePlan {
    StagePlan::from_toml(&format!(
        r#"
int8_centroids = true
[[stage]]
name = "embeddings"
layers = '\.embeddings\.(word|position|token_type)_embeddings$'
block_size = 8
steps = {steps}
[[stage]]
name = "ffn"
layers = '(\.layer\.\d+\.(intermediate|output)\.dense|\.pooler\.dense|^classifier\.dense)$'
block_size = 8
steps = {steps}
[[stage]]
name = "attention"
layers = '\.attention\.(self\.(query|key|value)|output\.dense)$'
block_size = 4
steps = {steps}
"#
    ))
    .expect("the default plan parses")
}

/// Runs `qn compress`.
pub fn run(args: &CompressArgs) -> Result<()> {
    args.model.apply_threads();
    if args.output.extension().is_none_or(|e| e != "qnz") {
        bail!(
            "--output `{}`: give a path ending in .qnz",
            args.output.display()
        );
    }
    if args.output.is_dir() {
        bail!("--output `{}` is a directory", args.output.display());
    }
    // Checked before any data is read or directory made.
    Distill {
        alpha: args.distill_alpha,
        temperature: args.temperature,
    }
    .validate()
    .context("--distill-alpha / --temperature")?;
    if args.task.is_some_and(AnyTask::is_image) {
        return crate::vision::compress_images(args);
    }
    match args.method {
        Method::Ipq => ipq(args),
        Method::Int8 => scalar(args, 8),
        Method::Int4 => scalar(args, 4),
    }
}

/// The post-training scalar settings of `--method int8|int4`.
pub(crate) fn scalar_config(args: &CompressArgs, bits: u8) -> Result<ScalarConfig> {
    Ok(ScalarConfig::new(bits)?
        .with_scheme(Scheme::Symmetric)
        .with_granularity(args.granularity)
        .with_observer(args.observer))
}

/// Quantizes every layer's weight to `cfg`; layers that cannot be are left raw, with a warning, and
/// returned.
pub(crate) fn quantize_scalar_layers(
    model: &mut dyn QuantModel,
    cfg: &ScalarConfig,
) -> Vec<String> {
    let mut kept = Vec::new();
    for layer in model.layers_mut() {
        let name = layer.name().to_string();
        if let Err(e) = layer.qweight_mut().quantize_scalar(cfg) {
            kept.push(format!("{name} ({e})"));
        }
    }
    for k in &kept {
        eprintln!("qn: warning: left raw: {k}");
    }
    kept
}

fn scalar(args: &CompressArgs, bits: u8) -> Result<()> {
    let cfg = scalar_config(args, bits)?;
    // Post-training int-N reads the weights alone: say so rather than let a data file look used.
    for (flag, given) in [
        ("--train", args.train.is_some()),
        ("--eval", args.eval.is_some()),
    ] {
        if given {
            eprintln!("qn: warning: {flag} is not read by --method int{bits} (it quantizes the weights alone)");
        }
    }
    let mut bundle = args.model.load(None, args.seed, false)?;
    let kept = quantize_scalar_layers(&mut bundle.model, &cfg);
    let bytes = export_qnz_with(
        &bundle.model,
        &args.output,
        CodebookKind::F16,
        &qnz_metadata(&bundle),
    )?;
    println!(
        "wrote {} ({bytes} bytes, int{bits}, {} layers quantized)",
        args.output.display(),
        bundle.model.layers().len() - kept.len()
    );
    Ok(())
}

fn ipq(args: &CompressArgs) -> Result<()> {
    let task = match args.task {
        Some(AnyTask::Text(t)) => Some(t),
        _ => None,
    };
    let (Some(train_path), Some(task)) = (&args.train, task) else {
        bail!("--method ipq fine-tunes centroids on task data: give --train and --task");
    };
    let plan = stage_plan(args, || {
        Ok(default_plan(args.steps.unwrap_or(200) as usize))
    })?;
    let distill = args.distill != DistillMode::None;
    let read = |path: &PathBuf, max: Option<usize>| -> Result<Vec<TextExample>> {
        if !path.is_file() {
            bail!("dataset `{}`: no such file", path.display());
        }
        let rows = read_examples_with(path, task, max, args.seed, distill)?;
        say_unlabelled(path, &rows);
        Ok(rows)
    };
    let train_rows = read(train_path, args.max_examples.map(|n| n as usize))?;
    let eval_rows = args.eval.as_ref().map(|e| read(e, None)).transpose()?;
    let bundle = args.model.load(None, args.seed, true)?;
    // The model's own labels when it has a trained head; else the task's, on a seeded head.
    let mut bundle = if bundle.head_initialised {
        if distill && args.teacher.is_none() {
            bail!(
                "--distill logits: `{}` has no trained classification head to distil from; give                  --teacher, or --distill none to fine-tune on the labels",
                args.model.model
            );
        }
        args.model
            .load(Some(task_labels(task, &train_rows)), args.seed, false)?
    } else {
        bundle
    };
    let labels = bundle.label_map();
    let tok = bundle.tokenizer(Some(args.max_len))?;
    let train = to_dataset_partial(
        &train_rows,
        &labels,
        &tok,
        &train_path.display().to_string(),
    )?;
    let eval = match (&args.eval, &eval_rows) {
        (Some(e), Some(rows)) => Some(to_dataset_partial(
            rows,
            &labels,
            &tok,
            &e.display().to_string(),
        )?),
        _ => None,
    };
    let teacher = match (&args.teacher, distill) {
        (Some(t), true) => {
            let tb = ModelArgs {
                model: t.clone(),
                revision: None,
                threads: None,
            }
            .load(None, args.seed, true)
            .with_context(|| format!("--teacher `{t}`"))?;
            // Its own head, as saved: a head sized to our labels would be a random one.
            if tb.head_initialised {
                bail!("--teacher `{t}`: it has no trained classification head to distil from");
            }
            if tb.label_map().names() != labels.names() {
                bail!(
                    "--teacher `{t}`: its labels {:?} are not the model's {:?}",
                    tb.label_map().names(),
                    labels.names()
                );
            }
            Some(Box::new(tb.model) as Box<dyn QuantModel>)
        }
        // Hidden states need the teacher beside the student at every step: a float copy of the
        // model as loaded (its logits are the same as the student's before the first stage).
        (None, true) if args.distill == DistillMode::Hidden => {
            Some(Box::new(args.model.load(None, args.seed, true)?.model) as Box<dyn QuantModel>)
        }
        _ => None,
    };
    let meta = qnz_metadata(&bundle);
    let data = IpqData {
        train,
        eval,
        teacher,
    };
    ipq_stages_and_export(args, &mut bundle.model, data, &plan, &meta)
}

/// Says how many rows of `path` carry no label (they train on the teacher's logits alone).
pub(crate) fn say_unlabelled(path: &std::path::Path, rows: &[TextExample]) {
    let n = rows.iter().filter(|r| r.label.is_none()).count();
    if n > 0 {
        eprintln!(
            "qn: {n} of {} rows of `{}` have no label: they train on the teacher's logits alone, \
             and a check on them measures agreement with the teacher",
            rows.len(),
            path.display()
        );
    }
}

/// Tokenized rows, unlabelled ones with the class [`NO_LABEL`].
fn to_dataset_partial(
    rows: &[TextExample],
    labels: &LabelMap,
    tok: &TextTokenizer,
    file: &str,
) -> Result<Dataset> {
    qn_models::text::to_dataset_partial(rows, labels, tok, file, &Device::Cpu)
        .with_context(|| format!("dataset `{file}`"))
}

/// The data of an iPQ compression: the training rows (some may be [`NO_LABEL`]), the `--eval` rows
/// if given, and a teacher other than the model itself.
pub(crate) struct IpqData {
    pub train: Dataset,
    pub eval: Option<Dataset>,
    pub teacher: Option<Box<dyn QuantModel>>,
}

/// `--plan` (a TOML file) or `default`, every stage's length set by `--steps` when given, checked.
pub(crate) fn stage_plan(
    args: &CompressArgs,
    default: impl FnOnce() -> Result<StagePlan>,
) -> Result<StagePlan> {
    let mut plan = match &args.plan {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read the plan", p.display()))?;
            StagePlan::from_toml(&text).with_context(|| p.display().to_string())?
        }
        None => default()?,
    };
    if let Some(c) = args.codebook {
        plan.int8_centroids = c == Codebook::Int8;
    }
    if let Some(s) = args.steps {
        for st in &mut plan.stages {
            st.steps = Some(s as usize);
            st.epochs = None;
        }
    }
    if args.final_steps > 0 {
        let mut all = StagePlan::float(args.final_steps as usize).stages.remove(0);
        all.name = "all".into();
        plan.stages.push(all);
    }
    plan.validate()?;
    Ok(plan)
}

/// `metadata` and the plan that made the file (key `stage_plan`, as TOML).
fn with_plan(metadata: &[(String, String)], plan: &StagePlan) -> Result<Vec<(String, String)>> {
    let mut out = metadata.to_vec();
    out.push((
        "stage_plan".into(),
        toml::to_string(plan).context("the stage plan as TOML")?,
    ));
    Ok(out)
}

/// With `--target-size` / `--target-ratio`: the plan with each layer's block size and centroids
/// chosen to fit ([`qn_train::trainer::budget`]), computed once and kept in the work directory
/// (a rerun with the same settings reads it back); else `None`.
#[allow(clippy::too_many_arguments)]
fn bit_budget(
    args: &CompressArgs,
    model: &mut dyn QuantModel,
    plan: &StagePlan,
    cfg: &TrainConfig,
    train: &Dataset,
    codebook: CodebookKind,
    metadata: &[(String, String)],
    work: &std::path::Path,
) -> Result<Option<StagePlan>> {
    let mut size_of = |m: &dyn QuantModel,
                       p: &StagePlan,
                       planned: &std::collections::BTreeMap<String, (usize, usize)>|
     -> qn_train::Result<u64> {
        let meta = with_plan(metadata, p).map_err(|e| qn_train::Error::Config {
            field: "stage plan".into(),
            reason: e.to_string(),
        })?;
        planned_size(m, codebook, &meta, planned)
    };
    let target = match (args.target_size, args.target_ratio) {
        (Some(bytes), _) => bytes,
        (None, Some(r)) => {
            let full = size_of(&*model, plan, &Default::default())?;
            let t = (full as f64 / r).floor() as u64;
            eprintln!("qn: --target-ratio {r}: {t} bytes (the model uncompressed is {full} bytes)");
            t
        }
        (None, None) => return Ok(None),
    };
    let opts = BudgetOptions {
        block_sizes: args
            .budget_block_sizes
            .iter()
            .map(|&v| v as usize)
            .collect(),
        centroids: args.budget_centroids.iter().map(|&v| v as usize).collect(),
        codebook,
        // A probe ranks choices; it needs no more iterations than the stages' k-means.
        probe_iters: (args.kmeans_iters as usize).min(BudgetOptions::default().probe_iters),
        sensitivity: match args.budget_sensitivity {
            BudgetSensitivity::Fisher => Sensitivity::Fisher { batches: 8 },
            BudgetSensitivity::Relative => Sensitivity::Relative,
        },
        ..BudgetOptions::default()
    };
    let key = serde_json::json!({
        "target": target,
        "options": opts,
        "plan": plan,
        "calibration": cfg.calibration_rows,
        "calibrate_embeddings": cfg.calibrate_embeddings,
        "seed": cfg.seed,
        "rows": train.len(),
    });
    let cache = work.join("budget.json");
    let cached: Option<BudgetPlan> = std::fs::read(&cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|v| v.get("key") == Some(&key))
        .and_then(|v| serde_json::from_value(v["budget"].clone()).ok());
    let budget = match cached {
        Some(b) => {
            eprintln!(
                "qn: bit budget: the plan chosen before, read from `{}`",
                cache.display()
            );
            b
        }
        None => {
            let probe_cfg = TrainConfig {
                progress: true,
                ..cfg.clone()
            };
            let b = plan_for_budget(model, plan, target, &opts, &probe_cfg, train, &mut size_of)
                .context("--target-size / --target-ratio")?;
            let json = serde_json::to_vec(&serde_json::json!({"key": key, "budget": b}))?;
            qn_format::write_atomic(&cache, |f| std::io::Write::write_all(f, &json))?;
            b
        }
    };
    eprintln!(
        "qn: bit budget: {} bytes asked, {} planned ({:+.2} %); the plan (stored in the file):\n{}",
        budget.target_bytes,
        budget.planned_bytes,
        100.0 * (budget.planned_bytes as f64 / budget.target_bytes as f64 - 1.0),
        budget.to_toml()?
    );
    if (budget.planned_bytes as f64) < 0.99 * budget.target_bytes as f64 {
        eprintln!(
            "qn: warning: the plan lands {:.1} % under the target: no choice among the candidates \
             (--budget-block-sizes, --budget-centroids) fills it",
            100.0 * (1.0 - budget.planned_bytes as f64 / budget.target_bytes as f64)
        );
    }
    Ok(Some(budget.plan))
}

/// A seeded draw of `k` rows of `data` held out: `(the rest, the held-out rows)`, both in their
/// original order. Refused when no row would be left to train on.
fn hold_out(data: &Dataset, k: usize, seed: u64) -> Result<(Dataset, Dataset)> {
    let n = data.len();
    if k >= n {
        bail!("--check-rows {k}: the training data holds {n} rows; hold out fewer, or give --eval");
    }
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_C4EC_0000_0001));
    let (mut check, mut rest) = (order[..k].to_vec(), order[k..].to_vec());
    check.sort_unstable();
    rest.sort_unstable();
    let pick = |v: Vec<u32>| -> Result<Dataset> {
        let len = v.len();
        Ok(data.select(&Tensor::from_vec(v, len, data.x.device())?)?)
    };
    Ok((pick(rest)?, pick(check)?))
}

/// Replaces the [`NO_LABEL`] classes of `data` by the teacher's predictions.
fn fill_labels(data: &mut Dataset, logits: &Tensor) -> Result<usize> {
    let y = data.y.to_vec1::<u32>()?;
    let missing = y.iter().filter(|&&v| v == NO_LABEL).count();
    if missing == 0 {
        return Ok(0);
    }
    let pred = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
    let y: Vec<u32> = y
        .iter()
        .zip(pred)
        .map(|(&v, p)| if v == NO_LABEL { p } else { v })
        .collect();
    let n = y.len();
    data.y = Tensor::from_vec(y, n, data.y.device())?;
    Ok(missing)
}

/// The work directory of an iPQ compression: `--work-dir`, else `<output>.work`.
fn work_dir(args: &CompressArgs) -> PathBuf {
    args.work_dir.clone().unwrap_or_else(|| {
        let mut p = args.output.clone().into_os_string();
        p.push(".work");
        PathBuf::from(p)
    })
}

/// Runs (or resumes, from the work directory) the iPQ stages of `plan` on `model` and writes the
/// `.qnz` with `metadata`: the part of `qn compress` that does not depend on the model kind.
///
/// Without `--eval` the stage checks use `--check-rows` training rows that no stage trains on;
/// with distillation the teacher's logits of the training rows are computed once and cached in
/// the work directory (a resumed run reads them back).
pub(crate) fn ipq_stages_and_export(
    args: &CompressArgs,
    model: &mut dyn QuantModel,
    data: IpqData,
    plan: &StagePlan,
    metadata: &[(String, String)],
) -> Result<()> {
    let work = work_dir(args);
    let (mut train, mut eval, check_what) = match data.eval {
        Some(e) => {
            let what = format!(
                "`{}` ({} rows)",
                args.eval
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string()),
                e.len()
            );
            (data.train, e, what)
        }
        None => {
            let k = args
                .check_rows
                .map_or((data.train.len() / 10).clamp(1, 500), |k| k as usize);
            let (t, c) = hold_out(&data.train, k, args.seed)?;
            (t, c, format!("{k} held-out training rows"))
        }
    };
    let distill = (args.distill != DistillMode::None).then_some(Distill {
        alpha: args.distill_alpha,
        temperature: args.temperature,
    });
    if distill.is_none()
        && [&train, &eval]
            .iter()
            .any(|d| d.y.to_vec1::<u32>().is_ok_and(|y| y.contains(&NO_LABEL)))
    {
        bail!("--distill none fine-tunes on the labels: every row needs one");
    }
    // Made only once the data is known to be usable: a refused command leaves nothing behind.
    std::fs::create_dir_all(&work).with_context(|| format!("--work-dir `{}`", work.display()))?;
    if let Some(d) = &distill {
        d.validate()?;
        let teacher: &dyn QuantModel = match &data.teacher {
            Some(t) => t.as_ref(),
            None => &*model,
        };
        // Only the rows the stages will draw: a short compression of a large set reads few.
        let steps: usize = plan
            .stages
            .iter()
            .map(|s| s.total_steps(train.len(), args.batch_size as usize))
            .sum::<qn_train::Result<usize>>()?;
        let rows = train.rows_drawn(steps, args.batch_size as usize, args.seed)?;
        let (logits, cached) =
            cached_teacher_logits(teacher, &train, Some(&rows), Some(&work), 64)?;
        eprintln!(
            "qn: distilling from {} (its logits of the {} training rows the stages draw {}; T = {}, alpha = {})",
            args.teacher
                .as_deref()
                .map_or("the uncompressed model".to_string(), |t| format!("`{t}`")),
            rows.len(),
            if cached {
                "read from the work directory"
            } else {
                "computed"
            },
            d.temperature,
            d.alpha,
        );
        fill_labels(&mut train, &logits)?;
        train = train.with_teacher(logits)?;
        let check_logits = qn_train::distill::teacher_logits(teacher, &eval, 64)?;
        fill_labels(&mut eval, &check_logits)?;
    }
    let uncompressed = accuracy(&*model, &eval, 256)?;
    let cfg = TrainConfig {
        lr: args.lr,
        batch_size: args.batch_size as usize,
        seed: args.seed,
        progress: true,
        checkpoint_every: 50,
        kmeans_iters: args.kmeans_iters as usize,
        recalibrate_batches: args.bn_recalibrate as usize,
        recalibrate_always: args.bn_recalibrate > 0,
        distill,
        centroid_lr: args.centroid_lr,
        calibration_rows: args.calibration as usize,
        calibrate_embeddings: args.calibrate_embeddings,
        hidden_distill: if args.distill == DistillMode::Hidden {
            args.hidden_weight
        } else {
            0.0
        },
        ..TrainConfig::default()
    };
    cfg.validate()?;
    let codebook = if plan.int8_centroids {
        CodebookKind::Int8
    } else {
        CodebookKind::F16
    };
    let budgeted = bit_budget(args, model, plan, &cfg, &train, codebook, metadata, &work)?;
    let plan = budgeted.as_ref().unwrap_or(plan);
    let metadata = with_plan(metadata, plan)?;
    eprintln!(
        "qn: the stage checks use {check_what}: {:.2} % before compression",
        uncompressed * 100.0
    );
    let out = RunOutput {
        dir: Some(work.clone()),
        stop_at: None,
        cancel: Some(interrupt::cancel_flag()),
    };
    let report = run_stages_with_teacher(
        model,
        data.teacher.as_deref(),
        &train,
        &eval,
        plan,
        &cfg,
        &out,
    )?;
    interrupt::check(&report, &work)?;
    for w in &report.warnings {
        eprintln!("qn: warning: {w}");
    }
    let bytes = export_qnz_with(&*model, &args.output, codebook, &metadata)?;
    // The default checkpoints only serve a rerun of an unfinished compression; a `--work-dir`
    // the user named is theirs to keep.
    if args.work_dir.is_none() {
        if let Err(e) = std::fs::remove_dir_all(&work) {
            eprintln!(
                "qn: warning: could not remove the stage checkpoints `{}`: {e}",
                work.display()
            );
        }
    }
    println!(
        "compressed with {} stages ({} steps); accuracy after each stage {:?} on {check_what}; \
         the file: {:.2} % against {:.2} % uncompressed; wrote {} ({bytes} bytes)",
        plan.stages.len(),
        report.steps,
        report
            .stage_accuracy
            .iter()
            .map(|a| format!("{:.2} %", a * 100.0))
            .collect::<Vec<_>>(),
        report.stage_accuracy.last().copied().unwrap_or(f64::NAN) * 100.0,
        uncompressed * 100.0,
        args.output.display()
    );
    Ok(())
}
