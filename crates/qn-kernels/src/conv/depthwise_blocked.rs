//! Depthwise convolution on blocks of 16 channels laid out channels-last, forward and backward.
//!
//! The row-wise kernel of [`super::depthwise`] vectorises along an image row, which is efficient
//! on wide planes at stride 1 but not on the 7–28 pixel rows of a network's late stages (loop
//! overhead per tap and row) nor at stride 2 (strided reads). Here a task takes one image and 16
//! channels, copies them into a zero-padded channels-last buffer (pixel-major, one 16-lane vector
//! per pixel), and every tap is then a full-width vector multiply-add with no bounds test and no
//! stride inside the vector, whatever the plane size or stride. The copies in and out cost about
//! one pass over the data, which the late stages' small planes keep in cache.
//!
//! The backward computes the input and kernel gradients in one pass per task (each reads the same
//! gradient block); kernel gradients are summed over images at the end.

use std::cell::RefCell;

use rayon::prelude::*;

use super::depthwise::{Elem, Geometry};

/// Channels per block: one AVX-512 vector of f32.
pub(super) const LANES: usize = 16;

type Lanes<T> = [T; LANES];

/// Per-thread scratch for one element type (a task's padded input, gradient block and padded
/// input gradient), kept between calls so that each task does not allocate and fault in pages.
pub(super) trait Scratch: Elem + 'static {
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
    fn fused(self, a: Self, b: Self) -> Self;
}

thread_local! {
    static F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static F64: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

fn take<T: Copy + Default, R>(
    cell: &'static std::thread::LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    cell.with(|cell| match cell.try_borrow_mut() {
        Ok(mut kept) => {
            if kept.len() < len {
                kept.resize(len, T::default());
            }
            f(&mut kept[..len])
        }
        // A task nested in another on this thread (rayon work stealing) gets its own.
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

impl Scratch for f32 {
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
        take(&F32, len, f)
    }
    #[inline(always)]
    fn fused(self, a: Self, b: Self) -> Self {
        a.mul_add(b, self)
    }
}

impl Scratch for f64 {
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
        take(&F64, len, f)
    }
    #[inline(always)]
    fn fused(self, a: Self, b: Self) -> Self {
        a.mul_add(b, self)
    }
}

/// `acc += a * b` lane by lane; one fused instruction per vector where the caller was compiled
/// with FMA (a library call per lane otherwise, hence the flag).
#[inline(always)]
fn madd<T: Scratch, const FMA: bool>(acc: &mut Lanes<T>, a: &Lanes<T>, b: &Lanes<T>) {
    for l in 0..LANES {
        acc[l] = if FMA {
            acc[l].fused(a[l], b[l])
        } else {
            acc[l] + a[l] * b[l]
        };
    }
}

/// Sizes of one task's buffers.
#[derive(Clone, Copy)]
struct Dims {
    /// Padded input width and height.
    wp: usize,
    hp: usize,
}

impl Dims {
    fn of(g: &Geometry) -> Self {
        Self {
            wp: g.w + g.pad.left + g.pad.right,
            hp: g.h + g.pad.top + g.pad.bottom,
        }
    }
}

/// Copies `cv ≤ 16` planes (`h x w` each, back to back) into the padded channels-last `buf`;
/// lanes past `cv` and the border stay zero.
#[inline(always)]
fn load_padded<T: Scratch>(g: &Geometry, d: Dims, planes: &[T], cv: usize, buf: &mut [Lanes<T>]) {
    buf.fill([T::default(); LANES]);
    let plane = g.h * g.w;
    for iy in 0..g.h {
        let row = &mut buf[(iy + g.pad.top) * d.wp + g.pad.left..][..g.w];
        for l in 0..cv {
            let src = &planes[l * plane + iy * g.w..][..g.w];
            for (px, &v) in row.iter_mut().zip(src) {
                px[l] = v;
            }
        }
    }
}

/// Copies the rectangle of `buf` (row stride `stride`) starting at `(y0, x0)`, `rows x cols`, into
/// `cv` planes of `rows x cols` back to back.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn store_planes<T: Scratch>(
    buf: &[Lanes<T>],
    stride: usize,
    (y0, x0): (usize, usize),
    (rows, cols): (usize, usize),
    cv: usize,
    planes: &mut [T],
) {
    for r in 0..rows {
        let row = &buf[(y0 + r) * stride + x0..][..cols];
        for l in 0..cv {
            let dst = &mut planes[l * rows * cols + r * cols..][..cols];
            for (o, px) in dst.iter_mut().zip(row) {
                *o = px[l];
            }
        }
    }
}

/// The kernel of channels `c0..c0+cv`, tap-major: `out[tap][lane]`.
fn kernel_lanes<T: Scratch>(kern: &[T], kk: usize, c0: usize, cv: usize) -> Vec<Lanes<T>> {
    let mut out = vec![[T::default(); LANES]; kk];
    for l in 0..cv {
        for (tap, o) in out.iter_mut().enumerate() {
            o[l] = kern[(c0 + l) * kk + tap];
        }
    }
    out
}

/// One task's forward: `y` receives `cv` output planes of one image. `xp` holds the padded input
/// block, `yb` the output block.
#[inline(always)]
fn forward_block<T: Scratch, const FMA: bool>(
    g: &Geometry,
    x: &[T],
    wk: &[Lanes<T>],
    cv: usize,
    y: &mut [T],
    xp: &mut [Lanes<T>],
    yb: &mut [Lanes<T>],
) {
    let d = Dims::of(g);
    let (k, s) = (g.k, g.stride);
    load_padded(g, d, x, cv, xp);
    for oy in 0..g.ho {
        for ox in 0..g.wo {
            let mut acc = [T::default(); LANES];
            for ky in 0..k {
                let row = &xp[(oy * s + ky) * d.wp + ox * s..][..k];
                for (xv, wv) in row.iter().zip(&wk[ky * k..(ky + 1) * k]) {
                    madd::<T, FMA>(&mut acc, xv, wv);
                }
            }
            yb[oy * g.wo + ox] = acc;
        }
    }
    store_planes(yb, g.wo, (0, 0), (g.ho, g.wo), cv, y);
}

/// A backward task's buffers: padded input, padded input gradient, output-gradient block.
struct BackwardScratch<'a, T> {
    xp: &'a mut [Lanes<T>],
    dxp: &'a mut [Lanes<T>],
    gb: &'a mut [Lanes<T>],
}

/// One task's backward: the input gradient planes `dx` of one image's `cv` channels and this
/// image's contribution `dw[tap][lane]` to their kernel gradient. `xp` and `dxp` hold the padded
/// input and input-gradient blocks, `gb` the output-gradient block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_block<T: Scratch, const FMA: bool>(
    g: &Geometry,
    x: &[T],
    gy: &[T],
    wk: &[Lanes<T>],
    cv: usize,
    dx: &mut [T],
    dw: &mut [Lanes<T>],
    BackwardScratch { xp, dxp, gb }: BackwardScratch<'_, T>,
) {
    let d = Dims::of(g);
    let (k, s) = (g.k, g.stride);
    load_padded(g, d, x, cv, xp);
    dxp.fill([T::default(); LANES]);
    // The gradient block has no border: a plain transpose.
    gb.fill([T::default(); LANES]);
    let plane_out = g.ho * g.wo;
    for l in 0..cv {
        for (px, &v) in gb.iter_mut().zip(&gy[l * plane_out..(l + 1) * plane_out]) {
            px[l] = v;
        }
    }
    for oy in 0..g.ho {
        for ox in 0..g.wo {
            let gv = &gb[oy * g.wo + ox];
            for ky in 0..k {
                let at = (oy * s + ky) * d.wp + ox * s;
                let taps = ky * k..(ky + 1) * k;
                let xrow = &xp[at..][..k];
                let dxrow = &mut dxp[at..][..k];
                for (((dxv, xv), wv), acc) in dxrow
                    .iter_mut()
                    .zip(xrow)
                    .zip(&wk[taps.clone()])
                    .zip(&mut dw[taps])
                {
                    madd::<T, FMA>(dxv, gv, wv);
                    madd::<T, FMA>(acc, gv, xv);
                }
            }
        }
    }
    store_planes(dxp, d.wp, (g.pad.top, g.pad.left), (g.h, g.w), cv, dx);
}

/// A task's scratch split into `n` blocks of `len` pixels each, then `rest` pixels.
fn with_blocks<T: Scratch, R>(
    len: usize,
    rest: usize,
    f: impl FnOnce(&mut [Lanes<T>], &mut [Lanes<T>]) -> R,
) -> R {
    T::with_scratch((len + rest) * LANES, |scratch| {
        let (a, b) = scratch.as_chunks_mut::<LANES>().0.split_at_mut(len);
        f(a, b)
    })
}

/// Which compiled copy of the block kernels runs.
#[derive(Clone, Copy)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    fn detect<T: 'static>() -> Self {
        // Only f32 gets the wide copies: f64 runs in tests and finite differences, not training.
        #[cfg(target_arch = "x86_64")]
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && std::arch::is_x86_feature_detected!("fma")
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Self::Avx2;
            }
        }
        Self::Portable
    }
}

/// Generates an entry point per instruction set: the portable copy and, on x86-64, copies of the
/// same body compiled with AVX2 + FMA and AVX-512F + FMA (selected at run time by
/// [`Isa::detect`]). The body must be `#[inline(always)]` so that each copy gets its features.
macro_rules! compiled_for {
    ($name:ident, $inner:ident, ($($arg:ident : $ty:ty),*)) => {
        #[allow(clippy::too_many_arguments)]
        fn $name<T: Scratch>(isa: Isa, $($arg: $ty),*) {
            /// # Safety
            /// AVX2 and FMA must be present.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2<T: Scratch>($($arg: $ty),*) {
                $inner::<T, true>($($arg),*)
            }
            /// # Safety
            /// AVX-512F and FMA must be present.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512<T: Scratch>($($arg: $ty),*) {
                $inner::<T, true>($($arg),*)
            }
            match isa {
                Isa::Portable => $inner::<T, false>($($arg),*),
                // SAFETY: `Isa::detect` chose these only where the features are present.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2::<T>($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { avx512::<T>($($arg),*) },
            }
        }
    };
}

compiled_for!(forward_task, forward_block, (g: &Geometry, x: &[T], wk: &[Lanes<T>], cv: usize, y: &mut [T], xp: &mut [Lanes<T>], yb: &mut [Lanes<T>]));
compiled_for!(backward_task, backward_block, (g: &Geometry, x: &[T], gy: &[T], wk: &[Lanes<T>], cv: usize, dx: &mut [T], dw: &mut [Lanes<T>], bufs: BackwardScratch<'_, T>));

/// `y (n, c, ho, wo)` from `x (n, c, h, w)` and the kernels `(c, k*k)`.
pub(super) fn forward<T: Scratch>(g: &Geometry, x: &[T], kern: &[T]) -> Vec<T> {
    let isa = Isa::detect::<T>();
    let d = Dims::of(g);
    let (plane_in, plane_out, kk) = (g.h * g.w, g.ho * g.wo, g.k * g.k);
    let blocks: Vec<Vec<Lanes<T>>> = (0..g.c.div_ceil(LANES))
        .map(|b| kernel_lanes(kern, kk, b * LANES, LANES.min(g.c - b * LANES)))
        .collect();
    let mut y = vec![T::default(); g.n * g.c * plane_out];
    if y.is_empty() {
        return y;
    }
    y.par_chunks_mut(g.c * plane_out)
        .enumerate()
        .for_each(|(img, y_img)| {
            let x_img = &x[img * g.c * plane_in..(img + 1) * g.c * plane_in];
            y_img
                .par_chunks_mut(LANES * plane_out)
                .enumerate()
                .for_each(|(b, yb)| {
                    let c0 = b * LANES;
                    let cv = LANES.min(g.c - c0);
                    let xb = &x_img[c0 * plane_in..(c0 + cv) * plane_in];
                    with_blocks(d.hp * d.wp, plane_out, |xp, ob| {
                        forward_task(isa, g, xb, &blocks[b], cv, yb, xp, ob)
                    });
                });
        });
    y
}

/// `(dx (n, c, h, w), dw (c, k*k))` from `x`, the output gradient `gy (n, c, ho, wo)` and the
/// kernels, written back to back into one buffer (`dx` first).
pub(super) fn backward<T: Scratch>(g: &Geometry, x: &[T], gy: &[T], kern: &[T]) -> Vec<T> {
    let isa = Isa::detect::<T>();
    let d = Dims::of(g);
    let (plane_in, plane_out, kk) = (g.h * g.w, g.ho * g.wo, g.k * g.k);
    let nblocks = g.c.div_ceil(LANES);
    let blocks: Vec<Vec<Lanes<T>>> = (0..nblocks)
        .map(|b| kernel_lanes(kern, kk, b * LANES, LANES.min(g.c - b * LANES)))
        .collect();
    let dx_len = g.n * g.c * plane_in;
    let mut out = vec![T::default(); dx_len + g.c * kk];
    let (dx, dw) = out.split_at_mut(dx_len);
    if g.n == 0 || g.c == 0 {
        return out;
    }
    // Kernel gradients per image, tap-major per block, summed below in image order.
    let per_image: Vec<Vec<Lanes<T>>> = dx
        .par_chunks_mut(g.c * plane_in)
        .enumerate()
        .map(|(img, dx_img)| {
            let x_img = &x[img * g.c * plane_in..(img + 1) * g.c * plane_in];
            let gy_img = &gy[img * g.c * plane_out..(img + 1) * g.c * plane_out];
            let mut dw_img = vec![[T::default(); LANES]; nblocks * kk];
            dx_img
                .par_chunks_mut(LANES * plane_in)
                .zip(dw_img.par_chunks_mut(kk))
                .enumerate()
                .for_each(|(b, (dxb, dwb))| {
                    let c0 = b * LANES;
                    let cv = LANES.min(g.c - c0);
                    with_blocks(2 * d.hp * d.wp, plane_out, |pads, gb| {
                        let (xp, dxp) = pads.split_at_mut(d.hp * d.wp);
                        backward_task(
                            isa,
                            g,
                            &x_img[c0 * plane_in..(c0 + cv) * plane_in],
                            &gy_img[c0 * plane_out..(c0 + cv) * plane_out],
                            &blocks[b],
                            cv,
                            dxb,
                            dwb,
                            BackwardScratch { xp, dxp, gb },
                        )
                    });
                });
            dw_img
        })
        .collect();
    for dw_img in &per_image {
        for b in 0..nblocks {
            let c0 = b * LANES;
            for l in 0..LANES.min(g.c - c0) {
                for tap in 0..kk {
                    dw[(c0 + l) * kk + tap] += dw_img[b * kk + tap][l];
                }
            }
        }
    }
    out
}
