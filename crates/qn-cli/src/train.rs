//! `qn train-mlp`: train the reference quant-noise MLP on Fashion-MNIST (or MNIST) with a stage plan,
//! then export it as a `.qnz`. Rerunning the same command with the same output resumes; `--stop-at`
//! pauses at a step, and so does Ctrl-C (after the current step, exit 130).
//!
//! Every argument is checked before any data is read: a bad value is a one-line error naming it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use qn_format::header::CodebookKind;
use qn_train::{
    data::fashion_mnist,
    mlp::Mlp,
    trainer::{export_qnz, run_stages, RunOutput, StagePlan, TrainConfig},
    NoiseSpec, QuantModel,
};

use crate::args::{parse_positive_f64, parse_probability_or_spec};
use crate::interrupt;

/// Arguments of `qn train-mlp`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Directory with the four IDX .gz files (default: `$QN_DATA_DIR/data/fashion-mnist`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output directory: checkpoints, metrics.jsonl, model.qnz.
    #[arg(short, long, visible_alias = "out")]
    output: PathBuf,
    /// TOML stage plan (`[[stage]]` tables); default: one float stage of `--epochs` or
    /// `--max-steps`.
    #[arg(long, conflicts_with_all = ["epochs", "max_steps"])]
    plan: Option<PathBuf>,
    /// Length of the default float stage in epochs.
    #[arg(long, value_parser = parse_positive_f64, allow_negative_numbers = true)]
    epochs: Option<f64>,
    /// Length of the run in optimizer steps (the learning-rate schedule spans it; reaching it
    /// finishes the run and writes model.qnz).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000), allow_negative_numbers = true)]
    max_steps: Option<u64>,
    /// Pause at this global step with a checkpoint; rerun with a larger value, or without it, to
    /// continue.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000), allow_negative_numbers = true)]
    stop_at: Option<u64>,
    /// Noise on every layer: none, block:p=0.1[,bs=8], pq:p=0.1[,bs=8,k=256], scalar:bits=8,p=0.5;
    /// a bare number p means block drop at rate p (block sizes default to the paper's per layer).
    #[arg(long, default_value = "0.1", value_parser = parse_probability_or_spec, allow_negative_numbers = true)]
    noise: NoiseSpec,
    /// Hidden width.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_536), allow_negative_numbers = true)]
    hidden: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3, value_parser = parse_positive_f64, allow_negative_numbers = true)]
    lr: f64,
    /// Batch size.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000), allow_negative_numbers = true)]
    batch_size: u64,
    /// Evaluate every N steps (0: only at stage ends).
    #[arg(long, default_value_t = 200, allow_negative_numbers = true)]
    eval_every: usize,
    /// Checkpoint every N steps (0: only at stage ends and pauses).
    #[arg(long, default_value_t = 200, allow_negative_numbers = true)]
    checkpoint_every: usize,
    /// Seed of initialisation, batches and noise.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
}

/// Runs `qn train-mlp`.
pub fn run(args: &TrainArgs) -> Result<()> {
    // Settings first: nothing is read until every argument has been checked.
    let plan = match &args.plan {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read the plan", p.display()))?;
            StagePlan::from_toml(&text).with_context(|| p.display().to_string())?
        }
        None => match (args.max_steps, args.epochs) {
            (Some(n), _) => StagePlan::float(n as usize),
            (None, e) => StagePlan::float_epochs(e.unwrap_or(1.0))?,
        },
    };
    let cfg = TrainConfig {
        lr: args.lr,
        batch_size: args.batch_size as usize,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        seed: args.seed,
        progress: true,
        ..TrainConfig::default()
    };
    cfg.validate()?;
    let mut model = Mlp::seeded(784, args.hidden as usize, 10, args.seed, &Device::Cpu)?;
    let layers = model.layers();
    let all = regex::Regex::new(".").expect("valid regex");
    for l in &layers {
        if let Some(why) = args.noise.skip_reason(l.name(), l.qweight().layout()) {
            eprintln!("qn: warning: {why}");
        }
    }
    qn_train::apply_noise_spec(&layers, &all, |n, l| args.noise.resolve(n, l), args.seed)
        .context("--noise")?;
    let data = match &args.data {
        Some(d) => d.clone(),
        None => match std::env::var_os("QN_DATA_DIR") {
            Some(d) => PathBuf::from(d).join("data/fashion-mnist"),
            None => bail!("no dataset: give --data or set QN_DATA_DIR"),
        },
    };
    let train = fashion_mnist(&data, "train", None, &Device::Cpu)?;
    let test = fashion_mnist(&data, "t10k", None, &Device::Cpu)?;
    let out = RunOutput {
        dir: Some(args.output.clone()),
        stop_at: args.stop_at.map(|s| s as usize),
        cancel: Some(interrupt::cancel_flag()),
    };
    let report = run_stages(&mut model, &train, &test, &plan, &cfg, &out)?;
    interrupt::check(&report, &args.output)?;
    for w in &report.warnings {
        eprintln!("qn: warning: {w}");
    }
    if report.stopped {
        println!(
            "paused at step {}; rerun without --stop-at (or with a larger one) to continue",
            report.steps
        );
        return Ok(());
    }
    let path = args.output.join("model.qnz");
    let codebook = if plan.int8_centroids {
        CodebookKind::Int8
    } else {
        CodebookKind::F16
    };
    let bytes = export_qnz(&model, &path, codebook)?;
    println!(
        "trained {} steps; test accuracy per stage {:?}; wrote {} ({bytes} bytes)",
        report.steps,
        report
            .stage_accuracy
            .iter()
            .map(|a| format!("{:.2} %", a * 100.0))
            .collect::<Vec<_>>(),
        path.display()
    );
    Ok(())
}
