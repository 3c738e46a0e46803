//! Our side of `cargo xtask bench-kernels --vs-faiss`: k-means of a weight's PQ sub-vectors, timed.
//!
//! ```text
//! cargo run --release -p qn-kernels --example kmeans_vs_faiss -- <weight.f32> <rows> <cols> <d> <k> <iters> [bounds|plain]
//! ```
//! The default, `plain`, runs the library's default (every point, every iteration, as faiss
//! does); `bounds` turns Hamerly's bounds on.
//! Reads a raw little-endian `f32` matrix (written by the xtask, read by faiss too), cuts it into
//! sub-vectors with the paper's layout, runs k-means with every sub-vector and prints one JSON line
//! `{"seconds": .., "relative_mse": ..}`. The timing covers k-means and the final assignment; cutting
//! the weight into sub-vectors is outside it, as it is for faiss.

use std::time::Instant;

use candle_core::{Device, Tensor};
use qn_kernels::{layout::BlockLayout, pq};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bounds = match args.get(6).map(String::as_str) {
        Some("bounds") => true,
        None | Some("plain") => false,
        Some(other) => return Err(format!("`{other}`: give bounds or plain").into()),
    };
    if args.len() != 6 && args.len() != 7 {
        return Err(
            "usage: kmeans_vs_faiss <weight.f32> <rows> <cols> <d> <k> <iters> [bounds|plain]"
                .into(),
        );
    }
    let bytes = std::fs::read(&args[0]).map_err(|e| format!("{}: {e}", args[0]))?;
    let n: Vec<usize> = args[1..6]
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let (rows, cols, d, k, iters) = (n[0], n[1], n[2], n[3], n[4]);
    if bytes.len() != rows * cols * 4 {
        return Err(format!(
            "{}: {} bytes, expected {rows} x {cols} f32",
            args[0],
            bytes.len()
        )
        .into());
    }
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let w = Tensor::from_vec(values, (rows, cols), &Device::Cpu)?;
    let layout = BlockLayout::linear("weight", w.dims(), d)?;
    let sub = layout.to_subvectors(&w)?.flatten_all()?.to_vec1::<f32>()?;
    let cfg = pq::KMeansConfig::new(k)
        .with_iters(iters)
        .with_bounds(bounds);
    let start = Instant::now();
    let km = pq::kmeans(&sub, d, &cfg, &mut |_| {})?;
    let seconds = start.elapsed().as_secs_f64();
    let norm: f64 = sub.iter().map(|v| (*v as f64) * (*v as f64)).sum();
    println!(
        "{{\"seconds\": {seconds:.4}, \"relative_mse\": {:.6}, \"threads\": {}, \"full_passes\": {}}}",
        km.objective / norm,
        rayon::current_num_threads(),
        km.full_passes
    );
    Ok(())
}
