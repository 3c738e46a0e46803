//! Block layouts: how a layer's weight is cut into the blocks that PQ encodes and noise drops.
//!
//! Every supported weight is first seen as a matrix of `rows = shape[0]` output units by
//! `cols = numel / rows` inputs (for a Conv2d filter, its flattened `(in/groups, kh, kw)`), and each row
//! is cut into `cols / block_size` contiguous blocks. Sub-vectors are numbered in the column order of the
//! paper's reference code: block `b` of row `o` is sub-vector `j = b * rows + o`.
//!
//! With `block_size = kh * kw` a Conv2d block is one whole kernel; for a 1x1 conv a block is
//! `block_size` consecutive input channels of one filter, so the mask has the weight's own shape (the
//! reference code's 1x1 mask-shape bug cannot occur). Depthwise convs (`in/groups = 1`) are ordinary.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_kernels::layout::BlockLayout;
//!
//! // A Linear weight (out = 2, in = 4) with blocks of 2.
//! let w = Tensor::new(&[[0f32, 1., 2., 3.], [4., 5., 6., 7.]], &Device::Cpu)?;
//! let layout = BlockLayout::linear("fc", w.dims(), 2)?;
//! let sub = layout.to_subvectors(&w)?;
//! // j = b * out + o: (b=0,o=0), (b=0,o=1), (b=1,o=0), (b=1,o=1).
//! assert_eq!(sub.to_vec2::<f32>()?, vec![vec![0., 1.], vec![4., 5.], vec![2., 3.], vec![6., 7.]]);
//! assert_eq!(layout.from_subvectors(&sub)?.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
//! # Ok::<(), qn_kernels::Error>(())
//! ```

use candle_core::Tensor;

use crate::{Error, Result};

/// The kind of layer a weight belongs to; it fixes which shapes are valid and is recorded so that a
/// decoder can rebuild the weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// `(out_features, in_features)`.
    Linear,
    /// `(num_embeddings, embedding_dim)`.
    Embedding,
    /// `(out_channels, in_channels / groups, kh, kw)`.
    Conv2d,
}

impl LayerKind {
    /// The kind of a weight known only by its state-dict name and rank: rank 4 is a Conv2d, rank 2
    /// an Embedding when the name says so (`embed`, `wte`, `wpe`, `shared`), a Linear otherwise.
    pub fn infer(name: &str, rank: usize) -> Option<Self> {
        match rank {
            4 => Some(LayerKind::Conv2d),
            2 if is_embedding_name(name) => Some(LayerKind::Embedding),
            2 => Some(LayerKind::Linear),
            _ => None,
        }
    }

    fn rank(self) -> usize {
        match self {
            LayerKind::Linear | LayerKind::Embedding => 2,
            LayerKind::Conv2d => 4,
        }
    }
}

fn is_embedding_name(name: &str) -> bool {
    let last = name.trim_end_matches(".weight");
    let last = last.rsplit('.').next().unwrap_or(last);
    name.contains("embed") || matches!(last, "wte" | "wpe" | "shared")
}

fn is_attention_projection(name: &str) -> bool {
    const PARTS: [&str; 12] = [
        "attention",
        "attn",
        "query",
        "key",
        "value",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "o_proj",
        "qkv",
        "in_proj",
    ];
    let lower = name.to_ascii_lowercase();
    PARTS.iter().any(|p| lower.contains(p))
}

/// The largest divisor of `n` that is at most `cap` (1 for `n = 0`).
fn largest_divisor_up_to(n: usize, cap: usize) -> usize {
    (1..=cap.min(n).max(1))
        .rev()
        .find(|d| n.is_multiple_of(*d))
        .unwrap_or(1)
}

/// The paper's default block size for a weight: 4 for attention projections (named `attention`,
/// `attn`, `query`, `key`, `value`, `q_proj`, …), 8 for other linears and for embeddings,
/// `kh * kw` (one whole kernel) for k x k convs, and 4 input channels for 1x1 convs (the largest
/// divisor of the input channels up to 4 where 4 does not divide them). Every command that
/// compresses or noises a weight takes its default from here; the result may still not divide a
/// linear's inputs, which [`BlockLayout::new`] then reports.
///
/// ```
/// use qn_kernels::layout::{default_block_size, LayerKind};
/// assert_eq!(default_block_size("encoder.layer.0.attention.self.query", LayerKind::Linear, &[384, 384]), 4);
/// assert_eq!(default_block_size("encoder.layer.0.intermediate.dense", LayerKind::Linear, &[1536, 384]), 8);
/// assert_eq!(default_block_size("blocks.0.conv_dw", LayerKind::Conv2d, &[32, 1, 3, 3]), 9);
/// assert_eq!(default_block_size("blocks.1.se.conv_reduce", LayerKind::Conv2d, &[4, 6, 1, 1]), 3);
/// ```
pub fn default_block_size(name: &str, kind: LayerKind, shape: &[usize]) -> usize {
    match kind {
        LayerKind::Conv2d => BlockLayout::default_conv_block_size(shape),
        LayerKind::Embedding => 8,
        LayerKind::Linear if is_attention_projection(name) => 4,
        LayerKind::Linear => 8,
    }
}

/// A weight's shape cut into blocks of `block_size` along its input dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockLayout {
    kind: LayerKind,
    shape: Vec<usize>,
    block_size: usize,
}

impl BlockLayout {
    /// Validates `shape` for `kind` and that `block_size` divides each row; errors name `tensor`.
    pub fn new(tensor: &str, kind: LayerKind, shape: &[usize], block_size: usize) -> Result<Self> {
        if shape.len() != kind.rank() {
            return Err(Error::shape(
                tensor,
                format!(
                    "a {kind:?} weight has rank {}, got shape {shape:?}",
                    kind.rank()
                ),
            ));
        }
        if shape.contains(&0) {
            return Err(Error::shape(
                tensor,
                format!("shape {shape:?} has a zero dimension"),
            ));
        }
        let cols: usize = shape[1..].iter().product();
        if block_size == 0 || !cols.is_multiple_of(block_size) {
            let hint = match (kind, shape) {
                (LayerKind::Conv2d, [_, cin, 1, 1]) => format!(
                    ": a 1x1 conv's blocks are runs of its {cin} input channels, so use a divisor of {cin} such as {}",
                    largest_divisor_up_to(*cin, 4)
                ),
                _ => String::new(),
            };
            return Err(Error::shape(
                tensor,
                format!(
                    "block size {block_size} does not divide the {cols} inputs per row of shape {shape:?}{hint}"
                ),
            ));
        }
        if let (LayerKind::Conv2d, [_, _, kh, kw]) = (kind, shape) {
            let k = kh * kw;
            // Blocks of whole kernels (the paper's PQ/block-drop unit) or parts of one kernel
            // (element-wise scalar noise); never a block that straddles two kernels.
            if k > 1 && !block_size.is_multiple_of(k) && k % block_size != 0 {
                return Err(Error::shape(
                    tensor,
                    format!(
                        "block size {block_size} would cut the {kh}x{kw} kernels of shape {shape:?} apart: \
                         a k x k conv's blocks are whole kernels or parts of one, so use a multiple of {k} or a divisor of {k}"
                    ),
                ));
            }
        }
        Ok(Self {
            kind,
            shape: shape.to_vec(),
            block_size,
        })
    }

    /// A Linear weight `(out, in)`.
    pub fn linear(tensor: &str, shape: &[usize], block_size: usize) -> Result<Self> {
        Self::new(tensor, LayerKind::Linear, shape, block_size)
    }

    /// An Embedding weight `(num, dim)`.
    pub fn embedding(tensor: &str, shape: &[usize], block_size: usize) -> Result<Self> {
        Self::new(tensor, LayerKind::Embedding, shape, block_size)
    }

    /// A Conv2d weight `(out, in/groups, kh, kw)`.
    pub fn conv2d(tensor: &str, shape: &[usize], block_size: usize) -> Result<Self> {
        Self::new(tensor, LayerKind::Conv2d, shape, block_size)
    }

    /// The paper's default block size for a conv: one whole kernel for k x k, 4 input channels for 1x1
    /// (the largest divisor of the input channels up to 4 where 4 does not divide them, e.g. the 6 or
    /// 10 channels of EfficientNet's squeeze-and-excitation convs; 1 for depthwise).
    pub fn default_conv_block_size(shape: &[usize]) -> usize {
        match shape {
            [_, _, kh, kw] if kh * kw > 1 => kh * kw,
            [_, cin, _, _] => largest_divisor_up_to(*cin, 4),
            _ => 1,
        }
    }

    /// The layer kind.
    pub fn kind(&self) -> LayerKind {
        self.kind
    }

    /// The weight's full shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Elements per block (the PQ sub-vector dimension `d`).
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Output units (first dimension).
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Inputs per output unit.
    pub fn cols(&self) -> usize {
        self.shape[1..].iter().product()
    }

    /// Blocks in one row.
    pub fn blocks_per_row(&self) -> usize {
        self.cols() / self.block_size
    }

    /// Blocks in the whole weight (the number of PQ sub-vectors).
    pub fn n_blocks(&self) -> usize {
        self.rows() * self.blocks_per_row()
    }

    /// Elements in the weight.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The sub-vector index of block `b` of row `o`.
    pub fn subvector_index(&self, row: usize, block: usize) -> usize {
        block * self.rows() + row
    }

    /// The same weight cut into blocks of another size.
    pub fn with_block_size(&self, tensor: &str, block_size: usize) -> Result<Self> {
        Self::new(tensor, self.kind, &self.shape, block_size)
    }

    fn check(&self, tensor: &Tensor, what: &str) -> Result<()> {
        if tensor.dims() != self.shape.as_slice() {
            return Err(Error::shape(
                what,
                format!("expected shape {:?}, got {:?}", self.shape, tensor.dims()),
            ));
        }
        Ok(())
    }

    /// Cuts `weight` into its `(n_blocks, block_size)` sub-vector matrix, row `j = b * rows + o`.
    pub fn to_subvectors(&self, weight: &Tensor) -> Result<Tensor> {
        self.check(weight, "weight")?;
        let (rows, bpr, bs) = (self.rows(), self.blocks_per_row(), self.block_size);
        Ok(weight
            .reshape((rows, bpr, bs))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((bpr * rows, bs))?)
    }

    /// Inverse of [`Self::to_subvectors`]: rebuilds the weight from its sub-vector matrix.
    pub fn from_subvectors(&self, subvectors: &Tensor) -> Result<Tensor> {
        let (rows, bpr, bs) = (self.rows(), self.blocks_per_row(), self.block_size);
        if subvectors.dims() != [bpr * rows, bs] {
            return Err(Error::shape(
                "subvectors",
                format!(
                    "expected ({}, {bs}), got {:?}",
                    bpr * rows,
                    subvectors.dims()
                ),
            ));
        }
        Ok(subvectors
            .reshape((bpr, rows, bs))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape(self.shape.as_slice())?)
    }

    /// Expands a per-block tensor `(rows, blocks_per_row)` to the weight's shape, repeating each value
    /// over its block.
    pub fn expand_block_values(&self, per_block: &Tensor) -> Result<Tensor> {
        let (rows, bpr, bs) = (self.rows(), self.blocks_per_row(), self.block_size);
        Ok(per_block
            .reshape((rows, bpr, 1))?
            .broadcast_as((rows, bpr, bs))?
            .contiguous()?
            .reshape(self.shape.as_slice())?)
    }
}
