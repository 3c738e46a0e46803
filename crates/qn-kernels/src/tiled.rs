//! Decode-then-GEMM one tile of weight rows at a time: the dense path of a coded weight (PQ or
//! int-N) for inputs too large for lookup tables or in-register dequantisation.
//!
//! Each rayon task decodes [`TILE_ROWS`] rows of `W (rows, cols)` into a per-thread buffer (a few
//! hundred KB, so it stays in the cache of the core that uses it) and multiplies it into the part
//! of the output those rows produce. Decoding the whole weight instead writes it to memory for the
//! GEMM to read back (measured: ~8 % over a float layer for a batch of a few hundred rows) and
//! holds a dense copy of it. Tiles are fixed by the shape and every GEMM is single-threaded, so the
//! result does not depend on the thread count.
//!
//! Two layouts: [`matmul_t`] is `y = x · Wᵀ` for row-major activations (a linear layer), and
//! [`matmul_channels`] is `y[b] = W · x[b]` for channels-first ones (a 1x1 convolution over an
//! `(n, cols, pixels)` image batch, which so needs no transposition of its activations).
//!
//! ```
//! use qn_kernels::tiled::{matmul_channels, matmul_t};
//!
//! // W = [[1, 2], [3, 4], [5, 6]] (3 x 2), decoded on demand.
//! let w = [1f32, 2., 3., 4., 5., 6.];
//! let decode = |o0: usize, out: &mut [f32]| out.copy_from_slice(&w[o0 * 2..o0 * 2 + out.len()]);
//! let mut y = vec![0f32; 3];
//! matmul_t(&[1., 1.], 1, 3, 2, &mut y, &decode);
//! assert_eq!(y, [3., 7., 11.]);
//! // One image of 2 channels and 2 pixels: y = W · x.
//! let mut y = vec![0f32; 6];
//! matmul_channels(&[1., 0., 0., 1.], 1, 2, 3, 2, &mut y, &decode);
//! assert_eq!(y, [1., 2., 3., 4., 5., 6.]);
//! ```

use std::cell::RefCell;

use rayon::prelude::*;

/// Output rows per tile: 64 rows of a 3072-wide weight are 768 KB, which stays in the cache of
/// the core that decodes and multiplies it.
pub const TILE_ROWS: usize = 64;

/// Pixels per task of [`matmul_channels`]: enough that decoding a tile (`TILE_ROWS × cols`)
/// costs under 0.1 % of the task's multiply-adds, few enough that a layer of 16 output channels
/// (one tile) still spreads a 112 x 112 feature map over every core.
const PIXELS_PER_TASK: usize = 1024;

/// A decoder of whole weight rows: `decode(o0, out)` writes rows `o0 ..` (as many as `out`
/// holds, a multiple of `cols`) of the dense weight.
pub type DecodeRows<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

thread_local! {
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's buffer in `cell`, grown as needed and kept between
/// calls: a fresh buffer each call (512 KB of tables for a 4096-wide layer) costs page faults and
/// zeroing comparable to a whole GEMV. The contents are whatever the last call left: `f` writes
/// before it reads. A call nested in another on the same thread (rayon work stealing) gets a
/// buffer of its own.
pub(crate) fn with_scratch<R>(
    cell: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    cell.with(|cell| match cell.try_borrow_mut() {
        Ok(mut kept) => {
            if kept.len() < len {
                kept.resize(len, 0.0);
            }
            f(&mut kept[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

/// `y (n × rows) = x (n × cols) · Wᵀ`, `W` decoded a tile of rows at a time by `decode`.
pub fn matmul_t(x: &[f32], n: usize, rows: usize, cols: usize, y: &mut [f32], decode: DecodeRows) {
    assert_eq!(x.len(), n * cols, "x is n x cols");
    assert_eq!(y.len(), n * rows, "y is n x rows");
    if n == 0 || rows == 0 {
        return;
    }
    // Raw address: tasks write disjoint column ranges of `y` (row stride `rows`).
    let y_at = y.as_mut_ptr() as usize;
    (0..rows.div_ceil(TILE_ROWS)).into_par_iter().for_each(|t| {
        let o0 = t * TILE_ROWS;
        let o1 = (o0 + TILE_ROWS).min(rows);
        with_scratch(&TILE, (o1 - o0) * cols, |buf| {
            decode(o0, buf);
            // SAFETY: `x` is n × cols, `buf` (o1 - o0) × cols row-major (column j of the
            // right-hand side is row o0 + j of W), and the destination is columns o0..o1 of the
            // n × rows `y`, which no other task writes.
            unsafe {
                gemm::gemm(
                    n,
                    o1 - o0,
                    cols,
                    (y_at as *mut f32).add(o0),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    buf.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    });
}

/// `y[b] (rows × p) = W (rows × cols) · x[b] (cols × p)` for every `b < n`: a 1x1 convolution of
/// channels-first activations, `W` decoded a tile of rows at a time by `decode`.
pub fn matmul_channels(
    x: &[f32],
    n: usize,
    cols: usize,
    rows: usize,
    p: usize,
    y: &mut [f32],
    decode: DecodeRows,
) {
    assert_eq!(x.len(), n * cols * p, "x is n x cols x p");
    assert_eq!(y.len(), n * rows * p, "y is n x rows x p");
    if n == 0 || rows == 0 || p == 0 {
        return;
    }
    let tiles = rows.div_ceil(TILE_ROWS);
    let chunks = p.div_ceil(PIXELS_PER_TASK);
    let y_at = y.as_mut_ptr() as usize;
    (0..tiles * n * chunks).into_par_iter().for_each(|task| {
        let (t, rest) = (task / (n * chunks), task % (n * chunks));
        let (b, c) = (rest / chunks, rest % chunks);
        let (o0, o1) = (t * TILE_ROWS, ((t + 1) * TILE_ROWS).min(rows));
        let (p0, p1) = (c * PIXELS_PER_TASK, ((c + 1) * PIXELS_PER_TASK).min(p));
        with_scratch(&TILE, (o1 - o0) * cols, |buf| {
            decode(o0, buf);
            // SAFETY: `buf` is (o1 - o0) × cols row-major; the right-hand side is columns
            // p0..p1 of image b's cols × p block of `x`; the destination is rows o0..o1, columns
            // p0..p1 of image b's rows × p block of `y`, which no other task writes.
            unsafe {
                gemm::gemm(
                    o1 - o0,
                    p1 - p0,
                    cols,
                    (y_at as *mut f32).add(b * rows * p + o0 * p + p0),
                    1,
                    p as isize,
                    false,
                    buf.as_ptr(),
                    1,
                    cols as isize,
                    x.as_ptr().add(b * cols * p + p0),
                    1,
                    p as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain triple loops, in f64.
    fn reference_t(x: &[f32], n: usize, w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * rows];
        for i in 0..n {
            for o in 0..rows {
                let s: f64 = (0..cols)
                    .map(|k| x[i * cols + k] as f64 * w[o * cols + k] as f64)
                    .sum();
                y[i * rows + o] = s as f32;
            }
        }
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn both_layouts_match_plain_loops_across_tiles_and_pixel_chunks() {
        // 130 rows: three tiles, the last partial; 2,100 pixels: three chunks, the last partial.
        let (rows, cols) = (130, 7);
        let w = values(rows * cols, 1);
        let decode = |o0: usize, out: &mut [f32]| {
            out.copy_from_slice(&w[o0 * cols..o0 * cols + out.len()]);
        };
        let (n, p) = (2, 2100);
        let x = values(n * cols * p, 2);
        let mut y = vec![f32::NAN; n * rows * p];
        matmul_channels(&x, n, cols, rows, p, &mut y, &decode);
        for b in 0..n {
            // Image b as p rows of cols channels.
            let xb: Vec<f32> = (0..p)
                .flat_map(|j| (0..cols).map(move |k| (j, k)))
                .map(|(j, k)| x[b * cols * p + k * p + j])
                .collect();
            let want = reference_t(&xb, p, &w, rows, cols);
            for o in 0..rows {
                for j in 0..p {
                    let (got, want) = (y[b * rows * p + o * p + j], want[j * rows + o]);
                    assert!((got - want).abs() < 1e-4, "image {b} row {o} pixel {j}");
                }
            }
        }
        let x = values(5 * cols, 3);
        let mut y = vec![f32::NAN; 5 * rows];
        matmul_t(&x, 5, rows, cols, &mut y, &decode);
        let want = reference_t(&x, 5, &w, rows, cols);
        assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4));
        // Empty inputs write nothing and do not call the decoder.
        let never = |_: usize, _: &mut [f32]| panic!("decoded for no work");
        matmul_t(&[], 0, rows, cols, &mut [], &never);
        matmul_channels(&[], 0, cols, rows, p, &mut [], &never);
    }
}
