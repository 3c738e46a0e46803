//! `qn eval`: accuracy (and F1 of class 1 for two-class tasks) of a model on a labelled TSV file.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor};
use qn_train::QuantModel;

use super::{parse_any_task, parse_max_len, read_data, to_dataset, AnyTask, ModelArgs};
use crate::args::parse_positive_count;

/// Arguments of `qn eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Labelled data (TSV).
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Data layout: sst2, rte or tsv; idx for (Fashion-)MNIST images (the data paths are then
    /// directories holding `train-*` / `t10k-*` IDX files); imagefolder for `<dir>/<class>/<image>`
    /// trees (png/jpg).
    #[arg(long, value_parser = parse_any_task)]
    pub(crate) task: AnyTask,
    /// Image models: input resolution (default 64 for idx).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(8..=1024), allow_negative_numbers = true)]
    pub(crate) image_size: u64,
    /// Truncate inputs to this many tokens.
    #[arg(long, default_value_t = 128, value_parser = parse_max_len)]
    pub(crate) max_len: usize,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536), allow_negative_numbers = true)]
    pub(crate) batch_size: u64,
    /// Evaluate a seeded subset of this many rows.
    #[arg(long, value_parser = parse_positive_count, allow_negative_numbers = true)]
    pub(crate) max_examples: Option<u64>,
    /// Seed of the subset.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Print one JSON object: accuracy (a fraction), examples, seconds (and f1).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Predicted class indices of a packed dataset, `batch` rows at a time.
pub fn predict_all(model: &dyn QuantModel, x: &Tensor, batch: usize) -> Result<Vec<u32>> {
    let n = x.dim(0)?;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(batch) {
        let len = batch.min(n - start);
        let logits = model.forward_t(&x.narrow(0, start, len)?, false)?;
        out.extend(logits.argmax(1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?);
    }
    Ok(out)
}

/// Runs `qn eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    args.model.apply_threads();
    let task = match args.task {
        AnyTask::Text(t) => t,
        AnyTask::Idx | AnyTask::ImageFolder => return crate::vision::eval_images(args),
    };
    let rows = read_data(
        &args.data,
        task,
        args.max_examples.map(|n| n as usize),
        args.seed,
    )?;
    let start = Instant::now();
    let bundle = args.model.load_for_inference(false)?;
    let tok = bundle.tokenizer(Some(args.max_len))?;
    let data = to_dataset(&rows, &bundle.label_map(), &tok, &args.data)?;
    let pred = predict_all(&bundle.model, &data.x, args.batch_size as usize)?;
    let gold = data.y.to_vec1::<u32>()?;
    let correct = pred.iter().zip(&gold).filter(|(p, g)| p == g).count();
    let accuracy = correct as f64 / gold.len() as f64;
    let f1 = (bundle.labels.len() == 2).then(|| {
        let tp = pred
            .iter()
            .zip(&gold)
            .filter(|(p, g)| **p == 1 && **g == 1)
            .count() as f64;
        let fp = pred
            .iter()
            .zip(&gold)
            .filter(|(p, g)| **p == 1 && **g == 0)
            .count() as f64;
        let fneg = pred
            .iter()
            .zip(&gold)
            .filter(|(p, g)| **p == 0 && **g == 1)
            .count() as f64;
        if tp == 0.0 {
            0.0
        } else {
            2.0 * tp / (2.0 * tp + fp + fneg)
        }
    });
    let seconds = start.elapsed().as_secs_f64();
    if args.json {
        let mut j = serde_json::json!({
            "accuracy": accuracy,
            "examples": gold.len(),
            "correct": correct,
            "seconds": seconds,
            "model": args.model.model,
        });
        if let Some(f) = f1 {
            j["f1"] = f.into();
        }
        println!("{j}");
    } else {
        print!(
            "accuracy {:.2} % ({correct}/{} examples)",
            accuracy * 100.0,
            gold.len()
        );
        if let Some(f) = f1 {
            print!(", F1 {:.2} %", f * 100.0);
        }
        println!(" in {seconds:.1} s");
    }
    Ok(())
}
