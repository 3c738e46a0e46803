//! `qn finetune`: fine-tune a BERT-family encoder on a text-classification task with quantization
//! noise, writing a Hugging Face directory (config.json with the label map, model.safetensors,
//! the tokenizer files) plus `metrics.jsonl` and checkpoints. Rerunning the command resumes.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use qn_models::hf_dir::write_dir;
use qn_train::data::Dataset;
use qn_train::trainer::{run_stages, RunOutput, RunReport, StagePlan, TrainConfig};
use qn_train::{NoiseSpec, QuantModel};

use super::{
    parse_any_task, parse_max_len, read_data, task_labels, to_dataset, AnyTask, ModelArgs,
};
use crate::args::{parse_positive_count, parse_positive_f64, parse_probability_or_spec};
use crate::interrupt;

/// Arguments of `qn finetune`.
#[derive(clap::Args, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Training data (TSV).
    #[arg(long)]
    pub(crate) train: PathBuf,
    /// Evaluation data (TSV).
    #[arg(long)]
    pub(crate) eval: PathBuf,
    /// Data layout: sst2, rte or tsv; idx for (Fashion-)MNIST images (the data paths are then
    /// directories holding `train-*` / `t10k-*` IDX files); imagefolder for `<dir>/<class>/<image>`
    /// trees (png/jpg).
    #[arg(long, value_parser = parse_any_task)]
    pub(crate) task: AnyTask,
    /// Image models: input resolution (default 64 for idx).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(8..=1024), allow_negative_numbers = true)]
    pub(crate) image_size: u64,
    /// Image models: at the end of every fine-tuning stage this many noise-free training-mode
    /// batches re-estimate the batch-norm statistics, which lag the network (gathered on noised
    /// activations, on the first steps', or still partly the pretrained data's: momentum 0.01)
    /// (0: off; models without batch norm are never touched).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=1_000_000), allow_negative_numbers = true)]
    pub(crate) bn_recalibrate: u64,
    /// Noise: none, block:p=0.1[,bs=8], pq:p=0.1[,bs=8,k=256], scalar:bits=8,p=0.5 (block sizes
    /// default to the paper's per layer kind).
    #[arg(long, default_value = "none", value_parser = parse_probability_or_spec, allow_negative_numbers = true)]
    pub(crate) noise: NoiseSpec,
    /// Regex of the layers that get the noise (default: encoders — the attention and FFN
    /// projections of every encoder layer, as fairseq's RoBERTa; image models — every
    /// convolution and Linear; `.` — every layer, embeddings and head included).
    #[arg(long)]
    pub(crate) noise_layers: Option<String>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4, value_parser = parse_positive_f64, allow_negative_numbers = true)]
    pub(crate) lr: f64,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=65_536), allow_negative_numbers = true)]
    pub(crate) batch_size: u64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096), allow_negative_numbers = true)]
    pub(crate) grad_accum: u64,
    /// Truncate inputs to this many tokens.
    #[arg(long, default_value_t = 128, value_parser = parse_max_len)]
    pub(crate) max_len: usize,
    /// Training length in epochs (default 1, unless --max-steps).
    #[arg(long, value_parser = parse_positive_f64, allow_negative_numbers = true, conflicts_with = "max_steps")]
    pub(crate) epochs: Option<f64>,
    /// Training length in optimizer steps.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000), allow_negative_numbers = true)]
    pub(crate) max_steps: Option<u64>,
    /// Pause at this step with a checkpoint (rerun to continue).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000), allow_negative_numbers = true)]
    pub(crate) stop_at: Option<u64>,
    /// Use a seeded subset of this many training rows.
    #[arg(long, value_parser = parse_positive_count, allow_negative_numbers = true)]
    pub(crate) max_examples: Option<u64>,
    /// Evaluate on a seeded subset of this many rows of `--eval` (default: all of it).
    #[arg(long, value_parser = parse_positive_count, allow_negative_numbers = true)]
    pub(crate) max_eval_examples: Option<u64>,
    /// Warm-up: a fraction of the run (< 1) or a number of steps.
    #[arg(long, default_value_t = 0.06, value_parser = parse_warmup, allow_negative_numbers = true)]
    pub(crate) warmup: f64,
    /// AdamW weight decay (weights only, not biases or LayerNorm).
    #[arg(long, default_value_t = 0.01, value_parser = parse_non_negative, allow_negative_numbers = true)]
    pub(crate) weight_decay: f64,
    /// Leave the embedding tables untrained.
    #[arg(long)]
    pub(crate) freeze_embeddings: bool,
    /// Evaluate every N steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    pub(crate) eval_every: usize,
    /// Checkpoint every N steps (0: at the end and at pauses only).
    #[arg(long, default_value_t = 100)]
    pub(crate) checkpoint_every: usize,
    /// Seed of the head, batches, dropout and noise.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Output directory (a Hugging Face model directory, plus metrics and checkpoints).
    #[arg(short, long, visible_alias = "out")]
    pub(crate) output: PathBuf,
}

fn parse_warmup(s: &str) -> Result<f64, String> {
    let v = parse_non_negative(s)?;
    if v >= 1.0 && v.fract() != 0.0 {
        return Err(format!(
            "{s} is neither a fraction below 1 nor a whole number of steps"
        ));
    }
    Ok(v)
}

fn parse_non_negative(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s} is not a non-negative number")),
    }
}

/// Runs `qn finetune`.
pub fn run(args: &FinetuneArgs) -> Result<()> {
    args.model.apply_threads();
    let task = match args.task {
        AnyTask::Text(t) => t,
        AnyTask::Idx | AnyTask::ImageFolder => return crate::vision::finetune_images(args),
    };
    let (pattern, plan) = check(args, qn_models::encoder::DEFAULT_NOISE_LAYERS)?;
    let train_rows = read_data(
        &args.train,
        task,
        args.max_examples.map(|n| n as usize),
        args.seed,
    )?;
    let eval_rows = read_data(
        &args.eval,
        task,
        args.max_eval_examples.map(|n| n as usize),
        args.seed,
    )?;
    let labels = task_labels(task, &train_rows);
    let mut bundle = args.model.load(Some(labels.clone()), args.seed, false)?;
    let tok = bundle.tokenizer(Some(args.max_len))?;
    let train = to_dataset(&train_rows, &labels, &tok, &args.train)?;
    let eval = to_dataset(&eval_rows, &labels, &tok, &args.eval)?;
    let frozen = args
        .freeze_embeddings
        .then(|| r"\.embeddings\.".to_string());
    let cfg = noise_and_config(args, &pattern, &bundle.model, &plan, train.len(), frozen)?;
    let Some(report) = train_or_pause(args, &mut bundle.model, &train, &eval, &plan, &cfg)? else {
        return Ok(());
    };
    let files = bundle.hf_files()?;
    write_dir(&args.output, &files, true)?;
    println!(
        "fine-tuned {} steps on {} examples; eval accuracy {:.2} % on {} examples; wrote {}",
        report.steps,
        train.len(),
        report.stage_accuracy.last().copied().unwrap_or(f64::NAN) * 100.0,
        eval.len(),
        args.output.display()
    );
    Ok(())
}

/// The checks every fine-tune makes before reading data: the `--noise-layers` regex (the model
/// kind's `default_layers` when not given), the output path, and the run's length as a one-stage
/// float plan.
pub(crate) fn check(
    args: &FinetuneArgs,
    default_layers: &str,
) -> Result<(regex::Regex, StagePlan)> {
    let layers = args.noise_layers.as_deref().unwrap_or(default_layers);
    let pattern = regex::Regex::new(layers).context("--noise-layers")?;
    if args.output.exists() && !args.output.is_dir() {
        bail!(
            "--output `{}` exists and is not a directory",
            args.output.display()
        );
    }
    let plan = match (args.max_steps, args.epochs) {
        (Some(n), _) => StagePlan::float(n as usize),
        (None, e) => StagePlan::float_epochs(e.unwrap_or(1.0))?,
    };
    Ok((pattern, plan))
}

/// Puts `--noise` on the layers `pattern` matches and returns the run's settings (warm-up from
/// the plan's length over `train_len` examples; `frozen`: a regex of variables left untrained).
pub(crate) fn noise_and_config(
    args: &FinetuneArgs,
    pattern: &regex::Regex,
    model: &dyn QuantModel,
    plan: &StagePlan,
    train_len: usize,
    frozen: Option<String>,
) -> Result<TrainConfig> {
    let layers = model.layers();
    for l in layers.iter().filter(|l| pattern.is_match(l.name())) {
        if let Some(why) = args.noise.skip_reason(l.name(), l.qweight().layout()) {
            eprintln!("qn: warning: {why}");
        }
    }
    let touched =
        qn_train::apply_noise_spec(&layers, pattern, |n, l| args.noise.resolve(n, l), args.seed)
            .context("--noise")?;
    if !matches!(args.noise, NoiseSpec::None) {
        if touched.is_empty() {
            bail!("--noise-layers `{}` matches no layer", pattern.as_str());
        }
        eprintln!(
            "qn: noise on {} of {} layers (--noise-layers `{}`)",
            touched.len(),
            layers.len(),
            pattern.as_str()
        );
    }
    let per_step = (args.batch_size * args.grad_accum) as usize;
    let total = plan.stages[0].total_steps(train_len, per_step)?;
    let warmup = if args.warmup < 1.0 {
        (args.warmup * total as f64).round() as usize
    } else {
        args.warmup as usize
    };
    let mut cfg = TrainConfig {
        lr: args.lr,
        warmup,
        batch_size: args.batch_size as usize,
        grad_accum: args.grad_accum as usize,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        seed: args.seed,
        progress: true,
        frozen,
        recalibrate_batches: args.bn_recalibrate as usize,
        ..TrainConfig::default()
    };
    cfg.adamw.weight_decay = args.weight_decay;
    cfg.validate()?;
    Ok(cfg)
}

/// Runs (or resumes) the fine-tune in `--output`; `None` when it paused at `--stop-at` (said so),
/// an [`Interrupted`](interrupt::Interrupted) error when Ctrl-C stopped it.
pub(crate) fn train_or_pause(
    args: &FinetuneArgs,
    model: &mut dyn QuantModel,
    train: &Dataset,
    eval: &Dataset,
    plan: &StagePlan,
    cfg: &TrainConfig,
) -> Result<Option<RunReport>> {
    let out = RunOutput {
        dir: Some(args.output.clone()),
        stop_at: args.stop_at.map(|s| s as usize),
        cancel: Some(interrupt::cancel_flag()),
    };
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("--output `{}`", args.output.display()))?;
    let report = run_stages(model, train, eval, plan, cfg, &out)?;
    interrupt::check(&report, &args.output)?;
    if report.stopped {
        println!(
            "paused at step {}; rerun without --stop-at (or with a larger one) to continue",
            report.steps
        );
        return Ok(None);
    }
    Ok(Some(report))
}
