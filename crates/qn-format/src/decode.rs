//! Decoding records to `f32`.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::bitpack::unpack;
use crate::header::{index_bits, pq_geometry, scalar_view, CodebookKind, Encoding, RawDType};

/// Writes the PQ weight into `out` (row-major `rows x cols`): block `b` of row `o` is centroid
/// `assignments[b * rows + o]`. Rows are filled in parallel.
///
/// ```
/// // 2 rows x 4 columns, blocks of 2, centroids [1,1] and [2,2].
/// let mut out = [0f32; 8];
/// qn_format::decode::pq_gather(&[1., 1., 2., 2.], 2, 2, 4, &[0u8, 1, 1, 0], &mut out);
/// assert_eq!(out, [1., 1., 2., 2., 2., 2., 1., 1.]);
/// ```
pub fn pq_gather<I: Copy + Into<usize> + Sync>(
    centroids: &[f32],
    d: usize,
    rows: usize,
    cols: usize,
    assignments: &[I],
    out: &mut [f32],
) {
    assert_eq!(out.len(), rows * cols, "output size");
    assert_eq!(
        assignments.len() * d,
        rows * cols,
        "one assignment per block"
    );
    let k = centroids.len() / d;
    out.par_chunks_mut(cols).enumerate().for_each(|(o, row)| {
        for (b, dst) in row.chunks_exact_mut(d).enumerate() {
            let a: usize = assignments[b * rows + o].into();
            assert!(a < k, "assignment out of range");
            dst.copy_from_slice(&centroids[a * d..(a + 1) * d]);
        }
    });
}

/// Decodes a validated record (`encoding` and `shape` already checked against its length). Values
/// that a length check cannot catch (an index past `K`, a non-finite scale) are errors.
pub(crate) fn decode_record(
    shape: &[usize],
    encoding: &Encoding,
    record: &[u8],
    out: &mut [f32],
) -> Result<(), String> {
    match *encoding {
        Encoding::Raw { dtype } => decode_raw(dtype, record, out)?,
        Encoding::Scalar {
            bits, granularity, ..
        } => {
            let (view, param) = scalar_view(shape, granularity).expect("validated");
            let n_params: usize = param.iter().product();
            let scales: Vec<f32> = record[..4 * n_params]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if let Some(s) = scales.iter().find(|s| !s.is_finite() || **s <= 0.0) {
                return Err(format!("scale {s} is not a positive finite number"));
            }
            let zps = &record[4 * n_params..5 * n_params];
            let mut codes = vec![0u16; out.len()];
            unpack(&record[5 * n_params..], bits as u32, &mut codes);
            let [a, b, c] = view;
            let pick = |i: usize, p: usize| if p == 1 { 0 } else { i };
            for i in 0..a {
                for j in 0..b {
                    for l in 0..c {
                        let e = (i * b + j) * c + l;
                        let s = (pick(i, param[0]) * param[1] + pick(j, param[1])) * param[2]
                            + pick(l, param[2]);
                        out[e] = (codes[e] as f32 - zps[s] as f32) * scales[s];
                    }
                }
            }
        }
        Encoding::Pq {
            layer,
            block_size,
            k,
            codebook,
            rans_words,
        } => {
            let (rows, cols, n_sub, bits) =
                pq_geometry(shape, layer, block_size, k).expect("validated");
            let entries = k * block_size;
            let (centroids, rest) = match codebook {
                CodebookKind::F32 => (
                    record[..4 * entries]
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect::<Vec<_>>(),
                    &record[4 * entries..],
                ),
                CodebookKind::F16 => (
                    record[..2 * entries]
                        .chunks_exact(2)
                        .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                    &record[2 * entries..],
                ),
                CodebookKind::Int8 => {
                    let scale = f32::from_le_bytes([record[0], record[1], record[2], record[3]]);
                    (
                        record[4..4 + entries]
                            .iter()
                            .map(|&q| q as i8 as f32 * scale)
                            .collect(),
                        &record[4 + entries..],
                    )
                }
            };
            if let Some(v) = centroids.iter().find(|v| !v.is_finite()) {
                return Err(format!("codebook value {v} is not finite"));
            }
            debug_assert_eq!(bits, index_bits(k));
            if rans_words.is_some() {
                let words: Vec<u32> = rest
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let (probs, words) = words.split_at(k);
                let mut idx = vec![0u16; n_sub];
                crate::entropy::decode(probs, words, &mut idx)?;
                pq_gather(&centroids, block_size, rows, cols, &idx, out);
            } else if bits == 8 && k == 256 {
                pq_gather(&centroids, block_size, rows, cols, &rest[..n_sub], out);
            } else {
                let mut idx = vec![0u16; n_sub];
                unpack(rest, bits, &mut idx);
                if let Some(a) = idx.iter().find(|&&a| a as usize >= k) {
                    return Err(format!("assignment {a} is out of range for {k} centroids"));
                }
                pq_gather(&centroids, block_size, rows, cols, &idx, out);
            }
        }
    }
    Ok(())
}

fn decode_raw(dtype: RawDType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    let n = dtype.size();
    let it = out.iter_mut().zip(bytes.chunks_exact(n));
    match dtype {
        RawDType::F32 => it.for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        RawDType::F16 => it.for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        RawDType::Bf16 => it.for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        RawDType::I64 => {
            it.for_each(|(o, b)| *o = i64::from_le_bytes(b.try_into().unwrap()) as f32)
        }
        RawDType::I32 => {
            it.for_each(|(o, b)| *o = i32::from_le_bytes(b.try_into().unwrap()) as f32)
        }
        RawDType::U8 => it.for_each(|(o, b)| *o = b[0] as f32),
    }
    Ok(())
}
