//! `qn predict` (label and probabilities) and `qn embed` (sentence embeddings) for texts given on
//! the command line or in a file.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{Device, D};
use qn_models::encoder::pack_batch;
use qn_train::QuantModel;

use super::{parse_max_len, texts, ModelArgs};

/// Texts to run on, shared by `predict` and `embed`.
#[derive(clap::Args, Debug)]
pub struct TextArgs {
    /// A text (repeat for more).
    #[arg(long)]
    text: Vec<String>,
    /// The second sentence of a pair, one per --text.
    #[arg(long)]
    text_pair: Vec<String>,
    /// A file with one text per line (a tab separates a pair).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Truncate inputs to this many tokens (default: the model's limit decides).
    #[arg(long, value_parser = parse_max_len)]
    max_len: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Texts per forward pass (memory grows with it: activations, not weights, dominate the
    /// footprint of a compressed model).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=65_536), allow_negative_numbers = true)]
    batch_size: u64,
}

/// Arguments of `qn predict`.
#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    input: TextArgs,
    /// An image (PNG/JPEG) for an image model (repeat for more): prints the top-5 classes.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// EfficientNet variant (b0..b7, lite0..lite4; default: inferred from the weights).
    #[arg(long)]
    variant: Option<String>,
    /// Input resolution (default: the variant's).
    #[arg(long)]
    image_size: Option<usize>,
}

/// Arguments of `qn embed`.
#[derive(clap::Args, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    input: TextArgs,
}

/// Runs `qn predict`.
pub fn run_predict(args: &PredictArgs) -> Result<()> {
    args.model.apply_threads();
    let t = &args.input;
    if !args.image.is_empty() {
        if !t.text.is_empty() || t.input.is_some() {
            anyhow::bail!(
                "--image and --text/--input do not mix: one model reads one kind of input"
            );
        }
        return crate::vision::predict_images(
            &args.model.model,
            &args.image,
            args.variant.as_deref(),
            args.image_size,
            t.json,
        );
    }
    let inputs = texts(&t.text, &t.text_pair, &t.input)?;
    let bundle = args.model.load_for_inference(false)?;
    let tok = bundle.tokenizer(t.max_len)?;
    let mut results = Vec::new();
    for chunk in inputs.chunks(t.batch_size as usize) {
        let rows = chunk
            .iter()
            .map(|(a, b)| tok.encode(a, b.as_deref()))
            .collect::<qn_models::Result<Vec<_>>>()?;
        let x = pack_batch(&rows, tok.pad_id(), &Device::Cpu)?;
        let logits = bundle.model.forward_t(&x, false)?;
        let probs = softmax_rows(&logits)?;
        for (l, p) in logits.to_vec2::<f32>()?.into_iter().zip(probs) {
            let best = p
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap_or(0);
            results.push((l, p, best));
        }
    }
    let one = |(i, (l, p, best)): (usize, &(Vec<f32>, Vec<f32>, usize))| {
        serde_json::json!({
            "text": inputs[i].0,
            "text_pair": inputs[i].1,
            "label": bundle.labels[*best],
            "label_id": best,
            "logits": l,
            "probs": p,
        })
    };
    if t.json {
        let j = if results.len() == 1 {
            one((0, &results[0]))
        } else {
            serde_json::json!({ "predictions": results.iter().enumerate().map(one).collect::<Vec<_>>() })
        };
        println!("{j}");
    } else {
        for (i, (_, p, best)) in results.iter().enumerate() {
            println!("{}\t{:.4}\t{}", bundle.labels[*best], p[*best], inputs[i].0);
        }
    }
    Ok(())
}

fn softmax_rows(logits: &candle_core::Tensor) -> Result<Vec<Vec<f32>>> {
    let m = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .to_vec2::<f32>()?)
}

/// Runs `qn embed`.
pub fn run_embed(args: &EmbedArgs) -> Result<()> {
    args.model.apply_threads();
    let t = &args.input;
    let inputs = texts(&t.text, &t.text_pair, &t.input)?;
    // Embedding needs no head: the warning about initialising one is noise here.
    let bundle = args.model.load_for_inference(true)?;
    let tok = bundle.tokenizer(t.max_len)?;
    let mut all: Vec<Vec<f32>> = Vec::new();
    for chunk in inputs.chunks(t.batch_size as usize) {
        let rows = chunk
            .iter()
            .map(|(a, b)| tok.encode(a, b.as_deref()))
            .collect::<qn_models::Result<Vec<_>>>()?;
        let x = pack_batch(&rows, tok.pad_id(), &Device::Cpu)?;
        all.extend(bundle.embed(&x)?.to_vec2::<f32>()?);
    }
    if t.json {
        let j = if all.len() == 1 {
            serde_json::json!({ "embedding": all[0], "dim": all[0].len() })
        } else {
            serde_json::json!({ "embeddings": all, "dim": all[0].len() })
        };
        println!("{j}");
    } else {
        for (e, (text, _)) in all.iter().zip(&inputs) {
            let head: Vec<String> = e.iter().take(8).map(|v| format!("{v:.4}")).collect();
            println!("[{} …] ({} dims)\t{text}", head.join(", "), e.len());
        }
    }
    Ok(())
}
