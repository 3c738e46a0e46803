//! Per-tensor settings: the command line's defaults, overridden by the first matching rule of a
//! TOML rule file (the paper's per-layer-type configuration).
//!
//! ```toml
//! # Attention projections: PQ with 4-dim blocks; FFN: 8-dim blocks; embeddings stay int8.
//! [[rule]]
//! match = "attention\\.(self|output)"
//! method = "pq"
//! block_size = 4
//!
//! [[rule]]
//! match = "intermediate|output\\.dense"
//! method = "pq"
//! block_size = 8
//! centroids = 256
//!
//! [[rule]]
//! match = "embeddings"
//! method = "int8"
//! ```

use std::path::Path;

use anyhow::{bail, Context, Result};
use qn_format::header::CodebookKind;
use qn_kernels::scalar::{Granularity, ObserverKind, Scheme};
use regex::Regex;
use serde::Deserialize;

/// What happens to one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Kept unchanged.
    Raw,
    /// Scalar int-N.
    Int(u8),
    /// Product quantization.
    Pq,
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "raw" => Ok(Method::Raw),
            "pq" => Ok(Method::Pq),
            _ => match s.strip_prefix("int").and_then(|b| b.parse::<u8>().ok()) {
                Some(bits) if (2..=8).contains(&bits) => Ok(Method::Int(bits)),
                _ => Err(format!(
                    "`{s}` is not a method: use raw, pq, or int2 .. int8"
                )),
            },
        }
    }
}

/// Parses `tensor`, `channel`, `channel:<axis>` or `group:<size>`.
pub fn parse_granularity(s: &str) -> std::result::Result<Granularity, String> {
    let bad = || format!("`{s}` is not a granularity: use tensor, channel[:axis] or group:<size>");
    match s.split_once(':') {
        None if s == "tensor" => Ok(Granularity::PerTensor),
        None if s == "channel" => Ok(Granularity::PerChannel { axis: 0 }),
        Some(("channel", a)) => Ok(Granularity::PerChannel {
            axis: a.parse().map_err(|_| bad())?,
        }),
        Some(("group", g)) => match g.parse() {
            Ok(size) if size > 0 => Ok(Granularity::PerGroup { size }),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// Parses `minmax` or `histogram`.
pub fn parse_observer(s: &str) -> std::result::Result<ObserverKind, String> {
    match s {
        "minmax" => Ok(ObserverKind::MinMax),
        "histogram" => Ok(ObserverKind::HISTOGRAM),
        _ => Err(format!("`{s}` is not an observer: use minmax or histogram")),
    }
}

/// Parses `affine` or `symmetric`.
pub fn parse_scheme(s: &str) -> std::result::Result<Scheme, String> {
    match s {
        "affine" => Ok(Scheme::Affine),
        "symmetric" => Ok(Scheme::Symmetric),
        _ => Err(format!("`{s}` is not a scheme: use affine or symmetric")),
    }
}

/// Parses `f16`, `f32` or `int8`.
pub fn parse_codebook(s: &str) -> std::result::Result<CodebookKind, String> {
    match s {
        "f16" => Ok(CodebookKind::F16),
        "f32" => Ok(CodebookKind::F32),
        "int8" => Ok(CodebookKind::Int8),
        _ => Err(format!(
            "`{s}` is not a codebook type: use f16, f32 or int8"
        )),
    }
}

/// The settings of one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Method.
    pub method: Method,
    /// PQ block size (`None`: the paper's default per layer kind).
    pub block_size: Option<usize>,
    /// PQ centroids.
    pub centroids: usize,
    /// Codebook storage.
    pub codebook: CodebookKind,
    /// Scalar granularity.
    pub granularity: Granularity,
    /// Scalar observer.
    pub observer: ObserverKind,
    /// Scalar scheme.
    pub scheme: Scheme,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match")]
    pattern: String,
    method: Option<String>,
    block_size: Option<usize>,
    centroids: Option<usize>,
    codebook: Option<String>,
    granularity: Option<String>,
    observer: Option<String>,
    scheme: Option<String>,
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    pattern: Regex,
    raw: RawRule,
}

/// Loads a rule file; errors name the file and the rule.
pub fn load_rules(path: &Path) -> Result<Vec<Rule>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the rule file", path.display()))?;
    let file: RuleFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
    let mut rules = Vec::new();
    for (i, raw) in file.rule.into_iter().enumerate() {
        let label = format!("{}: rule {} (`{}`)", path.display(), i + 1, raw.pattern);
        let ctx = || label.clone();
        let pattern = Regex::new(&raw.pattern).with_context(ctx)?;
        // Check every value now rather than at the tensor that first uses it.
        let rule = Rule { pattern, raw };
        rule.apply(&mut Plan::default_for_check())
            .map_err(|e| anyhow::anyhow!("{}: {e}", ctx()))?;
        rules.push(rule);
    }
    Ok(rules)
}

impl Plan {
    fn default_for_check() -> Self {
        Plan {
            method: Method::Raw,
            block_size: None,
            centroids: 1,
            codebook: CodebookKind::F16,
            granularity: Granularity::PerTensor,
            observer: ObserverKind::MinMax,
            scheme: Scheme::Affine,
        }
    }
}

impl Rule {
    fn apply(&self, plan: &mut Plan) -> std::result::Result<(), String> {
        let r = &self.raw;
        if let Some(m) = &r.method {
            plan.method = m.parse()?;
        }
        if let Some(b) = r.block_size {
            plan.block_size = Some(b);
        }
        if let Some(k) = r.centroids {
            plan.centroids = k;
        }
        if let Some(c) = &r.codebook {
            plan.codebook = parse_codebook(c)?;
        }
        if let Some(g) = &r.granularity {
            plan.granularity = parse_granularity(g)?;
        }
        if let Some(o) = &r.observer {
            plan.observer = parse_observer(o)?;
        }
        if let Some(s) = &r.scheme {
            plan.scheme = parse_scheme(s)?;
        }
        if plan.block_size == Some(0) {
            return Err("block_size must be at least 1".into());
        }
        if !(1..=65_536).contains(&plan.centroids) {
            return Err(format!(
                "centroids = {} is outside 1..=65536",
                plan.centroids
            ));
        }
        if let Granularity::PerGroup { size: 0 } = plan.granularity {
            return Err("granularity group:0: a group has at least 1 element".into());
        }
        Ok(())
    }
}

impl Plan {
    /// The PQ block size of tensor `name`: the plan's, else the paper's default for its kind.
    pub fn block_size_for(
        &self,
        name: &str,
        kind: qn_kernels::layout::LayerKind,
        shape: &[usize],
    ) -> usize {
        self.block_size
            .unwrap_or_else(|| qn_kernels::layout::default_block_size(name, kind, shape))
    }
}

/// The plan of tensor `name`: `defaults`, changed by the first rule whose pattern matches.
pub fn plan_for(name: &str, defaults: Plan, rules: &[Rule]) -> Result<Plan> {
    let mut plan = defaults;
    if let Some(rule) = rules.iter().find(|r| r.pattern.is_match(name)) {
        if let Err(e) = rule.apply(&mut plan) {
            bail!("tensor `{name}`: rule `{}`: {e}", rule.pattern);
        }
    }
    Ok(plan)
}
