//! `qn` — compress models with quantization noise.
//!
//! For now one command: `qn demo`, which quantizes real weight matrices (shipped in `assets/`) with
//! int8, int4 and product quantization and prints bits per weight, relative MSE and time. The
//! post-training compression commands (`quantize`, `inspect`, `decompress`) come with the format.
//!
//! ```text
//! qn demo [--weights FILE.safetensors] [--seed N]
//! ```

mod demo;

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
    /// Quantize real weight matrices with int8, int4 and PQ and print a rate/distortion table.
    Demo(demo::DemoArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qn: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
