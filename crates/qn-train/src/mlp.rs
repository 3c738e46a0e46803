//! A small quant-noise MLP classifier: the reference model of the trainer's tests and benches.

use candle_core::{Device, ModuleT, Tensor, Var};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};

use crate::layers::{qlinear, QLinear, QuantNoiseLayer};
use crate::model::QuantModel;
use crate::Result;

/// `Linear → ReLU → Linear → ReLU → Linear`, every layer a [`QLinear`] named `fc1`, `fc2`, `head`.
#[derive(Debug)]
pub struct Mlp {
    fc1: QLinear,
    fc2: QLinear,
    head: QLinear,
}

impl Mlp {
    /// `input → hidden → hidden → classes`.
    pub fn new(input: usize, hidden: usize, classes: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: qlinear(input, hidden, true, vb.pp("fc1"))?,
            fc2: qlinear(hidden, hidden, true, vb.pp("fc2"))?,
            head: qlinear(hidden, classes, true, vb.pp("head"))?,
        })
    }
}

impl Mlp {
    /// The same network initialised from `seed` (PyTorch's uniform `±1/sqrt(fan_in)`), so that two
    /// runs start from identical weights (candle's CPU initialisers cannot be seeded).
    pub fn seeded(
        input: usize,
        hidden: usize,
        classes: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut layer = |name: &str, i: usize, o: usize| -> Result<QLinear> {
            let bound = 1.0 / (i as f32).sqrt();
            let mut init = |n: usize| -> Result<Var> {
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
                Ok(Var::from_tensor(&Tensor::from_vec(v, n, device)?)?)
            };
            let w = init(o * i)?;
            let w = Var::from_tensor(&w.as_tensor().reshape((o, i))?)?;
            QLinear::new(name, w, Some(init(o)?))
        };
        Ok(Self {
            fc1: layer("fc1", input, hidden)?,
            fc2: layer("fc2", hidden, hidden)?,
            head: layer("head", hidden, classes)?,
        })
    }
}

impl QuantModel for Mlp {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.fc1.forward_t(x, train)?.relu()?;
        let h = self.fc2.forward_t(&h, train)?.relu()?;
        self.head.forward_t(&h, train)
    }

    fn layers(&self) -> Vec<&dyn QuantNoiseLayer> {
        vec![&self.fc1, &self.fc2, &self.head]
    }

    fn layers_mut(&mut self) -> Vec<&mut dyn QuantNoiseLayer> {
        vec![&mut self.fc1, &mut self.fc2, &mut self.head]
    }
}
