//! Decoding records to `f32`.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::codes::{parse_pq, parse_scalar, PqIndex};
use crate::header::{scalar_view, Encoding, RawDType};

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
    // SAFETY: `pq_gather_uninit` only writes initialised values into the slice.
    let out = unsafe { &mut *(out as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
    pq_gather_uninit(centroids, d, rows, cols, assignments, out);
}

/// [`pq_gather`] into memory not yet initialised: every element of `out` is written, so a caller
/// that allocates the weight may skip zeroing it (for a layer decoded at every call, the zeroing
/// costs as much as the gather).
pub fn pq_gather_uninit<I: Copy + Into<usize> + Sync>(
    centroids: &[f32],
    d: usize,
    rows: usize,
    cols: usize,
    assignments: &[I],
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    assert_eq!(out.len(), rows * cols, "output size");
    assert_eq!(
        assignments.len() * d,
        rows * cols,
        "one assignment per block"
    );
    out.par_chunks_mut(cols)
        .enumerate()
        .for_each(|(o, row)| gather_rows(centroids, d, rows, cols, assignments, o, row));
}

/// Rows `o0 .. o0 + out.len() / cols` of the PQ weight of [`pq_gather`] into `out`, on this
/// thread: what a caller that multiplies a few rows at a time decodes (tiles of a matmul).
pub fn pq_gather_rows<I: Copy + Into<usize>>(
    centroids: &[f32],
    d: usize,
    rows: usize,
    cols: usize,
    assignments: &[I],
    o0: usize,
    out: &mut [f32],
) {
    assert_eq!(out.len() % cols.max(1), 0, "whole rows");
    assert!(o0 + out.len() / cols.max(1) <= rows, "rows in range");
    // SAFETY: `gather_rows` only writes initialised values into the slice.
    let out = unsafe { &mut *(out as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
    gather_rows(centroids, d, rows, cols, assignments, o0, out);
}

/// The rows from `o0` that `out` holds. The paper's block sizes are copied as fixed-size arrays
/// (vector moves, not a `memcpy` call per block).
fn gather_rows<I: Copy + Into<usize>>(
    centroids: &[f32],
    d: usize,
    rows: usize,
    cols: usize,
    assignments: &[I],
    o0: usize,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let k = centroids.len() / d;
    for (o, row) in (o0..).zip(out.chunks_exact_mut(cols)) {
        match d {
            4 => gather_row::<I, 4>(centroids, k, rows, o, assignments, row),
            8 => gather_row::<I, 8>(centroids, k, rows, o, assignments, row),
            16 => gather_row::<I, 16>(centroids, k, rows, o, assignments, row),
            _ => {
                for (b, dst) in row.chunks_exact_mut(d).enumerate() {
                    let a: usize = assignments[b * rows + o].into();
                    assert!(a < k, "assignment out of range");
                    for (t, &v) in dst.iter_mut().zip(&centroids[a * d..(a + 1) * d]) {
                        t.write(v);
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn gather_row<I: Copy + Into<usize>, const D: usize>(
    centroids: &[f32],
    k: usize,
    rows: usize,
    o: usize,
    assignments: &[I],
    row: &mut [std::mem::MaybeUninit<f32>],
) {
    for (b, dst) in row.chunks_exact_mut(D).enumerate() {
        let a: usize = assignments[b * rows + o].into();
        assert!(a < k, "assignment out of range");
        let c: &[f32; D] = centroids[a * D..(a + 1) * D].try_into().expect("D values");
        let dst: &mut [std::mem::MaybeUninit<f32>; D] = dst.try_into().expect("D slots");
        *dst = c.map(std::mem::MaybeUninit::new);
    }
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
            let (scales, zps, codes) = parse_scalar(shape, bits, granularity, record)?;
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
        Encoding::Pq { block_size, .. } => {
            let (rows, cols, centroids, idx) = parse_pq(shape, encoding, record)?;
            match &idx {
                PqIndex::U8(a) => pq_gather(&centroids, block_size, rows, cols, a, out),
                PqIndex::U16(a) => pq_gather(&centroids, block_size, rows, cols, a, out),
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
