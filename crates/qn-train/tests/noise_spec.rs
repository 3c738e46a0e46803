//! The textual noise spec resolved against real layer shapes: the layers it cannot noise and the
//! block sizes each noise accepts on convolutions.

use qn_kernels::layout::BlockLayout;
use qn_train::{NoiseConfig, NoiseSpec};

#[test]
fn pq_noise_skips_a_layer_with_fewer_blocks_than_centroids_and_says_so() {
    // BERT's token-type table: 2 x 384, 96 blocks of 8, fewer than 256 centroids.
    let layout =
        BlockLayout::embedding("bert.embeddings.token_type_embeddings", &[2, 384], 8).unwrap();
    let spec: NoiseSpec = "pq:p=1,k=256".parse().unwrap();
    let why = spec
        .skip_reason("bert.embeddings.token_type_embeddings", &layout)
        .expect("skipped");
    assert!(
        why.contains("token_type_embeddings") && why.contains("96 blocks") && why.contains("256"),
        "{why}"
    );
    assert_eq!(
        spec.resolve("bert.embeddings.token_type_embeddings", &layout)
            .unwrap(),
        NoiseConfig::None
    );
    // With few enough centroids the same layer is noised.
    let spec: NoiseSpec = "pq:p=1,k=16".parse().unwrap();
    assert!(spec.skip_reason("t", &layout).is_none());
    assert!(matches!(
        spec.resolve("t", &layout).unwrap(),
        NoiseConfig::Pq {
            n_centroids: 16,
            block_size: 8,
            ..
        }
    ));
    // Other noises never skip.
    let block: NoiseSpec = "block:p=0.1".parse().unwrap();
    assert!(block.skip_reason("t", &layout).is_none());
}

#[test]
fn scalar_noise_fake_quantizes_kxk_convolutions_element_wise() {
    // EfficientNet's stem: 3x3 kernels; scalar noise defaults to blocks of one weight.
    let layout = BlockLayout::conv2d("_conv_stem", &[32, 3, 3, 3], 9).unwrap();
    let spec: NoiseSpec = "scalar:bits=4,p=0.5".parse().unwrap();
    assert!(matches!(
        spec.resolve("_conv_stem", &layout).unwrap(),
        NoiseConfig::Scalar { block_size: 1, .. }
    ));
    // A block that would straddle two kernels is still refused, naming the layer.
    let layout = BlockLayout::conv2d("features.3.conv", &[32, 16, 3, 3], 9).unwrap();
    let spec: NoiseSpec = "scalar:bits=4,p=0.5,bs=6".parse().unwrap();
    let err = spec
        .resolve("features.3.conv", &layout)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("features.3.conv") && err.contains("multiple of 9"),
        "{err}"
    );
}
