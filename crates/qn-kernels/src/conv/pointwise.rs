//! 1x1 convolutions (stride 1, no padding, one group) straight from a coded weight: for every image
//! `y[b] = W · x[b]` with `x[b]` its `(in, h·w)` channels-first pixels, so the activations are
//! read where they lie (no transposition to rows of pixels and back) and the weight is decoded a
//! tile of output channels at a time ([`crate::tiled::matmul_channels`]). A feature map of one
//! pixel (squeeze-and-excitation) is a plain `x · Wᵀ` and takes the coded matmul's small-input
//! path: PQ lookup tables or int-N dequantisation inside the dot products.

use candle_core::{DType, Device, Storage, Tensor};

use crate::pq::PqMatmul;
use crate::scalar::{matrix_dims, scalar_matmul, with_row_decoder, QuantizedTensor};
use crate::tiled::{matmul_channels, DecodeRows};
use crate::{Error, Result};

/// `x (n, in, h, w)` convolved with the PQ-coded 1x1 weight of `m` (`(out, in)`): `(n, out, h, w)`.
pub fn pointwise_conv_pq(x: &Tensor, m: &PqMatmul) -> Result<Tensor> {
    let (n, cols, h, w) = check(x, m.cols())?;
    if h * w == 1 {
        let y = m.forward(&x.reshape((n, cols))?)?;
        return Ok(y.reshape((n, m.rows(), 1, 1))?);
    }
    channels_first(x, m.rows(), &|o0, out| m.decode_rows(o0, out))
}

/// `x (n, in, h, w)` convolved with the int-N coded 1x1 weight `q` (codes `(out, in)`).
pub fn pointwise_conv_scalar(x: &Tensor, q: &QuantizedTensor) -> Result<Tensor> {
    let (rows, cols) = matrix_dims(q, "pointwise conv")?;
    let (n, _, h, w) = check(x, cols)?;
    if h * w == 1 {
        let y = scalar_matmul(&x.reshape((n, cols))?, q)?;
        return Ok(y.reshape((n, rows, 1, 1))?);
    }
    with_row_decoder(q, |decode| channels_first(x, rows, decode))?
}

/// The twin of [`pointwise_conv_pq`] and [`pointwise_conv_scalar`]: candle's convolution with the
/// decoded weight `w` `(out, in)`.
pub fn pointwise_conv_reference(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(x.conv2d(&w.reshape((rows, cols, 1, 1))?, 0, 1, 1, 1)?)
}

/// `(n, in, h, w)` of a CPU input with `cols` channels.
fn check(x: &Tensor, cols: usize) -> Result<(usize, usize, usize, usize)> {
    let dims = x.dims4().map_err(|_| {
        Error::shape(
            "pointwise conv",
            format!("input of shape {:?} is not (n, c, h, w)", x.dims()),
        )
    })?;
    if dims.1 != cols {
        return Err(Error::shape(
            "pointwise conv",
            format!(
                "input of shape {:?} has {} channels, the weight takes {cols}",
                x.dims(),
                dims.1
            ),
        ));
    }
    if !x.device().is_cpu() {
        return Err(Error::shape(
            "pointwise conv",
            "the coded kernel runs on the CPU; decode the weight on other devices",
        ));
    }
    Ok(dims)
}

fn channels_first(x: &Tensor, rows: usize, decode: DecodeRows) -> Result<Tensor> {
    let (n, cols, h, w) = x.dims4()?;
    let p = h * w;
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = xf.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::shape(
            "pointwise conv",
            "the input is not on the CPU",
        ));
    };
    let xs = &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + n * cols * p];
    let mut y = vec![0f32; n * rows * p];
    matmul_channels(xs, n, cols, rows, p, &mut y, decode);
    drop(storage);
    Ok(Tensor::from_vec(y, (n, rows, h, w), &Device::Cpu)?.to_dtype(x.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::BlockLayout;
    use crate::pq::{encode, KMeansConfig};
    use crate::scalar::{dequantize, observe, quantize, Granularity, ScalarConfig};

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let m = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        d / m
    }

    #[test]
    fn coded_pointwise_convs_match_candles_convolution_with_the_decoded_weight() {
        let dev = Device::Cpu;
        // 72 output channels: two tiles; 6 is not a power of two; K = 20 is not either.
        let w = Tensor::randn(0f32, 0.1, (72, 24), &dev).unwrap();
        let layout = BlockLayout::linear("w", w.dims(), 6).unwrap();
        let codes = encode(
            &w,
            &layout,
            &KMeansConfig::new(20).with_iters(3),
            &mut |_| {},
        )
        .unwrap();
        let m = PqMatmul::new(&codes).unwrap();
        let decoded = codes.decode().unwrap();
        let int4 = ScalarConfig::int4().with_granularity(Granularity::PerGroup { size: 8 });
        let q = quantize(&w, &observe(&w, &int4).unwrap()).unwrap();
        let dq = dequantize(&q).unwrap();
        // One pixel (tables / in-register), a strided view, a map wider than a pixel chunk.
        let inputs = [
            Tensor::randn(0f32, 1., (3, 24, 1, 1), &dev).unwrap(),
            Tensor::randn(0f32, 1., (2, 24, 5, 4), &dev)
                .unwrap()
                .narrow(3, 1, 3)
                .unwrap(),
            Tensor::randn(0f32, 1., (2, 24, 40, 30), &dev).unwrap(),
        ];
        for (i, x) in inputs.iter().enumerate() {
            let want = pointwise_conv_reference(x, &decoded).unwrap();
            let got = pointwise_conv_pq(x, &m).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(
                max_rel(&got, &want) < 1e-5,
                "pq, input {i}: {}",
                max_rel(&got, &want)
            );
            let want = pointwise_conv_reference(x, &dq).unwrap();
            let got = pointwise_conv_scalar(x, &q).unwrap();
            assert!(
                max_rel(&got, &want) < 1e-5,
                "int4, input {i}: {}",
                max_rel(&got, &want)
            );
        }
        let wrong = Tensor::zeros((1, 23, 2, 2), DType::F32, &dev).unwrap();
        let e = pointwise_conv_pq(&wrong, &m).unwrap_err().to_string();
        assert!(e.contains("23 channels") && e.contains("24"), "{e}");
        let flat = Tensor::zeros((4, 24), DType::F32, &dev).unwrap();
        assert!(pointwise_conv_scalar(&flat, &q).is_err());
    }
}
