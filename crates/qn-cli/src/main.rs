//! `qn` — compress models with quantization noise.
//!
//! ```text
//! qn quantize model.safetensors -o model.qnz --method pq --block-size 8 --centroids 256
//! qn inspect model.qnz [--json]
//! qn decompress model.qnz -o restored.safetensors
//! qn train-mlp -o runs/mlp [--plan ipq.toml] [--epochs 1 | --max-steps N] [--stop-at N] [--noise block:p=0.1]
//! qn demo [--weights FILE.safetensors]
//! qn finetune --model <dir|hub-id> --train train.tsv --eval dev.tsv --task sst2 --noise block:p=0.1 -o run/
//! qn compress --model run/ --train train.tsv --task sst2 [--method ipq|int8|int4] -o model.qnz
//! qn eval --model model.qnz --data dev.tsv --task sst2 [--json]
//! qn predict --model model.qnz --text "…" [--text-pair "…"] [--json]
//! qn embed --model <dir|hub-id|.qnz> --text "…" [--json]
//! qn decompress model.qnz -o hf-dir/
//! ```
//!
//! Errors are one line naming the file and tensor at fault, with exit code 1 (2 for bad usage);
//! outputs are written atomically, so a failed run never leaves a partial file. Ctrl-C stops a
//! training command after its current step with a checkpoint (exit 130); rerunning it continues.

mod args;
mod decompress;
mod demo;
mod encoder;
mod input;
mod inspect;
mod interrupt;
mod quantize;
mod rules;
mod train;
mod vision;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qn",
    version,
    about = "Extreme model compression with quantization noise"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compress a safetensors file to .qnz (int-N or PQ per tensor).
    Quantize(quantize::QuantizeArgs),
    /// Show where the bytes of a .qnz file go.
    Inspect(inspect::InspectArgs),
    /// Write the dequantized weights of a .qnz file as safetensors.
    Decompress(decompress::DecompressArgs),
    /// Train the reference quant-noise MLP on Fashion-MNIST with iPQ stages, resumable.
    TrainMlp(train::TrainArgs),
    /// Quantize real weight matrices with int8, int4 and PQ and print a rate/distortion table.
    Demo(demo::DemoArgs),
    /// Fine-tune a BERT-family encoder (directory or hub id) on a text task with quant noise.
    Finetune(encoder::finetune::FinetuneArgs),
    /// Compress an encoder to a self-contained .qnz: iPQ with centroid fine-tuning, or int8/int4.
    Compress(encoder::compress::CompressArgs),
    /// Accuracy of an encoder (directory, hub id or .qnz) on labelled TSV data.
    Eval(encoder::eval::EvalArgs),
    /// Label and probabilities for texts.
    Predict(encoder::predict::PredictArgs),
    /// Mean-pooled, L2-normalised sentence embeddings.
    Embed(encoder::predict::EmbedArgs),
}

fn main() -> std::process::ExitCode {
    // Every command repeats the same large allocations (training steps, batches, a PQ layer
    // decoded per call): freed memory stays in the heap instead of being unmapped and faulted
    // back in. The peak footprint is the same (measured: BENCHMARKS.md).
    qn_train::allocator::retain_freed_memory();
    let cli = Cli::parse();
    if let Some(v) = std::env::var_os("QN_SIMD") {
        let v = v.to_string_lossy();
        if qn_kernels::simd::parse_level(&v).is_none() {
            eprintln!("qn: error: QN_SIMD: `{v}` is not one of baseline, avx2, avx512");
            return std::process::ExitCode::from(2);
        }
    }
    let result = match cli.command {
        Command::Quantize(args) => quantize::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Decompress(args) => decompress::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::TrainMlp(args) => train::run(&args),
        Command::Finetune(args) => encoder::finetune::run(&args),
        Command::Compress(args) => encoder::compress::run(&args),
        Command::Eval(args) => encoder::eval::run(&args),
        Command::Predict(args) => encoder::predict::run_predict(&args),
        Command::Embed(args) => encoder::predict::run_embed(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<interrupt::Interrupted>().is_some() => {
            eprintln!("qn: {e}");
            std::process::ExitCode::from(interrupt::EXIT_INTERRUPTED)
        }
        Err(e) => {
            eprintln!("qn: error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error chain on one line, one context per level: a cause whose text the line already holds
/// (a library error that names its source in its own message) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        if line.contains(text.trim()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text.trim());
    }
    line
}
