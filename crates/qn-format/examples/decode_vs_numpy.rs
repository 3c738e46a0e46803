//! Our side of `cargo xtask bench-format --vs-numpy`: decode a PQ record to f32, timed.
//!
//! ```text
//! cargo run --release -p qn-format --example decode_vs_numpy -- <centroids.f32> <assign.u8> <rows> <cols> <d> <repeats>
//! ```
//! Builds a `.qnz` in memory from the raw centroids (K x d, f32) and u8 assignments (sub-vector order
//! `j = b * rows + o`), then decodes it `repeats` times into a preallocated buffer and prints
//! `{"best_seconds": .., "gbps": ..}` (GB = 1e9 bytes of f32 written).

use std::time::Instant;

use qn_format::header::LayerKind;
use qn_format::{Codebook, Payload, Reader, Writer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 6 {
        return Err(
            "usage: decode_vs_numpy <centroids.f32> <assign.u8> <rows> <cols> <d> <repeats>".into(),
        );
    }
    let centroids: Vec<f32> = std::fs::read(&a[0])?
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let assignments: Vec<u16> = std::fs::read(&a[1])?.iter().map(|&v| v as u16).collect();
    let (rows, cols, d, repeats): (usize, usize, usize, usize) =
        (a[2].parse()?, a[3].parse()?, a[4].parse()?, a[5].parse()?);
    let mut w = Writer::new();
    w.add(
        "w",
        &[rows, cols],
        &Payload::Pq {
            layer: LayerKind::Linear,
            block_size: d,
            k: centroids.len() / d,
            codebook: Codebook::F32(centroids),
            assignments,
        },
    )?;
    let mut bytes = Vec::new();
    w.write_to(&mut bytes)?;
    let reader = Reader::from_bytes(&bytes)?;
    let view = reader.tensor("w")?;
    let mut out = vec![0f32; rows * cols];
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let t = Instant::now();
        view.decode_into(&mut out)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let checksum: f64 = out.iter().step_by(997).map(|&v| v as f64).sum();
    println!(
        "{{\"best_seconds\": {best:.6}, \"gbps\": {:.3}, \"checksum\": {checksum:.6}}}",
        (rows * cols * 4) as f64 / best / 1e9
    );
    Ok(())
}
