//! The encoder: embeddings, layers, and the sequence-classification head of the family.

use std::sync::Mutex;

use candle_core::{DType, IndexOp, ModuleT, Tensor, Var, D};
use candle_nn::VarBuilder;
use qn_train::{
    layers::{QEmbedding, QLinear, QuantNoiseLayer},
    NoiseStep, QuantModel,
};

use super::block::{linear, DropCtx, EncoderLayer, Norm};
use super::config::{EncoderConfig, Family};
use crate::coded::CodedWeights;
use crate::Result;
use qn_train::kernels::layout::LayerKind;

/// The classification head.
#[derive(Debug)]
pub enum Head {
    /// BERT: pooler (`bert.pooler.dense`, tanh on the first token), dropout, `classifier`.
    Bert {
        /// The pooler.
        pooler: QLinear,
        /// The classifier.
        classifier: QLinear,
    },
    /// RoBERTa: dropout, `classifier.dense`, tanh, dropout, `classifier.out_proj` on `<s>`.
    Roberta {
        /// `classifier.dense`.
        dense: QLinear,
        /// `classifier.out_proj`.
        out_proj: QLinear,
    },
}

/// A BERT-family encoder with a sequence-classification head, every Linear and Embedding a
/// quant-noise layer, its tensors named as in Hugging Face's `…ForSequenceClassification`.
///
/// Its [`QuantModel::forward_t`] input is a packed batch `(b, 3, l)` `u32`: token ids, token types
/// and the attention mask ([`super::pack_batch`]); padding columns beyond the batch's longest row
/// are dropped first (dynamic padding).
#[derive(Debug)]
pub struct Encoder {
    config: EncoderConfig,
    num_labels: usize,
    word: QEmbedding,
    position: QEmbedding,
    token_type: QEmbedding,
    emb_norm: Norm,
    layers: Vec<EncoderLayer>,
    head: Head,
    seed: u64,
    at: Mutex<NoiseStep>,
}

impl Encoder {
    /// Builds the encoder from `vb`, which must hold every tensor under its Hugging Face name
    /// (`bert.`/`roberta.` prefix; see [`crate::encoder::load`]).
    pub fn new(
        config: &EncoderConfig,
        num_labels: usize,
        seed: u64,
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::with_coded(config, num_labels, seed, vb, &CodedWeights::default())
    }

    /// [`Self::new`] with the Linear and Embedding weights `coded` holds taken from it (layers
    /// that run from their codes) instead of from `vb`.
    pub fn with_coded(
        config: &EncoderConfig,
        num_labels: usize,
        seed: u64,
        vb: VarBuilder,
        coded: &CodedWeights,
    ) -> Result<Self> {
        let c = config;
        let h = c.hidden_size;
        let family = c.family();
        let base = vb.pp(family.prefix());
        let emb = base.pp("embeddings");
        let pad = c.pad_id() as usize;
        let embedding = |num: usize, name: &str, padding: Option<usize>| -> Result<QEmbedding> {
            let vb = emb.pp(name);
            // A padding id outside the table (some configs carry one) has no row to protect.
            let padding = padding.filter(|p| *p < num);
            let weight = format!("{}.weight", vb.prefix());
            if let Some(w) = coded.take(&weight, LayerKind::Embedding, &[num, h], vb.device())? {
                return Ok(QEmbedding::from_weight(w, padding)?);
            }
            let w = Var::from_tensor(&vb.get((num, h), "weight")?)?;
            Ok(QEmbedding::new(&vb.prefix(), w, padding)?)
        };
        let word = embedding(c.vocab_size, "word_embeddings", Some(pad))?;
        let position = embedding(
            c.max_position_embeddings,
            "position_embeddings",
            (family == Family::Roberta).then_some(pad),
        )?;
        let token_type = embedding(c.type_vocab_size, "token_type_embeddings", None)?;
        let emb_norm = Norm::new(h, c.layer_norm_eps, emb.pp("LayerNorm"))?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(c, i, base.pp("encoder").pp("layer").pp(i), coded))
            .collect::<Result<Vec<_>>>()?;
        let head = match family {
            Family::Bert => Head::Bert {
                pooler: linear(h, h, base.pp("pooler").pp("dense"), coded)?,
                classifier: linear(h, num_labels, vb.pp("classifier"), coded)?,
            },
            Family::Roberta => Head::Roberta {
                dense: linear(h, h, vb.pp("classifier").pp("dense"), coded)?,
                out_proj: linear(h, num_labels, vb.pp("classifier").pp("out_proj"), coded)?,
            },
        };
        Ok(Self {
            config: c.clone(),
            num_labels,
            word,
            position,
            token_type,
            emb_norm,
            layers,
            head,
            seed,
            at: Mutex::new(NoiseStep::default()),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// Number of classes of the head.
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    fn drop_ctx(&self, train: bool) -> DropCtx {
        DropCtx {
            seed: self.seed,
            at: *self.at.lock().expect("step lock"),
            train,
        }
    }

    /// Position ids `(b, l)`: BERT counts from 0; RoBERTa counts non-padding tokens from
    /// `padding_idx + 1` and gives padding `padding_idx`, computed from the ids as Hugging Face's
    /// `create_position_ids_from_input_ids` does.
    fn position_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let max = self.config.max_position_embeddings;
        let pos: Vec<u32> = match self.config.family() {
            Family::Bert => (0..b).flat_map(|_| 0..l as u32).collect(),
            Family::Roberta => {
                let pad = self.config.pad_id();
                let rows = ids.to_vec2::<u32>()?;
                rows.iter()
                    .flat_map(|r| {
                        let mut n = 0u32;
                        r.iter()
                            .map(move |&t| {
                                if t == pad {
                                    pad
                                } else {
                                    n += 1;
                                    pad + n
                                }
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect()
            }
        };
        if let Some(&p) = pos.iter().max() {
            if p as usize >= max {
                return Err(crate::Error::Input(format!(
                    "a sequence of {l} tokens needs position {p}, beyond max_position_embeddings {max}: truncate it (--max-len)"
                )));
            }
        }
        Ok(Tensor::from_vec(pos, (b, l), ids.device())?)
    }

    /// The last hidden states `(b, l, h)` for token ids, token types and attention mask `(b, l)`.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        types: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let mut last = None;
        self.each_hidden_state(ids, types, mask, train, &mut |h| last = Some(h.clone()))?;
        Ok(last.expect("the embeddings' output at least"))
    }

    /// The embeddings' output and every layer's, in order (what hidden-state distillation
    /// compares).
    pub fn all_hidden_states(
        &self,
        ids: &Tensor,
        types: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> Result<Vec<Tensor>> {
        let mut all = Vec::with_capacity(self.layers.len() + 1);
        self.each_hidden_state(ids, types, mask, train, &mut |h| all.push(h.clone()))?;
        Ok(all)
    }

    fn each_hidden_state(
        &self,
        ids: &Tensor,
        types: &Tensor,
        mask: &Tensor,
        train: bool,
        seen: &mut dyn FnMut(&Tensor),
    ) -> Result<()> {
        let vocab = self.config.vocab_size;
        let bad = ids.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
        if bad as usize >= vocab {
            return Err(crate::Error::Input(format!(
                "token id {bad} is outside the vocabulary of {vocab} (tokenizer and model differ?)"
            )));
        }
        let tmax = types.max_all()?.to_scalar::<u32>()?;
        if tmax as usize >= self.config.type_vocab_size {
            return Err(crate::Error::Input(format!(
                "token type {tmax} is outside type_vocab_size {}",
                self.config.type_vocab_size
            )));
        }
        let drop = self.drop_ctx(train);
        let pos = self.position_ids(ids)?;
        let e = self.word.forward_t(ids, train)?;
        let e = (e + self.position.forward_t(&pos, train)?)?;
        let e = (e + self.token_type.forward_t(types, train)?)?;
        let mut x = drop.apply(
            &self.emb_norm.forward(&e)?,
            self.config.hidden_dropout_prob,
            1,
        )?;
        let bias = super::ops::attention_bias(mask, x.dtype())?;
        // In evaluation nothing is differentiated: cutting the graph after each layer lets a
        // layer's activations be freed when the next one starts (the weights are variables, so
        // every output would otherwise keep its inputs, and every layer's, alive to the end).
        let cut = |t: Tensor| if train { t } else { t.detach() };
        x = cut(x);
        seen(&x);
        for layer in &self.layers {
            x = cut(layer.forward(&x, &bias, drop)?);
            seen(&x);
        }
        Ok(())
    }

    /// Logits `(b, num_labels)` from the last hidden states.
    pub fn classify(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        let drop = self.drop_ctx(train);
        let p = self
            .config
            .classifier_dropout
            .unwrap_or(self.config.hidden_dropout_prob);
        let first = hidden.i((.., 0, ..))?;
        Ok(match &self.head {
            Head::Bert { pooler, classifier } => {
                let pooled = pooler.forward_t(&first, train)?.tanh()?;
                classifier.forward_t(&drop.apply(&pooled, p, 2)?, train)?
            }
            Head::Roberta { dense, out_proj } => {
                let x = dense.forward_t(&drop.apply(&first, p, 2)?, train)?.tanh()?;
                out_proj.forward_t(&drop.apply(&x, p, 3)?, train)?
            }
        })
    }

    /// BERT's pooler output `(b, h)`: tanh of the pooler on the first token (RoBERTa's head has no
    /// pooler: its first token's hidden state is returned).
    pub fn pooled(&self, hidden: &Tensor) -> Result<Tensor> {
        let first = hidden.i((.., 0, ..))?;
        Ok(match &self.head {
            Head::Bert { pooler, .. } => pooler.forward_t(&first, false)?.tanh()?,
            Head::Roberta { .. } => first,
        })
    }

    /// Mean over the attention mask of the last hidden states, L2-normalised (sentence-transformers'
    /// default pooling for all-MiniLM-L6-v2), `(b, h)`.
    pub fn mean_pooled(&self, hidden: &Tensor, mask: &Tensor, normalize: bool) -> Result<Tensor> {
        let m = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
        let sum = hidden.broadcast_mul(&m)?.sum(1)?;
        let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = sum.broadcast_div(&count)?;
        if !normalize {
            return Ok(mean);
        }
        let norm = mean
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?)
    }

    /// Splits a packed batch `(b, 3, l)` into ids, types and mask, trimmed to the longest row.
    pub fn unpack(x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (_, three, l) = x.dims3()?;
        if three != 3 {
            return Err(crate::Error::Input(format!(
                "a packed batch is (b, 3, l), got {:?}",
                x.dims()
            )));
        }
        let mask = x.i((.., 2, ..))?;
        let longest = mask
            .sum(1)?
            .max_all()?
            .to_scalar::<u32>()?
            .clamp(1, l as u32) as usize;
        let part = |i: usize| -> candle_core::Result<Tensor> {
            x.i((.., i, ..))?.narrow(1, 0, longest)?.contiguous()
        };
        Ok((part(0)?, part(1)?, part(2)?))
    }

    /// Every quant-noise layer with its name, in a fixed order.
    fn all_layers(&self) -> Vec<&dyn QuantNoiseLayer> {
        let mut v: Vec<&dyn QuantNoiseLayer> = vec![&self.word, &self.position, &self.token_type];
        for l in &self.layers {
            v.extend([
                &l.query as &dyn QuantNoiseLayer,
                &l.key,
                &l.value,
                &l.attn_out,
                &l.intermediate,
                &l.output,
            ]);
        }
        match &self.head {
            Head::Bert { pooler, classifier } => {
                v.extend([pooler as &dyn QuantNoiseLayer, classifier])
            }
            Head::Roberta { dense, out_proj } => {
                v.extend([dense as &dyn QuantNoiseLayer, out_proj])
            }
        }
        v
    }
}

impl QuantModel for Encoder {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let run = || -> Result<Tensor> {
            let (ids, types, mask) = Self::unpack(x)?;
            let h = self.hidden_states(&ids, &types, &mask, train)?;
            self.classify(&h, train)
        };
        run().map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn forward_hidden_t(
        &self,
        x: &Tensor,
        train: bool,
    ) -> candle_core::Result<Option<(Tensor, Vec<Tensor>)>> {
        let run = || -> Result<(Tensor, Vec<Tensor>)> {
            let (ids, types, mask) = Self::unpack(x)?;
            let hs = self.all_hidden_states(&ids, &types, &mask, train)?;
            let logits = self.classify(hs.last().expect("at least one state"), train)?;
            Ok((logits, hs))
        };
        run()
            .map(Some)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn layers(&self) -> Vec<&dyn QuantNoiseLayer> {
        self.all_layers()
    }

    fn layers_mut(&mut self) -> Vec<&mut dyn QuantNoiseLayer> {
        let mut v: Vec<&mut dyn QuantNoiseLayer> =
            vec![&mut self.word, &mut self.position, &mut self.token_type];
        for l in &mut self.layers {
            v.push(&mut l.query);
            v.push(&mut l.key);
            v.push(&mut l.value);
            v.push(&mut l.attn_out);
            v.push(&mut l.intermediate);
            v.push(&mut l.output);
        }
        match &mut self.head {
            Head::Bert { pooler, classifier } => {
                v.push(pooler);
                v.push(classifier);
            }
            Head::Roberta { dense, out_proj } => {
                v.push(dense);
                v.push(out_proj);
            }
        }
        v
    }

    fn other_vars(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self.emb_norm.named_vars().into();
        for l in &self.layers {
            v.extend(l.attn_norm.named_vars());
            v.extend(l.out_norm.named_vars());
        }
        v
    }

    fn set_step(&self, at: NoiseStep) {
        *self.at.lock().expect("step lock") = at;
    }
}
