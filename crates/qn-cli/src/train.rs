//! `qn train-mlp`: train the reference quant-noise MLP on Fashion-MNIST (or MNIST) with a stage plan,
//! then export it as a `.qnz`. Rerunning the same command with the same `--out` resumes.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use qn_format::header::CodebookKind;
use qn_train::{
    data::fashion_mnist,
    mlp::Mlp,
    trainer::{export_qnz, run_stages, RunOutput, StagePlan, TrainConfig},
    NoiseConfig, QuantModel,
};

/// Arguments of `qn train-mlp`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Directory with the four IDX .gz files (default: `$QN_DATA_DIR/data/fashion-mnist`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output directory: checkpoints, metrics.jsonl, model.qnz.
    #[arg(long)]
    out: PathBuf,
    /// TOML stage plan (`[[stage]]` tables); default: one float stage.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Length of the default float stage in epochs (ignored with --plan).
    #[arg(long, default_value_t = 1.0)]
    epochs: f64,
    /// Stop after this many steps in all (rerun to continue).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Block-drop noise rate on every layer.
    #[arg(long, default_value_t = 0.1)]
    noise: f64,
    /// Block size of the noise.
    #[arg(long, default_value_t = 4)]
    noise_block: usize,
    /// Hidden width.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Evaluate every N steps.
    #[arg(long, default_value_t = 200)]
    eval_every: usize,
    /// Checkpoint every N steps.
    #[arg(long, default_value_t = 200)]
    checkpoint_every: usize,
    /// Seed of initialisation, batches and noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs `qn train-mlp`.
pub fn run(args: &TrainArgs) -> Result<()> {
    let data = match &args.data {
        Some(d) => d.clone(),
        None => match std::env::var_os("QN_DATA_DIR") {
            Some(d) => PathBuf::from(d).join("data/fashion-mnist"),
            None => bail!("give --data or set QN_DATA_DIR"),
        },
    };
    let train = fashion_mnist(&data, "train", None, &Device::Cpu)
        .with_context(|| format!("{}", data.display()))?;
    let test = fashion_mnist(&data, "t10k", None, &Device::Cpu)
        .with_context(|| format!("{}", data.display()))?;
    let plan = match &args.plan {
        Some(p) => StagePlan::from_toml(
            &std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?,
        )
        .with_context(|| format!("{}", p.display()))?,
        None => StagePlan::from_toml(&format!(
            "[[stage]]\nname = 'float'\nepochs = {}\n",
            args.epochs
        ))?,
    };
    let mut model = Mlp::seeded(784, args.hidden, 10, args.seed, &Device::Cpu)?;
    for (i, l) in model.layers().iter().enumerate() {
        l.set_noise(
            NoiseConfig::BlockDrop {
                p: args.noise,
                block_size: args.noise_block,
            },
            args.seed + i as u64,
        );
    }
    let cfg = TrainConfig {
        lr: args.lr,
        batch_size: args.batch_size,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        seed: args.seed,
        progress: true,
        ..TrainConfig::default()
    };
    let out = RunOutput {
        dir: Some(args.out.clone()),
        stop_after: args.max_steps,
    };
    let report = run_stages(&mut model, &train, &test, &plan, &cfg, &out)?;
    if report.stopped {
        println!(
            "stopped after {} steps; rerun the same command to continue",
            report.steps
        );
        return Ok(());
    }
    let path = args.out.join("model.qnz");
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
