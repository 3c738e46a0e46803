//! rANS coding of PQ assignments with a per-tensor categorical model (the `constriction` crate).
//!
//! k-means leaves clusters of unequal size, so assignments carry less than `log2 K` bits of
//! information each. The model is the tensor's own symbol frequencies, stored as `K` 24-bit
//! fixed-point probabilities (each at least 1, summing to 2^24); the coder is constriction's
//! `DefaultAnsCoder` (32-bit words, 64-bit state). The writer keeps the rANS form only when the
//! record gets smaller than bit-packing.

use constriction::stream::{
    model::DefaultContiguousCategoricalEntropyModel, stack::DefaultAnsCoder, Decode,
};

const PRECISION: u32 = 24;

/// Fixed-point probabilities proportional to the symbol counts, every one at least 1.
fn probabilities(assignments: &[u16], k: usize) -> Vec<u32> {
    let mut counts = vec![0u64; k];
    assignments.iter().for_each(|&a| counts[a as usize] += 1);
    let total = 1u64 << PRECISION;
    let n = assignments.len().max(1) as u64;
    let mut p: Vec<u64> = counts.iter().map(|&c| (c * total / n).max(1)).collect();
    let sum: u64 = p.iter().sum();
    if sum < total {
        let i = (0..k)
            .max_by_key(|&i| (counts[i], std::cmp::Reverse(i)))
            .unwrap_or(0);
        p[i] += total - sum;
    } else {
        let mut excess = sum - total;
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(p[i]), i));
        for i in order {
            let take = excess.min(p[i] - 1);
            p[i] -= take;
            excess -= take;
            if excess == 0 {
                break;
            }
        }
    }
    p.into_iter().map(|v| v as u32).collect()
}

/// Codes `assignments` (each `< k`); returns the probability table and the compressed words.
pub(crate) fn encode(assignments: &[u16], k: usize) -> Option<(Vec<u32>, Vec<u32>)> {
    if !(2..=1 << 16).contains(&k) || assignments.is_empty() {
        return None;
    }
    let probs = probabilities(assignments, k);
    let model = DefaultContiguousCategoricalEntropyModel::from_nonzero_fixed_point_probabilities(
        &probs, false,
    )
    .ok()?;
    let mut coder = DefaultAnsCoder::new();
    coder
        .encode_iid_symbols_reverse(assignments.iter().map(|&a| a as usize), &model)
        .ok()?;
    let words = coder.into_compressed().ok()?;
    Some((probs, words))
}

/// Decodes `out.len()` assignments; every malformed input is an error, never a panic.
pub(crate) fn decode(probs: &[u32], words: &[u32], out: &mut [u16]) -> Result<(), String> {
    let model = DefaultContiguousCategoricalEntropyModel::from_nonzero_fixed_point_probabilities(
        probs, false,
    )
    .map_err(|()| "rANS probabilities are not positive or do not sum to 2^24".to_string())?;
    let mut coder = DefaultAnsCoder::from_compressed(words.to_vec())
        .map_err(|_| "rANS stream does not end in a non-zero word".to_string())?;
    let n = out.len();
    for (o, s) in out.iter_mut().zip(coder.decode_iid_symbols(n, &model)) {
        *o = s.map_err(|e| format!("rANS stream: {e:?}"))? as u16;
    }
    if !coder.is_empty() {
        return Err("rANS stream holds more data than its assignments".into());
    }
    Ok(())
}

/// The bits an rANS stream of `n` symbols drawn from the model `probs` must hold, less the
/// documented slack: `(1 − 2⁻⁶) · n · H − RANS_SLACK_BITS`, where `H` counts only the symbols whose
/// probability is above the minimum of 1 (an encoder gives every unused symbol that minimum; those
/// raise the model's entropy without ever being coded). A stream that claims `n` symbols in fewer
/// bits cannot be a coding of them by this model.
pub(crate) fn min_stream_bits(probs: &[u32], n: usize) -> f64 {
    let total = (1u64 << PRECISION) as f64;
    let h: f64 = probs
        .iter()
        .filter(|&&p| p > 1)
        .map(|&p| {
            let q = p as f64 / total;
            -q * q.log2()
        })
        .sum();
    (1.0 - 1.0 / 64.0) * n as f64 * h - crate::RANS_SLACK_BITS
}
