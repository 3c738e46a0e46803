//! `qn demo`: int8, int4 and PQ on real weights, one table.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use qn_kernels::{
    layout::BlockLayout,
    pq::{self, KMeansConfig},
    relative_mse,
    scalar::{self, Granularity, ObserverKind, ScalarConfig},
};

/// Arguments of `qn demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// A safetensors file whose 2-D tensors are quantized (default: the all-MiniLM-L6-v2 layer in
    /// assets/).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Seed of the k-means initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

struct Row {
    method: String,
    bits: f64,
    rel_mse: f64,
    millis: f64,
}

fn scalar_row(w: &Tensor, name: &str, cfg: ScalarConfig) -> Result<Row> {
    let start = Instant::now();
    let params = scalar::observe(w, &cfg)?;
    let q = scalar::quantize(w, &params)?;
    let back = scalar::dequantize(&q)?;
    let millis = start.elapsed().as_secs_f64() * 1e3;
    let numel = w.elem_count() as f64;
    // Codes plus one f32 scale and one u8 zero point per parameter slot.
    let bits = cfg.bits as f64 + params.view.n_params() as f64 * 40.0 / numel;
    let observer = match cfg.observer {
        ObserverKind::MinMax => "min-max",
        ObserverKind::Histogram { .. } => "histogram",
    };
    Ok(Row {
        method: format!("int{} per-channel {observer}", cfg.bits),
        bits,
        rel_mse: relative_mse(w, &back).with_context(|| format!("tensor {name}"))?,
        millis,
    })
}

fn pq_row(w: &Tensor, name: &str, d: usize, k: usize, seed: u64) -> Result<Row> {
    let layout = BlockLayout::linear(name, w.dims(), d)?;
    let start = Instant::now();
    let codes = pq::encode(
        w,
        &layout,
        &KMeansConfig::new(k).with_seed(seed),
        &mut |_| {},
    )?;
    let back = codes.decode()?;
    let millis = start.elapsed().as_secs_f64() * 1e3;
    // Index bits plus an f16 codebook.
    let bits = codes.index_bits_per_weight() + (k * d * 16) as f64 / w.elem_count() as f64;
    Ok(Row {
        method: format!("PQ d={d} K={k}"),
        bits,
        rel_mse: relative_mse(w, &back)?,
        millis,
    })
}

fn default_weights() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/minilm-l6-layer0.safetensors")
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    let path = args.weights.clone().unwrap_or_else(default_weights);
    let path = path.canonicalize().unwrap_or(path);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("{}: cannot read as safetensors", path.display()))?;
    let mut names: Vec<&String> = tensors.keys().filter(|n| tensors[*n].rank() == 2).collect();
    names.sort();
    if names.is_empty() {
        anyhow::bail!("{}: holds no 2-D tensor to quantize", path.display());
    }
    println!("weights: {}", path.display());
    println!(
        "{:<46} {:<28} {:>10} {:>12} {:>9}",
        "tensor", "method", "bits/w", "rel. MSE", "ms"
    );
    for name in names {
        let w = tensors[name].to_dtype(candle_core::DType::F32)?;
        let per_channel = Granularity::PerChannel { axis: 0 };
        let rows = [
            scalar_row(&w, name, ScalarConfig::int8().with_granularity(per_channel))?,
            scalar_row(&w, name, ScalarConfig::int4().with_granularity(per_channel))?,
            scalar_row(
                &w,
                name,
                ScalarConfig::int4()
                    .with_granularity(per_channel)
                    .with_observer(ObserverKind::HISTOGRAM),
            )?,
            pq_row(&w, name, 4, 256, args.seed)?,
            pq_row(&w, name, 8, 256, args.seed)?,
        ];
        let label = format!("{name} {:?}", w.dims());
        for r in rows {
            println!(
                "{label:<46} {:<28} {:>10.3} {:>12.5} {:>9.1}",
                r.method, r.bits, r.rel_mse, r.millis
            );
        }
    }
    Ok(())
}
