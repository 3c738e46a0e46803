//! The histogram observer: choose the clipping range with the least L2 quantization error.
//!
//! Same idea as PyTorch's `HistogramObserver`: the values go into `bins` equal bins over
//! `[min, max]`, then the range is shrunk greedily in small steps of probability mass from the end
//! where that step removes more bins, and the range with the least error seen is kept (PyTorch stops
//! at the first increase; we keep walking until the error is well past the best, which finds the
//! better range when the error is not unimodal). The error of a candidate range is evaluated with the real grid it
//! produces (zero point rounding, 0 kept in range), every bin's mass placed at its centre; prefix sums
//! of count, first and second moment make each evaluation `O(2^bits)`.

use super::{params::qparams_from_range, ScalarConfig};

/// Counts of values in equal bins over `[min, max]`.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Left edge of the first bin.
    pub min: f32,
    /// Right edge of the last bin.
    pub max: f32,
    /// Number of values per bin.
    pub counts: Vec<u64>,
}

impl Histogram {
    /// Builds a histogram of finite `values` (an empty slice gives an all-zero histogram over [0, 0]).
    pub fn new(values: &[f32], bins: usize) -> Self {
        let bins = bins.max(1);
        let (min, max) = values
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        if values.is_empty() {
            return Self {
                min: 0.0,
                max: 0.0,
                counts: vec![0; bins],
            };
        }
        let mut counts = vec![0u64; bins];
        let width = (max - min) as f64 / bins as f64;
        for &v in values {
            let i = if width > 0.0 {
                ((v - min) as f64 / width) as usize
            } else {
                0
            };
            counts[i.min(bins - 1)] += 1;
        }
        Self { min, max, counts }
    }

    fn width(&self) -> f64 {
        (self.max - self.min) as f64 / self.counts.len() as f64
    }

    /// The range `[lo, hi]` (bin edges) with the least L2 error for `config`'s grid.
    pub fn search(&self, config: &ScalarConfig) -> (f32, f32) {
        let bins = self.counts.len();
        if self.max <= self.min || bins < 2 {
            return (self.min, self.max);
        }
        let moments = Moments::new(self);
        let edge = |i: usize| (self.min as f64 + i as f64 * self.width()) as f32;
        let error = |start: usize, end: usize| moments.error(edge(start), edge(end + 1), config);

        // Shrink in steps of probability mass, from whichever end the step moves further (the sparse
        // side: an outlier's empty bins go in one step), as PyTorch's HistogramObserver does.
        const MASS_STEP: f64 = 1e-5;
        // Beyond this, clipping error dominates and only grows; stopping saves most of the walk.
        const GIVE_UP: f64 = 1.5;
        let total = moments.s0[bins];
        let cum = |i: usize| moments.s0[i + 1];
        let (mut start, mut end) = (0, bins - 1);
        let (mut alpha, mut beta) = (0.0f64, 1.0f64);
        let mut best = (error(start, end), start, end);
        while alpha < beta {
            let (next_alpha, next_beta) = (alpha + MASS_STEP, beta - MASS_STEP);
            let mut l = start;
            while l < end && cum(l) <= next_alpha * total {
                l += 1;
            }
            let mut r = end;
            while r > start && cum(r) >= next_beta * total {
                r -= 1;
            }
            let (mut next_start, mut next_end) = (start, end);
            if l - start > end - r {
                next_start = l;
                alpha = next_alpha;
            } else {
                next_end = r;
                beta = next_beta;
            }
            if (next_start, next_end) == (start, end) {
                continue;
            }
            (start, end) = (next_start, next_end);
            let current = error(start, end);
            if current < best.0 {
                best = (current, start, end);
            } else if current > GIVE_UP * best.0 {
                break;
            }
        }
        (edge(best.1), edge(best.2 + 1))
    }
}

/// Prefix sums of count, sum and sum of squares of the bin centres.
struct Moments {
    min: f64,
    width: f64,
    s0: Vec<f64>,
    s1: Vec<f64>,
    s2: Vec<f64>,
}

impl Moments {
    fn new(h: &Histogram) -> Self {
        let n = h.counts.len();
        let (mut s0, mut s1, mut s2) = (vec![0.0; n + 1], vec![0.0; n + 1], vec![0.0; n + 1]);
        let width = h.width();
        for (i, &c) in h.counts.iter().enumerate() {
            let x = h.min as f64 + (i as f64 + 0.5) * width;
            let c = c as f64;
            s0[i + 1] = s0[i] + c;
            s1[i + 1] = s1[i] + c * x;
            s2[i + 1] = s2[i] + c * x * x;
        }
        Self {
            min: h.min as f64,
            width,
            s0,
            s1,
            s2,
        }
    }

    /// Number of bins whose centre is below `x`.
    fn bins_below(&self, x: f64) -> usize {
        let n = self.s0.len() - 1;
        let k = ((x - self.min) / self.width - 0.5).ceil();
        if k <= 0.0 {
            0
        } else {
            (k as usize).min(n)
        }
    }

    /// Squared error of quantizing every bin centre with the grid that `[lo, hi]` gives.
    fn error(&self, lo: f32, hi: f32, config: &ScalarConfig) -> f64 {
        let (scale, zp) = qparams_from_range(lo, hi, config);
        let (scale, zp) = (scale as f64, zp as f64);
        let (qmin, qmax) = (config.qmin(), config.qmax());
        let mut total = 0.0;
        let mut from = 0;
        for q in qmin..=qmax {
            let to = if q == qmax {
                self.s0.len() - 1
            } else {
                self.bins_below(scale * (q as f64 - zp + 0.5))
            };
            if to > from {
                let v = scale * (q as f64 - zp);
                let (c, s, ss) = (
                    self.s0[to] - self.s0[from],
                    self.s1[to] - self.s1[from],
                    self.s2[to] - self.s2[from],
                );
                total += (ss - 2.0 * v * s + v * v * c).max(0.0);
                from = to;
            }
        }
        total
    }
}

/// The histogram observer's range for `values`.
pub fn histogram_range(values: &[f32], bins: usize, config: &ScalarConfig) -> (f32, f32) {
    Histogram::new(values, bins).search(config)
}
