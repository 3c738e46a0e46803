//! What a run trains: a list of stages read from TOML (the paper's iPQ schedule), each naming the
//! layers it product-quantizes and how long it then trains.
//!
//! ```
//! use qn_train::trainer::StagePlan;
//! let plan = StagePlan::from_toml(r#"
//!     int8_centroids = true
//!     [[stage]]
//!     name = "float"
//!     epochs = 1.0
//!     [[stage]]
//!     name = "ffn"
//!     layers = "fc1|fc2"
//!     centroids = 256
//!     steps = 300
//! "#)?;
//! assert_eq!(plan.stages.len(), 2);
//! # Ok::<(), qn_train::Error>(())
//! ```

use qn_kernels::layout::{default_block_size, BlockLayout};
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One stage of a run.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// A label for logs.
    pub name: String,
    /// Regex of the layer names to product-quantize at the start of the stage (none: train only).
    #[serde(default)]
    pub layers: Option<String>,
    /// Block size; default by layer as in the paper
    /// ([`qn_kernels::layout::default_block_size`]).
    #[serde(default)]
    pub block_size: Option<usize>,
    /// Centroids per layer (default 256). The key is `centroids`, as in `qn quantize`'s rule files
    /// (`n_centroids` is accepted too).
    #[serde(default = "default_centroids", alias = "n_centroids")]
    pub centroids: usize,
    /// Training steps after quantizing (or give `epochs`).
    #[serde(default)]
    pub steps: Option<usize>,
    /// Training length in passes over the training set, when `steps` is absent.
    #[serde(default)]
    pub epochs: Option<f64>,
    /// Per-layer exceptions: the first whose `match` regex fits a layer name sets its block size
    /// and/or centroids.
    #[serde(default, rename = "override")]
    pub overrides: Vec<StageOverride>,
}

/// A per-layer exception inside a stage.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StageOverride {
    /// Layer-name regex.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Block size for the matching layers.
    #[serde(default)]
    pub block_size: Option<usize>,
    /// Centroids for the matching layers.
    #[serde(default, alias = "n_centroids")]
    pub centroids: Option<usize>,
}

fn default_centroids() -> usize {
    256
}

impl Stage {
    fn field(&self, f: &str) -> String {
        format!("stage `{}`: {f}", self.name)
    }

    /// Steps of this stage for `n` training examples and `per_step` examples per optimizer step.
    pub fn total_steps(&self, n: usize, per_step: usize) -> Result<usize> {
        match (self.steps, self.epochs) {
            (Some(s), _) => Ok(s),
            (None, Some(e)) if e.is_finite() && e > 0.0 => {
                let steps = (e * n as f64 / per_step.max(1) as f64).ceil();
                if steps > 1e12 {
                    return Err(Error::config(
                        self.field("epochs"),
                        format!("{e} is too many"),
                    ));
                }
                Ok((steps as usize).max(1))
            }
            (None, Some(e)) => Err(Error::config(
                self.field("epochs"),
                format!("{e} is not a positive number"),
            )),
            (None, None) => Err(Error::config(
                self.field("steps"),
                "a stage needs `steps` or a positive `epochs`",
            )),
        }
    }

    /// `(block size, centroids)` of layer `name`: the first matching override, else the stage's
    /// values, else the paper's defaults.
    pub fn settings_for(&self, name: &str, layout: &BlockLayout) -> (usize, usize) {
        let o = self
            .overrides
            .iter()
            .find(|o| Regex::new(&o.pattern).is_ok_and(|r| r.is_match(name)));
        let bs = o
            .and_then(|o| o.block_size)
            .or(self.block_size)
            .unwrap_or_else(|| default_block_size(name, layout.kind(), layout.shape()));
        let k = o.and_then(|o| o.centroids).unwrap_or(self.centroids);
        (bs, k)
    }

    fn validate(&self) -> Result<()> {
        if self.name.is_empty() {
            return Err(Error::config("stage name", "must not be empty"));
        }
        let regex = |f: &str, p: &str| {
            Regex::new(p)
                .map(|_| ())
                .map_err(|e| Error::config(self.field(f), e.to_string().replace('\n', " ")))
        };
        if let Some(p) = &self.layers {
            regex("layers", p)?;
        }
        let ks = std::iter::once((self.centroids, "centroids")).chain(
            self.overrides
                .iter()
                .filter_map(|o| o.centroids.map(|k| (k, "override centroids"))),
        );
        for (k, f) in ks {
            if !(1..=1 << 16).contains(&k) {
                return Err(Error::config(
                    self.field(f),
                    format!("{k} is outside 1..=65536"),
                ));
            }
        }
        let bss = self
            .block_size
            .into_iter()
            .chain(self.overrides.iter().filter_map(|o| o.block_size));
        for bs in bss {
            if bs == 0 {
                return Err(Error::config(
                    self.field("block_size"),
                    "must be at least 1",
                ));
            }
        }
        for o in &self.overrides {
            regex("override match", &o.pattern)?;
        }
        if self.steps == Some(0) {
            return Err(Error::config(self.field("steps"), "must be at least 1"));
        }
        self.total_steps(1, 1)?;
        Ok(())
    }
}

/// A staged run read from TOML: `[[stage]]` tables and `int8_centroids`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StagePlan {
    /// The stages in order.
    #[serde(rename = "stage")]
    pub stages: Vec<Stage>,
    /// Round every codebook to int8 at the end ("iPQ + int8").
    #[serde(default)]
    pub int8_centroids: bool,
}

impl StagePlan {
    /// Parses a TOML plan; errors name the field.
    pub fn from_toml(text: &str) -> Result<Self> {
        let plan: StagePlan = toml::from_str(text)
            .map_err(|e| Error::config("stage plan", e.message().to_string().replace('\n', " ")))?;
        plan.validate()?;
        Ok(plan)
    }

    /// One float stage of `steps` steps.
    pub fn float(steps: usize) -> Self {
        Self {
            stages: vec![Stage {
                name: "float".into(),
                layers: None,
                block_size: None,
                centroids: default_centroids(),
                steps: Some(steps),
                epochs: None,
                overrides: Vec::new(),
            }],
            int8_centroids: false,
        }
    }

    /// One float stage of `epochs` passes over the training set.
    pub fn float_epochs(epochs: f64) -> Result<Self> {
        let mut plan = Self::float(1);
        plan.stages[0].steps = None;
        plan.stages[0].epochs = Some(epochs);
        plan.validate()?;
        Ok(plan)
    }

    /// Checks every stage; errors name the stage and field.
    pub fn validate(&self) -> Result<()> {
        if self.stages.is_empty() {
            return Err(Error::config("stage plan", "has no [[stage]]"));
        }
        self.stages.iter().try_for_each(Stage::validate)
    }
}
