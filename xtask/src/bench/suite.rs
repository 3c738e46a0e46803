//! What the rate–accuracy bench runs: a suite is one model on one task with a budget, and every
//! method is a fine-tuning (its noise) followed by at most one `qn compress`.
//!
//! The methods follow the paper's table: post-training quantization of the fp32 fine-tune,
//! quantization-aware training (the noise on every block, p = 1) and Quant-Noise (a fraction of
//! the blocks), each then compressed for real.

use std::path::PathBuf;

/// Text (a BERT-family encoder on TSV data) or images (an EfficientNet on IDX/image folders).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `--task sst2|rte|tsv`.
    Text,
    /// `--task idx|imagefolder`.
    Image,
}

/// How long each phase runs and on how much data.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Training rows (a seeded subset).
    pub train_examples: usize,
    /// Fine-tuning steps.
    pub steps: usize,
    /// Examples per step (fine-tuning and centroid fine-tuning).
    pub batch: usize,
    /// Fine-tuning learning rate.
    pub lr: f64,
    /// Centroid fine-tuning steps of every iPQ stage.
    pub ipq_steps: usize,
    /// k-means iterations of iPQ.
    pub kmeans_iters: usize,
    /// Evaluation rows (`None`: the whole evaluation set).
    pub eval_examples: Option<usize>,
    /// Text: tokens per input.
    pub max_len: usize,
    /// Images: input resolution.
    pub image_size: usize,
    /// Steps between refreshes of the noise's quantizer: the k-means of PQ noise and the ranges
    /// of scalar noise (fairseq refreshes its int-N ranges every 1,000-3,000 updates).
    pub pq_every: usize,
    /// Images: batch-norm recalibration batches at the end of the fine-tune and of every iPQ
    /// stage (`--bn-recalibrate` of `qn finetune` and `qn compress`).
    pub bn_recalibrate: usize,
    /// The compression ratios of the bit-budget rows (low, mid, high rate): 10x, 20x, 30x for
    /// text; 7x, 10x, 15x for images: EfficientNet-Lite0's batch norms, biases and depthwise
    /// kernels keep its iPQ files between about 6.5x (every block of 2) and 15x.
    pub rates: [u32; 3],
}

impl Budget {
    /// The full comparison (one seed per model under two hours on 2 cores) or `--quick`.
    pub fn preset(kind: Kind, quick: bool) -> Self {
        match (kind, quick) {
            (Kind::Text, false) => Budget {
                train_examples: 8000,
                steps: 300,
                batch: 32,
                lr: 1e-4,
                ipq_steps: 100,
                kmeans_iters: 20,
                eval_examples: None,
                max_len: 64,
                image_size: 0,
                pq_every: 100,
                bn_recalibrate: 0,
                rates: [10, 20, 30],
            },
            (Kind::Text, true) => Budget {
                train_examples: 256,
                steps: 12,
                batch: 16,
                lr: 1e-4,
                ipq_steps: 2,
                kmeans_iters: 4,
                eval_examples: Some(256),
                max_len: 32,
                image_size: 0,
                pq_every: 6,
                bn_recalibrate: 0,
                rates: [10, 20, 30],
            },
            (Kind::Image, false) => Budget {
                train_examples: 8000,
                steps: 200,
                batch: 32,
                lr: 1e-3,
                ipq_steps: 50,
                kmeans_iters: 20,
                eval_examples: Some(2000),
                max_len: 0,
                image_size: 64,
                pq_every: 50,
                bn_recalibrate: 200,
                rates: [7, 10, 15],
            },
            (Kind::Image, true) => Budget {
                train_examples: 256,
                steps: 12,
                batch: 16,
                lr: 1e-3,
                ipq_steps: 2,
                kmeans_iters: 4,
                eval_examples: Some(256),
                max_len: 0,
                image_size: 32,
                pq_every: 6,
                bn_recalibrate: 4,
                rates: [7, 10, 15],
            },
        }
    }

    /// One line for the report.
    pub fn describe(&self, kind: Kind) -> String {
        let input = match kind {
            Kind::Text => format!("≤ {} tokens", self.max_len),
            Kind::Image => format!("{} px", self.image_size),
        };
        let eval = match (self.eval_examples, kind) {
            (Some(n), Kind::Text) => format!("a seeded subset of {n} evaluation rows"),
            (Some(n), Kind::Image) => format!("the first {n} evaluation images"),
            (None, _) => "the whole evaluation set".into(),
        };
        // Part of the text that `--reuse` matches: rows from before the recalibration after every
        // image stage (their text lacks it) are not taken for rows with it.
        let bn = match kind {
            Kind::Image => format!(
                "; batch-norm statistics re-estimated by {} noise-free batches after the \
                 fine-tune and after every iPQ stage",
                self.bn_recalibrate
            ),
            Kind::Text => String::new(),
        };
        format!(
            "fine-tuning {} steps of {} on {} training rows at lr {}, {input}; iPQ: K = 256, {} \
             k-means iterations, {} centroid fine-tuning steps per stage{bn}; accuracy by `qn \
             eval` on {eval}",
            self.steps, self.batch, self.train_examples, self.lr, self.kmeans_iters, self.ipq_steps
        )
    }
}

/// One model on one task.
#[derive(Debug, Clone)]
pub struct Suite {
    /// `<model>-<task>`: the stem of the output files.
    pub name: String,
    /// Model for the title.
    pub model_name: String,
    /// Task for the title.
    pub task_name: String,
    /// `--model` of `qn`: a directory or a hub id.
    pub model: String,
    /// `--task` of `qn`.
    pub task: String,
    /// Training data path.
    pub train: PathBuf,
    /// Evaluation data path.
    pub eval: PathBuf,
    /// Text or images.
    pub kind: Kind,
    /// Phase lengths.
    pub budget: Budget,
}

/// A quick-budget text suite of made-up paths, for the report and reuse tests.
#[cfg(test)]
pub fn test_suite() -> Suite {
    Suite {
        name: "m-t".into(),
        model_name: "M".into(),
        task_name: "T".into(),
        model: "m".into(),
        task: "sst2".into(),
        train: "train.tsv".into(),
        eval: "dev.tsv".into(),
        kind: Kind::Text,
        budget: Budget::preset(Kind::Text, true),
    }
}

/// How a fine-tuned model becomes a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    /// The fine-tuned float model itself (`model.safetensors`).
    None,
    /// `qn compress --method int8|int4 [--observer histogram]`.
    Scalar {
        /// 8 or 4.
        bits: u8,
        /// Histogram observer instead of min/max.
        histogram: bool,
    },
    /// `qn compress --method ipq --codebook f16|int8`, with the pipeline of issue 28 (distillation
    /// from the uncompressed model, activation-aware codebooks) or the paper's (labels only, plain
    /// k-means) named explicitly, whatever the command's defaults.
    Ipq {
        /// Centroids as int8 (else f16).
        int8: bool,
        /// Distillation and activation-aware codebooks.
        kd: bool,
        /// A bit-budget row: `--target-ratio` of [`Budget::rates`]`[i]` (the budget picks each
        /// layer's block size; else the default plan's, about 21-24x for text).
        rate: Option<usize>,
    },
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Method {
    /// Stable id for `--methods` and the cache (`family-detail`).
    pub id: &'static str,
    /// Plot series.
    pub family: &'static str,
    /// Short point label.
    pub label: &'static str,
    /// Training noise of the fine-tune (`qn finetune --noise`), `{every}` filled from the budget.
    pub noise: &'static str,
    /// Compression of the fine-tuned model.
    pub compress: Compress,
    /// Run again for every seed of `--seeds`.
    pub headline: bool,
    /// Run by `--quick` too.
    pub quick: bool,
}

/// A point of a method's rate-accuracy curve: the bit budget at the suite's `rate`-th ratio.
const fn at_rate(
    id: &'static str,
    family: &'static str,
    label: &'static str,
    noise: &'static str,
    kd: bool,
    rate: usize,
    quick: bool,
) -> Method {
    Method {
        id,
        family,
        label,
        noise,
        compress: Compress::Ipq {
            int8: false,
            kd,
            rate: Some(rate),
        },
        headline: kd,
        quick,
    }
}

/// Every method, in table order.
pub const METHODS: &[Method] = &[
    Method {
        id: "fp32",
        family: "fp32",
        label: "fp32",
        noise: "none",
        compress: Compress::None,
        headline: true,
        quick: true,
    },
    Method {
        id: "ptq-int8",
        family: "post-training",
        label: "int8",
        noise: "none",
        compress: Compress::Scalar {
            bits: 8,
            histogram: false,
        },
        headline: false,
        quick: true,
    },
    Method {
        id: "ptq-int4",
        family: "post-training",
        label: "int4",
        noise: "none",
        compress: Compress::Scalar {
            bits: 4,
            histogram: false,
        },
        headline: false,
        quick: true,
    },
    Method {
        id: "ptq-int8-hist",
        family: "post-training (histogram)",
        label: "int8",
        noise: "none",
        compress: Compress::Scalar {
            bits: 8,
            histogram: true,
        },
        headline: false,
        quick: true,
    },
    Method {
        id: "ptq-int4-hist",
        family: "post-training (histogram)",
        label: "int4",
        noise: "none",
        compress: Compress::Scalar {
            bits: 4,
            histogram: true,
        },
        headline: false,
        quick: true,
    },
    Method {
        id: "ptq-ipq",
        family: "post-training",
        label: "iPQ",
        noise: "none",
        compress: Compress::Ipq {
            int8: false,
            kd: false,
            rate: None,
        },
        headline: true,
        quick: true,
    },
    Method {
        id: "ipq-kd",
        family: "post-training + KD",
        label: "iPQ-KD",
        noise: "none",
        compress: Compress::Ipq {
            int8: false,
            kd: true,
            rate: None,
        },
        headline: true,
        quick: true,
    },
    Method {
        id: "qat-int4",
        family: "QAT",
        label: "int4",
        noise: "scalar:bits=4,p=1,every={every}",
        compress: Compress::Scalar {
            bits: 4,
            histogram: false,
        },
        headline: false,
        quick: true,
    },
    Method {
        id: "qat-ipq",
        family: "QAT",
        label: "iPQ",
        noise: "pq:p=1,k=256,every={every}",
        compress: Compress::Ipq {
            int8: false,
            kd: false,
            rate: None,
        },
        headline: true,
        quick: true,
    },
    Method {
        id: "qn-block-0.05",
        family: "Quant-Noise",
        label: "iPQ p=0.05",
        noise: "block:p=0.05",
        compress: Compress::Ipq {
            int8: false,
            kd: false,
            rate: None,
        },
        headline: false,
        quick: true,
    },
    Method {
        id: "qn-block-0.1",
        family: "Quant-Noise",
        label: "iPQ p=0.1",
        noise: "block:p=0.1",
        compress: Compress::Ipq {
            int8: false,
            kd: false,
            rate: None,
        },
        headline: true,
        quick: true,
    },
    Method {
        id: "qn-block-0.2",
        family: "Quant-Noise",
        label: "iPQ p=0.2",
        noise: "block:p=0.2",
        compress: Compress::Ipq {
            int8: false,
            kd: false,
            rate: None,
        },
        headline: false,
        quick: true,
    },
    Method {
        id: "qn-ipq-kd",
        family: "Quant-Noise + KD",
        label: "iPQ-KD p=0.1",
        noise: "block:p=0.1",
        compress: Compress::Ipq {
            int8: false,
            kd: true,
            rate: None,
        },
        headline: true,
        quick: true,
    },
    Method {
        id: "qn-int4",
        family: "Quant-Noise",
        label: "int4",
        noise: "scalar:bits=4,p=0.5,every={every}",
        compress: Compress::Scalar {
            bits: 4,
            histogram: false,
        },
        headline: false,
        quick: true,
    },
    Method {
        id: "qn-int8",
        family: "Quant-Noise",
        label: "int8",
        noise: "scalar:bits=8,p=0.5,every={every}",
        compress: Compress::Scalar {
            bits: 8,
            histogram: false,
        },
        headline: false,
        quick: true,
    },
    Method {
        id: "qn-ipq-int8c",
        family: "Quant-Noise + int8 centroids",
        label: "iPQ+int8 p=0.1",
        noise: "block:p=0.1",
        compress: Compress::Ipq {
            int8: true,
            kd: false,
            rate: None,
        },
        headline: true,
        quick: true,
    },
    // Rate-accuracy curves: the same pipelines with the bit budget at the suite's three ratios
    // (`Budget::rates`: 10x, 20x, 30x for text).
    at_rate(
        "ptq-ipq-low",
        "post-training, budget",
        "low",
        "none",
        false,
        0,
        false,
    ),
    at_rate(
        "ptq-ipq-mid",
        "post-training, budget",
        "mid",
        "none",
        false,
        1,
        false,
    ),
    at_rate(
        "ptq-ipq-high",
        "post-training, budget",
        "high",
        "none",
        false,
        2,
        false,
    ),
    at_rate(
        "ipq-kd-low",
        "post-training + KD, budget",
        "low",
        "none",
        true,
        0,
        true,
    ),
    at_rate(
        "ipq-kd-mid",
        "post-training + KD, budget",
        "mid",
        "none",
        true,
        1,
        true,
    ),
    at_rate(
        "ipq-kd-high",
        "post-training + KD, budget",
        "high",
        "none",
        true,
        2,
        true,
    ),
    at_rate(
        "qn-ipq-kd-low",
        "Quant-Noise + KD, budget",
        "low p=0.1",
        "block:p=0.1",
        true,
        0,
        false,
    ),
    at_rate(
        "qn-ipq-kd-mid",
        "Quant-Noise + KD, budget",
        "mid p=0.1",
        "block:p=0.1",
        true,
        1,
        false,
    ),
    at_rate(
        "qn-ipq-kd-high",
        "Quant-Noise + KD, budget",
        "high p=0.1",
        "block:p=0.1",
        true,
        2,
        false,
    ),
];

/// The methods `filter` keeps: exact ids or prefixes of ids (`ptq`, `qn-block`); fp32 always,
/// since every Δ is against it. An unknown name is an error listing the ids.
pub fn select(filter: Option<&[String]>) -> Result<Vec<Method>, String> {
    let Some(filter) = filter else {
        return Ok(METHODS.to_vec());
    };
    for f in filter {
        if !METHODS
            .iter()
            .any(|m| m.id == f || m.id.starts_with(&format!("{f}-")))
        {
            let ids: Vec<_> = METHODS.iter().map(|m| m.id).collect();
            return Err(format!(
                "--methods: no method `{f}`; the methods are {}",
                ids.join(", ")
            ));
        }
    }
    Ok(METHODS
        .iter()
        .filter(|m| {
            m.id == "fp32"
                || filter
                    .iter()
                    .any(|f| m.id == f || m.id.starts_with(&format!("{f}-")))
        })
        .copied()
        .collect())
}

impl Method {
    /// The `--noise` argument for `budget`.
    pub fn noise_spec(&self, budget: &Budget) -> String {
        self.noise.replace("{every}", &budget.pq_every.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_fp32_comes_first() {
        let mut ids: Vec<_> = METHODS.iter().map(|m| m.id).collect();
        assert_eq!(ids[0], "fp32");
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), METHODS.len());
    }

    #[test]
    fn filters_by_prefix_and_keeps_fp32() {
        let got = select(Some(&["qn-block".to_string()])).unwrap();
        let ids: Vec<_> = got.iter().map(|m| m.id).collect();
        assert_eq!(
            ids,
            ["fp32", "qn-block-0.05", "qn-block-0.1", "qn-block-0.2"]
        );
        let err = select(Some(&["nope".to_string()])).unwrap_err();
        assert!(err.contains("nope") && err.contains("ptq-int8"), "{err}");
    }

    #[test]
    fn pq_noise_refresh_comes_from_the_budget() {
        let m = METHODS.iter().find(|m| m.id == "qat-ipq").unwrap();
        let b = Budget::preset(Kind::Text, true);
        assert_eq!(m.noise_spec(&b), "pq:p=1,k=256,every=6");
    }
}
