//! End-to-end benches of quant-noise-rs (kernel micro-benches stay beside their crates):
//! `train_step` (a BERT-base FFN training step with and without block-drop noise), `quantize`
//! (PQ and int8 of the all-MiniLM-L6-v2 layer in `assets/` to a `.qnz` in memory) and `decode`
//! (opening and decoding that `.qnz`).
//!
//! ```text
//! cargo bench -p qn-benches
//! ```

use std::path::PathBuf;

/// The all-MiniLM-L6-v2 layer shipped in `assets/`: `(name, shape, values)` of its 2-D tensors.
pub fn minilm_layer() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/minilm-l6-layer0.safetensors");
    let bytes = std::fs::read(&path).expect("assets/minilm-l6-layer0.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(_, t)| t.shape().len() == 2 && t.dtype() == safetensors::Dtype::F32)
        .map(|(n, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, t.shape().to_vec(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
