//! The state-dict layouts EfficientNet checkpoints come in, and the renaming between them.
//!
//! The network is defined once, with EfficientNet-PyTorch's names (`_conv_stem`, `_bn0`,
//! `_blocks.N._depthwise_conv`, `_fc`, …: the layout of `../shared/models/efficientnet-lite0`).
//! torchvision (`features.S.M.block.I.J`, `classifier.1`) and timm (`conv_stem`, `blocks.S.M.conv_dw`,
//! `classifier`) number their blocks per stage and name the parts of a block by position or by
//! role; [`to_canonical`] maps them in, [`from_canonical`] maps a trained model back so that its
//! files load where the checkpoint came from.
//!
//! The layouts also differ in conventions the names do not carry: EfficientNet-PyTorch (ported
//! from TensorFlow) uses TensorFlow's "SAME" padding and batch-norm ε = 1e-3; torchvision and
//! timm's PyTorch-native variants pad symmetrically with ε = 1e-5 (timm's `tf_` variants keep
//! TensorFlow's, which is why [`WeightLayout::Timm`] takes a flag).
//!
//! ```
//! use qn_models::vision::layout::{detect, to_canonical, WeightLayout};
//! let names = ["features.0.0.weight", "features.1.0.block.0.0.weight", "classifier.1.weight"];
//! let layout = detect(names.iter().copied());
//! assert_eq!(layout, WeightLayout::Torchvision);
//! let map = to_canonical(names.iter().copied(), layout).unwrap();
//! assert_eq!(map["features.1.0.block.0.0.weight"], "_blocks.0._depthwise_conv.weight");
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::config::{ConvPadding, EfficientNetConfig};

/// The `.qnz` / safetensors metadata key of the blocks per stage (`1,2,2,3,3,4,1`).
pub const STAGES_KEY: &str = "efficientnet:stages";

/// Where a checkpoint's tensor names come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// lukemelas/EfficientNet-PyTorch (TensorFlow ports): the names the network is defined with.
    EfficientNetPytorch,
    /// torchvision's `efficientnet_b0` … `b7`.
    Torchvision,
    /// timm's `efficientnet_*` (`tf_conventions = false`) or `tf_efficientnet_*` (`true`).
    Timm {
        /// TensorFlow's "SAME" padding and ε = 1e-3, as timm's `tf_` variants.
        tf_conventions: bool,
    },
}

impl WeightLayout {
    /// The name written in `.qnz` metadata (`efficientnet:layout`).
    pub fn as_str(self) -> &'static str {
        match self {
            WeightLayout::EfficientNetPytorch => "efficientnet-pytorch",
            WeightLayout::Torchvision => "torchvision",
            WeightLayout::Timm {
                tf_conventions: false,
            } => "timm",
            WeightLayout::Timm {
                tf_conventions: true,
            } => "timm-tf",
        }
    }

    /// The inverse of [`Self::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "efficientnet-pytorch" => WeightLayout::EfficientNetPytorch,
            "torchvision" => WeightLayout::Torchvision,
            "timm" => WeightLayout::Timm {
                tf_conventions: false,
            },
            "timm-tf" => WeightLayout::Timm {
                tf_conventions: true,
            },
            _ => return None,
        })
    }

    /// `cfg` with this layout's padding and batch-norm conventions.
    pub fn conventions(self, cfg: EfficientNetConfig) -> EfficientNetConfig {
        let tf = match self {
            WeightLayout::EfficientNetPytorch => true,
            WeightLayout::Torchvision => false,
            WeightLayout::Timm { tf_conventions } => tf_conventions,
        };
        if tf {
            EfficientNetConfig {
                padding: ConvPadding::TfSame,
                bn_eps: 1e-3,
                bn_momentum: 0.01,
                ..cfg
            }
        } else {
            EfficientNetConfig {
                padding: ConvPadding::Symmetric,
                bn_eps: 1e-5,
                bn_momentum: 0.1,
                ..cfg
            }
        }
    }
}

/// The layout of a set of tensor names (EfficientNet-PyTorch when it is neither other).
pub fn detect<'a>(names: impl IntoIterator<Item = &'a str>) -> WeightLayout {
    let mut layout = WeightLayout::EfficientNetPytorch;
    for n in names {
        if n.starts_with("features.") {
            return WeightLayout::Torchvision;
        }
        if n.starts_with("conv_stem.") || n.starts_with("blocks.") {
            layout = WeightLayout::Timm {
                tf_conventions: false,
            };
        }
    }
    layout
}

/// `(stage, block) → global block index`, from the `prefix.S.M.` names present.
fn block_numbers<'a>(
    names: impl IntoIterator<Item = &'a str>,
    prefix: &str,
) -> BTreeMap<(usize, usize), usize> {
    let mut seen = BTreeSet::new();
    for n in names {
        let Some(rest) = n.strip_prefix(prefix) else {
            continue;
        };
        let mut it = rest.split('.');
        if let (Some(Ok(s)), Some(Ok(m))) = (
            it.next().map(str::parse::<usize>),
            it.next().map(str::parse::<usize>),
        ) {
            seen.insert((s, m));
        }
    }
    seen.into_iter()
        .enumerate()
        .map(|(g, sm)| (sm, g))
        .collect()
}

/// Renames a checkpoint's tensors to the canonical (EfficientNet-PyTorch) names: `old → new` for
/// every name given. A name the layout does not explain is an error naming it.
pub fn to_canonical<'a>(
    names: impl IntoIterator<Item = &'a str> + Clone,
    layout: WeightLayout,
) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    match layout {
        WeightLayout::EfficientNetPytorch => {
            for n in names {
                out.insert(n.to_string(), n.to_string());
            }
        }
        WeightLayout::Torchvision => {
            let all: Vec<&str> = names.clone().into_iter().collect();
            let blocks = block_numbers(
                all.iter().copied().filter(|n| n.contains(".block.")),
                "features.",
            );
            let stages: BTreeSet<usize> = blocks.keys().map(|(s, _)| *s).collect();
            let head_stage = stages.iter().max().map_or(0, |s| s + 1);
            for &n in &all {
                let new = torchvision_name(n, &blocks, head_stage, &all).ok_or_else(|| {
                    format!("tensor `{n}` is not part of a torchvision EfficientNet")
                })?;
                out.insert(n.to_string(), new);
            }
        }
        WeightLayout::Timm { .. } => {
            let all: Vec<&str> = names.clone().into_iter().collect();
            let blocks = block_numbers(all.iter().copied(), "blocks.");
            for &n in &all {
                let new = timm_name(n, &blocks, &all)
                    .ok_or_else(|| format!("tensor `{n}` is not part of a timm EfficientNet"))?;
                out.insert(n.to_string(), new);
            }
        }
    }
    Ok(out)
}

/// The other direction: canonical names → `layout`'s, for the canonical names of a whole model
/// whose stages hold `stage_sizes` blocks ([`EfficientNetConfig::blocks_per_stage`]; written to a
/// `.qnz` as [`STAGES_KEY`] so that `qn decompress` can rename without the config).
pub fn from_canonical(
    canonical: &[String],
    layout: WeightLayout,
    stage_sizes: &[usize],
) -> Result<HashMap<String, String>, String> {
    // Build the layout's names for this architecture, map them in, and invert.
    let mut theirs = Vec::new();
    let total: usize = stage_sizes.iter().sum();
    let has = |n: &str| canonical.iter().any(|c| c.starts_with(n));
    let expands: Vec<bool> = (0..total)
        .map(|g| has(&format!("_blocks.{g}._expand_conv.")))
        .collect();
    let se = has("_blocks.0._se_reduce.");
    let bn = |p: &str, out: &mut Vec<String>| {
        for s in ["weight", "bias", "running_mean", "running_var"] {
            out.push(format!("{p}.{s}"));
        }
    };
    let mut g = 0;
    match layout {
        WeightLayout::EfficientNetPytorch => {
            return Ok(canonical.iter().map(|n| (n.clone(), n.clone())).collect())
        }
        WeightLayout::Torchvision => {
            theirs.push("features.0.0.weight".to_string());
            bn("features.0.1", &mut theirs);
            for (s, &count) in stage_sizes.iter().enumerate() {
                for m in 0..count {
                    let p = format!("features.{}.{m}.block", s + 1);
                    let mut i = 0;
                    if expands[g] {
                        theirs.push(format!("{p}.0.0.weight"));
                        bn(&format!("{p}.0.1"), &mut theirs);
                        i = 1;
                    }
                    theirs.push(format!("{p}.{i}.0.weight"));
                    bn(&format!("{p}.{i}.1"), &mut theirs);
                    i += 1;
                    if se {
                        for f in ["fc1", "fc2"] {
                            theirs.push(format!("{p}.{i}.{f}.weight"));
                            theirs.push(format!("{p}.{i}.{f}.bias"));
                        }
                        i += 1;
                    }
                    theirs.push(format!("{p}.{i}.0.weight"));
                    bn(&format!("{p}.{i}.1"), &mut theirs);
                    g += 1;
                }
            }
            let h = stage_sizes.len() + 1;
            theirs.push(format!("features.{h}.0.weight"));
            bn(&format!("features.{h}.1"), &mut theirs);
            theirs.push("classifier.1.weight".into());
            theirs.push("classifier.1.bias".into());
        }
        WeightLayout::Timm { .. } => {
            theirs.push("conv_stem.weight".into());
            bn("bn1", &mut theirs);
            for (s, &count) in stage_sizes.iter().enumerate() {
                for m in 0..count {
                    let p = format!("blocks.{s}.{m}");
                    if expands[g] {
                        theirs.push(format!("{p}.conv_pw.weight"));
                        bn(&format!("{p}.bn1"), &mut theirs);
                        theirs.push(format!("{p}.conv_dw.weight"));
                        bn(&format!("{p}.bn2"), &mut theirs);
                    } else {
                        theirs.push(format!("{p}.conv_dw.weight"));
                        bn(&format!("{p}.bn1"), &mut theirs);
                    }
                    if se {
                        for f in ["conv_reduce", "conv_expand"] {
                            theirs.push(format!("{p}.se.{f}.weight"));
                            theirs.push(format!("{p}.se.{f}.bias"));
                        }
                    }
                    if expands[g] {
                        theirs.push(format!("{p}.conv_pwl.weight"));
                        bn(&format!("{p}.bn3"), &mut theirs);
                    } else {
                        theirs.push(format!("{p}.conv_pw.weight"));
                        bn(&format!("{p}.bn2"), &mut theirs);
                    }
                    g += 1;
                }
            }
            theirs.push("conv_head.weight".into());
            bn("bn2", &mut theirs);
            theirs.push("classifier.weight".into());
            theirs.push("classifier.bias".into());
        }
    }
    let forward = to_canonical(theirs.iter().map(String::as_str), layout)?;
    let inverse: HashMap<&str, &str> = forward
        .iter()
        .map(|(t, c)| (c.as_str(), t.as_str()))
        .collect();
    canonical
        .iter()
        .map(|c| {
            inverse
                .get(c.as_str())
                .map(|t| (c.clone(), t.to_string()))
                .ok_or_else(|| format!("tensor `{c}` has no {} name", layout.as_str()))
        })
        .collect()
}

/// `(stage, block, rest)` of `prefix.S.M.rest`.
fn split_block<'a>(n: &'a str, prefix: &str) -> Option<(usize, usize, &'a str)> {
    let rest = n.strip_prefix(prefix)?;
    let (s, rest) = rest.split_once('.')?;
    let (m, rest) = rest.split_once('.')?;
    Some((s.parse().ok()?, m.parse().ok()?, rest))
}

fn torchvision_name(
    n: &str,
    blocks: &BTreeMap<(usize, usize), usize>,
    head_stage: usize,
    all: &[&str],
) -> Option<String> {
    let bn_or_conv = |rest: &str, conv: &str, bn: &str| -> Option<String> {
        let (which, field) = rest.split_once('.')?;
        match which {
            "0" if field == "weight" => Some(format!("{conv}.weight")),
            "1" => Some(format!("{bn}.{field}")),
            _ => None,
        }
    };
    if let Some(rest) = n.strip_prefix("features.0.") {
        return bn_or_conv(rest, "_conv_stem", "_bn0");
    }
    if let Some(rest) = n.strip_prefix("classifier.1.") {
        return Some(format!("_fc.{rest}"));
    }
    let (s, m, rest) = split_block(n, "features.")?;
    if s == head_stage && m <= 1 {
        return bn_or_conv(&format!("{m}.{rest}"), "_conv_head", "_bn1");
    }
    let g = blocks.get(&(s, m))?;
    let rest = rest.strip_prefix("block.")?;
    let (i, part) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    // Part positions: [expand,] depthwise, [se,] project.
    let prefix = format!("features.{s}.{m}.block.");
    let mut parts = 0;
    let mut has_se = false;
    for x in all.iter().filter_map(|x| x.strip_prefix(&prefix)) {
        if let Some((j, what)) = x.split_once('.') {
            parts = parts.max(j.parse::<usize>().map_or(0, |j| j + 1));
            has_se |= what.starts_with("fc1.");
        }
    }
    let expand = parts - usize::from(has_se) == 3;
    let roles: Vec<&str> = match (expand, has_se) {
        (true, true) => vec!["expand", "dw", "se", "project"],
        (true, false) => vec!["expand", "dw", "project"],
        (false, true) => vec!["dw", "se", "project"],
        (false, false) => vec!["dw", "project"],
    };
    let p = format!("_blocks.{g}");
    match *roles.get(i)? {
        "expand" => bn_or_conv(part, &format!("{p}._expand_conv"), &format!("{p}._bn0")),
        "dw" => bn_or_conv(part, &format!("{p}._depthwise_conv"), &format!("{p}._bn1")),
        "project" => bn_or_conv(part, &format!("{p}._project_conv"), &format!("{p}._bn2")),
        _ => {
            let (f, field) = part.split_once('.')?;
            let to = match f {
                "fc1" => "_se_reduce",
                "fc2" => "_se_expand",
                _ => return None,
            };
            Some(format!("{p}.{to}.{field}"))
        }
    }
}

fn timm_name(n: &str, blocks: &BTreeMap<(usize, usize), usize>, all: &[&str]) -> Option<String> {
    for (from, to) in [
        ("conv_stem.", "_conv_stem."),
        ("bn1.", "_bn0."),
        ("conv_head.", "_conv_head."),
        ("bn2.", "_bn1."),
        ("classifier.", "_fc."),
    ] {
        if let Some(rest) = n.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    let (s, m, rest) = split_block(n, "blocks.")?;
    let g = blocks.get(&(s, m))?;
    let (part, field) = rest.rsplit_once('.')?;
    let inverted = all
        .iter()
        .any(|x| x.starts_with(&format!("blocks.{s}.{m}.conv_pwl.")));
    let to = match (inverted, part) {
        (true, "conv_pw") => "_expand_conv",
        (true, "bn1") => "_bn0",
        (true, "bn2") => "_bn1",
        (true, "conv_pwl") => "_project_conv",
        (true, "bn3") => "_bn2",
        (false, "bn1") => "_bn1",
        (false, "conv_pw") => "_project_conv",
        (false, "bn2") => "_bn2",
        (_, "conv_dw") => "_depthwise_conv",
        (_, "se.conv_reduce") => "_se_reduce",
        (_, "se.conv_expand") => "_se_expand",
        _ => return None,
    };
    Some(format!("_blocks.{g}.{to}.{field}"))
}
