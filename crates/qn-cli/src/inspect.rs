//! `qn inspect`: the size ledger of a `.qnz` file, as a table or JSON.

use std::path::PathBuf;

use anyhow::Result;
use qn_format::Reader;

/// Arguments of `qn inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The `.qnz` file.
    file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `qn inspect`.
pub fn run(args: &InspectArgs) -> Result<()> {
    let reader = Reader::open(&args.file)?;
    let ledger = reader.ledger();
    if args.json {
        let json = serde_json::json!({
            "file": args.file.display().to_string(),
            "total_bytes": ledger.file_bytes,
            "header_bytes": ledger.header_bytes,
            "padding_bytes": ledger.padding_bytes,
            "metadata": reader.header().metadata,
            "tensors": ledger.entries,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!(
        "{:<56} {:<22} {:<18} {:>8} {:>12}",
        "tensor", "method", "shape", "bits/w", "bytes"
    );
    for e in &ledger.entries {
        println!(
            "{:<56} {:<22} {:<18} {:>8.3} {:>12}",
            e.name,
            e.method,
            format!("{:?}", e.shape),
            e.bits_per_weight,
            e.bytes
        );
    }
    let weights: u64 = ledger.entries.iter().map(|e| e.numel).sum();
    println!(
        "total {} bytes = {} in {} tensors + {} header + {} alignment; {:.3} bits per weight over {} weights",
        ledger.file_bytes,
        ledger.record_bytes(),
        ledger.entries.len(),
        ledger.header_bytes,
        ledger.padding_bytes,
        ledger.file_bytes as f64 * 8.0 / weights.max(1) as f64,
        weights
    );
    Ok(())
}
