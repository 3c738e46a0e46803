//! Layout round trips on small hand-computed examples, one per layer type.

use candle_core::{Device, Tensor};
use qn_kernels::layout::{BlockLayout, LayerKind};

fn arange(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::arange(0f32, n as f32, &Device::Cpu)
        .unwrap()
        .reshape(shape)
        .unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

#[test]
fn linear_columns_follow_the_reference_order() {
    // W (out=3, in=4), block 2: sub-vector j = b * out + o is W[o, 2b..2b+2].
    let w = arange(&[3, 4]);
    let layout = BlockLayout::linear("fc", w.dims(), 2).unwrap();
    let sub = layout.to_subvectors(&w).unwrap();
    assert_eq!(
        rows(&sub),
        vec![
            vec![0., 1.],
            vec![4., 5.],
            vec![8., 9.],
            vec![2., 3.],
            vec![6., 7.],
            vec![10., 11.]
        ]
    );
    assert_eq!(layout.subvector_index(2, 1), 5);
    assert_eq!(rows(&layout.from_subvectors(&sub).unwrap()), rows(&w));
}

#[test]
fn embedding_blocks_cut_each_row() {
    let w = arange(&[2, 6]);
    let layout = BlockLayout::embedding("emb", w.dims(), 3).unwrap();
    assert_eq!(layout.kind(), LayerKind::Embedding);
    let sub = layout.to_subvectors(&w).unwrap();
    assert_eq!(
        rows(&sub),
        vec![
            vec![0., 1., 2.],
            vec![6., 7., 8.],
            vec![3., 4., 5.],
            vec![9., 10., 11.]
        ]
    );
    assert_eq!(
        layout
            .from_subvectors(&sub)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap(),
        rows(&w)
    );
}

#[test]
fn conv_kxk_block_is_one_kernel() {
    // (out=2, in=2, 2, 2): with block = kh*kw each block is one kernel.
    let w = arange(&[2, 2, 2, 2]);
    let bs = BlockLayout::default_conv_block_size(w.dims());
    assert_eq!(bs, 4);
    let layout = BlockLayout::conv2d("conv", w.dims(), bs).unwrap();
    let sub = layout.to_subvectors(&w).unwrap();
    assert_eq!(
        rows(&sub),
        vec![
            vec![0., 1., 2., 3.],     // filter 0, input 0
            vec![8., 9., 10., 11.],   // filter 1, input 0
            vec![4., 5., 6., 7.],     // filter 0, input 1
            vec![12., 13., 14., 15.], // filter 1, input 1
        ]
    );
    let back = layout.from_subvectors(&sub).unwrap();
    assert_eq!(
        back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn conv_1x1_blocks_are_consecutive_input_channels() {
    let w = arange(&[2, 8, 1, 1]);
    let bs = BlockLayout::default_conv_block_size(w.dims());
    assert_eq!(bs, 4);
    let layout = BlockLayout::conv2d("pw", w.dims(), bs).unwrap();
    let sub = layout.to_subvectors(&w).unwrap();
    assert_eq!(
        rows(&sub),
        vec![
            vec![0., 1., 2., 3.],
            vec![8., 9., 10., 11.],
            vec![4., 5., 6., 7.],
            vec![12., 13., 14., 15.]
        ]
    );
    // Mask of the weight's own shape: 2 rows x 2 blocks.
    assert_eq!((layout.rows(), layout.blocks_per_row()), (2, 2));
    let back = layout.from_subvectors(&sub).unwrap();
    assert_eq!(back.dims(), w.dims());
}

#[test]
fn depthwise_conv_has_one_kernel_per_channel() {
    let w = arange(&[3, 1, 3, 3]);
    let layout = BlockLayout::conv2d(
        "dw",
        w.dims(),
        BlockLayout::default_conv_block_size(w.dims()),
    )
    .unwrap();
    assert_eq!(layout.block_size(), 9);
    assert_eq!(layout.n_blocks(), 3);
    let sub = layout.to_subvectors(&w).unwrap();
    assert_eq!(sub.dims(), &[3, 9]);
    assert_eq!(
        sub.get(1).unwrap().to_vec1::<f32>().unwrap(),
        (9..18).map(|v| v as f32).collect::<Vec<_>>()
    );
    // Depthwise 1x1 (one input per filter): the default block is the single input.
    assert_eq!(BlockLayout::default_conv_block_size(&[8, 1, 1, 1]), 1);
}

#[test]
fn divisibility_and_rank_errors_name_the_tensor() {
    let err = BlockLayout::linear("encoder.layer.0.fc1.weight", &[4, 10], 8)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder.layer.0.fc1.weight") && err.contains("block size 8"),
        "{err}"
    );
    let err = BlockLayout::conv2d("stem", &[4, 3], 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("stem") && err.contains("rank 4"), "{err}");
    let err = BlockLayout::linear("z", &[0, 4], 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("zero dimension"), "{err}");
}

#[test]
fn conv_blocks_never_straddle_kernels_and_1x1_blocks_divide_the_input_channels() {
    // 3x3 kernels of 16 inputs: 144 columns, which 8 divides, but 8-blocks would cut kernels apart.
    let err = BlockLayout::conv2d("features.3.conv", &[32, 16, 3, 3], 8)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("features.3.conv") && err.contains("multiple of 9"),
        "{err}"
    );
    // Whole kernels, one or several.
    assert!(BlockLayout::conv2d("c", &[32, 16, 3, 3], 9).is_ok());
    assert!(BlockLayout::conv2d("c", &[32, 16, 3, 3], 18).is_ok());
    // Parts of one kernel (element-wise scalar noise uses blocks of 1).
    assert!(BlockLayout::conv2d("c", &[32, 16, 3, 3], 1).is_ok());
    assert!(BlockLayout::conv2d("c", &[32, 16, 3, 3], 3).is_ok());
    // A 1x1 conv with 6 input channels (EfficientNet's squeeze-excitation): 4 does not divide, and
    // the error says what would.
    let err = BlockLayout::conv2d("se.conv_reduce", &[4, 6, 1, 1], 4)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("se.conv_reduce") && err.contains("divisor of 6 such as 3"),
        "{err}"
    );
}

#[test]
fn one_default_block_size_per_layer_kind() {
    use qn_kernels::layout::{default_block_size, LayerKind};
    let lin = |name: &str| default_block_size(name, LayerKind::Linear, &[64, 64]);
    for attn in [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.key",
        "encoder.layer.0.attention.output.dense",
        "model.layers.0.self_attn.q_proj",
        "h.0.attn.c_attn",
        "layers.0.self_attn.out_proj",
    ] {
        assert_eq!(lin(attn), 4, "{attn}");
    }
    for ffn in [
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.0.output.dense",
        "classifier.out_proj.fc",
        "fc1",
        "head",
    ] {
        let want = if ffn.contains("out_proj") { 4 } else { 8 };
        assert_eq!(lin(ffn), want, "{ffn}");
    }
    assert_eq!(
        default_block_size(
            "embeddings.word_embeddings",
            LayerKind::Embedding,
            &[30522, 384]
        ),
        8
    );
    assert_eq!(
        default_block_size("conv", LayerKind::Conv2d, &[8, 4, 3, 3]),
        9
    );
    assert_eq!(
        default_block_size("conv", LayerKind::Conv2d, &[8, 4, 5, 5]),
        25
    );
    assert_eq!(
        default_block_size("pw", LayerKind::Conv2d, &[8, 16, 1, 1]),
        4
    );
    assert_eq!(
        default_block_size("se", LayerKind::Conv2d, &[8, 6, 1, 1]),
        3
    );
    assert_eq!(
        default_block_size("se", LayerKind::Conv2d, &[8, 10, 1, 1]),
        2
    );
    assert_eq!(
        default_block_size("se", LayerKind::Conv2d, &[8, 7, 1, 1]),
        1
    );
    assert_eq!(
        LayerKind::infer("bert.embeddings.word_embeddings.weight", 2),
        Some(LayerKind::Embedding)
    );
    assert_eq!(
        LayerKind::infer("transformer.wte.weight", 2),
        Some(LayerKind::Embedding)
    );
    assert_eq!(
        LayerKind::infer("encoder.layer.0.output.dense.weight", 2),
        Some(LayerKind::Linear)
    );
    assert_eq!(LayerKind::infer("conv.weight", 4), Some(LayerKind::Conv2d));
    assert_eq!(LayerKind::infer("norm.weight", 1), None);
}
