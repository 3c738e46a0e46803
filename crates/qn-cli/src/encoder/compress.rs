//! `qn compress`: an encoder to a self-contained `.qnz` — by default iterative PQ with centroid
//! fine-tuning on the task data (the paper's RoBERTa schedule), or post-training int8/int4.
//!
//! The iPQ stages checkpoint into `--work-dir` (default `<output>.work`, removed once the file is
//! written), so an interrupted compression resumes when rerun; Ctrl-C stops it after the current
//! step with a checkpoint (exit 130). The `.qnz` carries the config,
//! label map and tokenizer files.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use qn_format::header::CodebookKind;
use qn_kernels::scalar::{Granularity, ObserverKind, ScalarConfig, Scheme};
use qn_models::bundle::qnz_metadata;
use qn_train::data::Dataset;
use qn_train::trainer::{export_qnz_with, run_stages, RunOutput, StagePlan, TrainConfig};
use qn_train::QuantModel;

use super::{
    parse_any_task, parse_max_len, read_data, task_labels, to_dataset, AnyTask, ModelArgs,
};
use crate::args::{parse_positive_count, parse_positive_f64};
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

/// Arguments of `qn compress`.
#[derive(clap::Args, Debug)]
pub struct CompressArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Training data for the centroid fine-tuning (TSV; iPQ only).
    #[arg(long)]
    pub(crate) train: Option<PathBuf>,
    /// Data checked at the end of each stage (default: 256 training rows).
    #[arg(long)]
    pub(crate) eval: Option<PathBuf>,
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
    /// Fine-tuning steps of every stage (overrides the plan's).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000), allow_negative_numbers = true)]
    pub(crate) steps: Option<u64>,
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
    let train_rows = read_data(
        train_path,
        task,
        args.max_examples.map(|n| n as usize),
        args.seed,
    )?;
    let eval_rows = match &args.eval {
        Some(e) => read_data(e, task, None, args.seed)?,
        None => train_rows.iter().take(256).cloned().collect(),
    };
    let bundle = args.model.load(None, args.seed, true)?;
    // The model's own labels when it has a trained head; else the task's, on a seeded head.
    let mut bundle = if bundle.head_initialised {
        args.model
            .load(Some(task_labels(task, &train_rows)), args.seed, false)?
    } else {
        bundle
    };
    let labels = bundle.label_map();
    let tok = bundle.tokenizer(Some(args.max_len))?;
    let train = to_dataset(&train_rows, &labels, &tok, train_path)?;
    let eval_file = args.eval.clone().unwrap_or_else(|| train_path.clone());
    let eval = to_dataset(&eval_rows, &labels, &tok, &eval_file)?;
    let meta = qnz_metadata(&bundle);
    ipq_stages_and_export(args, &mut bundle.model, &train, &eval, &plan, &meta)
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
    plan.validate()?;
    Ok(plan)
}

/// Runs (or resumes, from the work directory) the iPQ stages of `plan` on `model` and writes the
/// `.qnz` with `metadata`: the part of `qn compress` that does not depend on the model kind.
pub(crate) fn ipq_stages_and_export(
    args: &CompressArgs,
    model: &mut dyn QuantModel,
    train: &Dataset,
    eval: &Dataset,
    plan: &StagePlan,
    metadata: &[(String, String)],
) -> Result<()> {
    let cfg = TrainConfig {
        lr: args.lr,
        batch_size: args.batch_size as usize,
        seed: args.seed,
        progress: true,
        checkpoint_every: 50,
        kmeans_iters: args.kmeans_iters as usize,
        recalibrate_batches: args.bn_recalibrate as usize,
        recalibrate_always: args.bn_recalibrate > 0,
        ..TrainConfig::default()
    };
    cfg.validate()?;
    let work = args.work_dir.clone().unwrap_or_else(|| {
        let mut p = args.output.clone().into_os_string();
        p.push(".work");
        PathBuf::from(p)
    });
    std::fs::create_dir_all(&work).with_context(|| format!("--work-dir `{}`", work.display()))?;
    let out = RunOutput {
        dir: Some(work.clone()),
        stop_at: None,
        cancel: Some(interrupt::cancel_flag()),
    };
    let report = run_stages(model, train, eval, plan, &cfg, &out)?;
    interrupt::check(&report, &work)?;
    for w in &report.warnings {
        eprintln!("qn: warning: {w}");
    }
    let codebook = if plan.int8_centroids {
        CodebookKind::Int8
    } else {
        CodebookKind::F16
    };
    let bytes = export_qnz_with(&*model, &args.output, codebook, metadata)?;
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
        "compressed with {} stages ({} steps); accuracy after each stage {:?}; wrote {} ({bytes} bytes)",
        plan.stages.len(),
        report.steps,
        report
            .stage_accuracy
            .iter()
            .map(|a| format!("{:.2} %", a * 100.0))
            .collect::<Vec<_>>(),
        args.output.display()
    );
    Ok(())
}
