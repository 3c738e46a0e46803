//! Elementwise kernels compiled for the CPU they run on, and the vector-friendly math they share.
//!
//! The workspace builds for baseline x86-64 (SSE2: four lanes, no fused multiply-add), so a plain
//! loop over `f32`s runs at a quarter or less of what the CPU can do, and a float sum does not
//! vectorise at all (LLVM keeps the additions in order). [`multiversion!`] compiles one
//! `#[inline(always)]` body three times — for AVX-512, for AVX2 + FMA and for the baseline — and
//! picks one at run time, the way PyTorch's `ATen` dispatches its CPU kernels. The helpers below
//! ([`exp`], [`erf`], [`sum`], [`dot`]) are written without branches, libm calls or float→int
//! conversions so that inside such a body they become vector code.
//!
//! ```
//! qn_kernels::multiversion! {
//!     /// `y = 2x`, vectorised for the CPU at hand.
//!     fn double(y: &mut [f32], x: &[f32]) = double_body;
//! }
//! #[inline(always)]
//! fn double_body(y: &mut [f32], x: &[f32]) {
//!     y.iter_mut().zip(x).for_each(|(y, x)| *y = 2.0 * x);
//! }
//! let mut y = [0f32; 3];
//! double(&mut y, &[1.0, 2.0, 3.0]);
//! assert_eq!(y, [2.0, 4.0, 6.0]);
//! assert!((qn_kernels::simd::sum(&[0.5; 100]) - 50.0).abs() < 1e-6);
//! ```

/// Defines `fn name(args) -> ret` that runs `body(args)` compiled for AVX-512 (F, BW, DQ, VL),
/// else for AVX2 + FMA, else for the build's baseline: the best [`level`] allows. `body` must be
/// `#[inline(always)]` so that each copy is compiled with its instruction set. The copies give
/// bit-identical results: Rust never contracts `a * b + c` into a fused multiply-add nor reorders
/// float operations, so only the vector width changes, and a body that reduces through the
/// fixed lanes of [`sum`] / [`dot`] adds in the same order at every width.
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:path;) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                /// # Safety
                /// AVX-512 F/BW/DQ/VL must be present.
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                /// # Safety
                /// AVX2 and FMA must be present.
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match $crate::simd::level() {
                    // SAFETY: `level` reports only instruction sets the CPU has.
                    $crate::simd::Level::Avx512 => return unsafe { v4($($arg),*) },
                    // SAFETY: as above.
                    $crate::simd::Level::Avx2 => return unsafe { v3($($arg),*) },
                    $crate::simd::Level::Baseline => {}
                }
            }
            $body($($arg),*)
        }
    };
}

/// The instruction sets [`multiversion!`] compiles for, from the least to the most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The build's target (x86-64: SSE2) or any other architecture.
    Baseline = 0,
    /// AVX2 and FMA.
    Avx2 = 1,
    /// AVX-512 F, BW, DQ and VL.
    Avx512 = 2,
}

/// The highest level a caller allows: `u8::MAX` until first read, then set from `QN_SIMD`.
static CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// The level the kernels run at: the best the CPU has, at most [`cap_level`]'s or, until that is
/// called, the environment's `QN_SIMD` (`baseline`, `avx2` or `avx512`: for comparing or
/// debugging the compiled copies).
pub fn level() -> Level {
    use std::sync::atomic::Ordering;
    let mut cap = CAP.load(Ordering::Relaxed);
    if cap == u8::MAX {
        // An unknown value caps nothing here; `qn` refuses it up front (`parse_level`).
        cap = std::env::var("QN_SIMD")
            .ok()
            .and_then(|v| parse_level(&v))
            .unwrap_or(Level::Avx512) as u8;
        CAP.store(cap, Ordering::Relaxed);
    }
    let best = detected();
    if (best as u8) <= cap {
        best
    } else if cap >= Level::Avx2 as u8 {
        Level::Avx2
    } else {
        Level::Baseline
    }
}

/// A `QN_SIMD` value: `baseline`, `avx2` or `avx512`; anything else is `None`.
pub fn parse_level(name: &str) -> Option<Level> {
    match name {
        "baseline" => Some(Level::Baseline),
        "avx2" => Some(Level::Avx2),
        "avx512" => Some(Level::Avx512),
        _ => None,
    }
}

/// Caps [`level`] for the whole process (tests that compare the compiled copies use it).
pub fn cap_level(cap: Level) {
    CAP.store(cap as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The best level this CPU has (`std` caches the detection).
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl")
        {
            return Level::Avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// Lanes of the partial sums in [`sum`] and [`dot`]: two AVX-512 registers, so the additions of
/// one lane do not wait on each other.
const LANES: usize = 32;

/// `Σ x` with [`LANES`] independent partial sums (a vector reduction; the order differs from a
/// sequential sum by rounding only).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    chunks.remainder().iter().sum::<f32>() + acc.iter().sum::<f32>()
}

/// `Σ aᵢ·bᵢ` over the common length, with [`LANES`] partial sums.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    tail + acc.iter().sum::<f32>()
}

/// `eˣ` without a libm call, branches or a float→int conversion, so loops over it vectorise.
/// Relative error below 3e-7 on [-87, 88]; below -87.3 it is exactly 0 (never a subnormal: those
/// would slow every later multiply by orders of magnitude), above 88.3 it is clamped.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 · 2²³ rounds to the nearest integer in plain float arithmetic, and leaves that
    // integer in the low mantissa bits, where the exponent of 2ⁿ is read from.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.3;
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n + 127 lies in 1..=255 after the clamp: shifted's bits are ROUND's plus n.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    let y = p * two_n;
    f32::from_bits(y.to_bits() & !(underflow as u32).wrapping_neg())
}

/// erf within 1.5e-7 (Abramowitz & Stegun 7.1.26; 5e-7 once evaluated in f32), branch-free.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_with(x, exp(-x * x))
}

/// [`erf`] given `e = exp(-x²)`, for callers that need that exponential too (the GELU gradient's
/// density is the same exponential).
#[inline(always)]
pub fn erf_with(x: f32, e: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let p = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - p * e).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_3e_7_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(-87.4), 0.0);
        assert!(exp(-87.2).is_normal());
        assert!(exp(1e30).is_finite());
    }

    #[test]
    fn erf_is_within_5e_7_of_a_series() {
        // erf by its Taylor series in f64, converged for |x| ≤ 3.
        let reference = |x: f64| {
            let (mut term, mut total, mut k) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                k += 1.0;
                term *= -x * x / k;
                total += term / (2.0 * k + 1.0);
            }
            total * 2.0 / std::f64::consts::PI.sqrt()
        };
        let mut x = -3.0f32;
        while x <= 3.0 {
            // A&S 7.1.26 is within 1.5e-7 in exact arithmetic; evaluated in f32, `1 - p·e`
            // carries the roundings of about six operations on values near 0.8 (one ulp there is
            // 6e-8): 1.5e-7 + 6 · 6e-8 ≈ 5e-7.
            let err = (erf(x) as f64 - reference(x as f64)).abs();
            assert!(err < 5e-7, "erf({x}) off by {err:e}");
            x += 0.003_1;
        }
        assert!(
            erf(0.0).abs() < 1e-7,
            "the approximation is 1e-9 from 0 at 0, plus rounding"
        );
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    multiversion! {
        fn dispatched_dot(a: &[f32], b: &[f32]) -> f32 = dot;
    }

    #[inline(always)]
    fn mixed_body(y: &mut [f32], x: &[f32]) -> f32 {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + erf(x * 0.707_106_77)) + exp(-x * x) * x;
        }
        sum(y) + dot(x, y)
    }

    multiversion! {
        fn mixed(y: &mut [f32], x: &[f32]) -> f32 = mixed_body;
    }

    /// Every compiled copy this CPU can run gives the baseline's bits (the cap is process-wide;
    /// no other test in this binary dispatches).
    #[test]
    fn every_level_gives_the_same_bits() {
        let x: Vec<f32> = (0..4099)
            .map(|i| (i as f32 * 0.618_034).sin() * 6.0)
            .collect();
        let run = |level| {
            cap_level(level);
            let mut y = vec![0f32; x.len()];
            let s = mixed(&mut y, &x);
            (y, s)
        };
        let (base, base_sum) = run(Level::Baseline);
        for level in [Level::Avx2, Level::Avx512] {
            if level <= detected() {
                let (y, s) = run(level);
                assert_eq!(s.to_bits(), base_sum.to_bits(), "{level:?} sum");
                assert!(
                    y.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{level:?}"
                );
            }
        }
        cap_level(Level::Avx512);
    }

    #[test]
    fn dispatched_sums_match_f64() {
        let a: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let b: Vec<f32> = (0..1000)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 5.0)
            .collect();
        for n in [0, 1, 31, 32, 33, 1000] {
            let want: f64 = a[..n]
                .iter()
                .zip(&b[..n])
                .map(|(x, y)| *x as f64 * *y as f64)
                .sum();
            let got = dispatched_dot(&a[..n], &b[..n]) as f64;
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "n {n}: {got} vs {want}"
            );
            let want: f64 = a[..n].iter().map(|x| *x as f64).sum();
            assert!((sum(&a[..n]) as f64 - want).abs() <= 1e-4 * want.abs().max(1.0));
        }
    }
}
