//! The weighted instruction-tuning (WIT) loss.
//!
//! `loss = Σ_t w_t · −log p(x_t | x_<t) / D` over every predicted position `t ≥ 1` of every
//! sequence, with `w_t = λp` on prompt tokens and `λr` on response tokens, padding weight 0. The
//! denominator `D` is the number of positions with `w_t ≠ 0` (the WIT paper's code) or, as an
//! option, `Σ w_t`; under gradient accumulation it is taken over the whole accumulated batch.
//!
//! Only positions with non-zero weight are normalised and projected to the vocabulary: with
//! λp = 0 no prompt position costs an lm_head matmul or a log-softmax.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::decoder::{Decoder, ForwardContext};
use crate::ops;
use crate::{Error, Result};

/// What the weighted sum is divided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalization {
    /// Number of positions with a non-zero weight (WIT paper).
    #[default]
    TokenCount,
    /// Sum of the weights.
    WeightSum,
}

impl Normalization {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "token-count" | "count" => Ok(Self::TokenCount),
            "weight-sum" | "sum" => Ok(Self::WeightSum),
            other => Err(Error::InvalidArgument(format!(
                "unknown normalisation `{other}` (token-count, weight-sum)"
            ))),
        }
    }
}

/// A right-padded batch of token ids with a loss weight per position.
#[derive(Debug, Clone)]
pub struct WeightedBatch {
    /// `[B * T]` row-major ids.
    pub ids: Vec<u32>,
    /// `[B * T]`: weight of predicting `ids[b, t]` from `ids[b, ..t]`; 0 at t = 0 and on padding.
    pub weights: Vec<f32>,
    /// Real (unpadded) length of each row.
    pub seq_lens: Vec<usize>,
    pub batch: usize,
    pub seq_len: usize,
}

impl WeightedBatch {
    /// The denominator contribution of this batch under `norm`.
    pub fn denominator(&self, norm: Normalization) -> f64 {
        match norm {
            Normalization::TokenCount => self.weights.iter().filter(|w| **w != 0.0).count() as f64,
            Normalization::WeightSum => self.weights.iter().map(|w| *w as f64).sum(),
        }
    }

    /// Number of positions with non-zero weight.
    pub fn counted_tokens(&self) -> usize {
        self.weights.iter().filter(|w| **w != 0.0).count()
    }

    /// Total real tokens (throughput accounting).
    pub fn real_tokens(&self) -> usize {
        self.seq_lens.iter().sum()
    }

    /// `[B, T]` ids and key mask tensors.
    pub fn tensors(&self, device: &Device) -> Result<(Tensor, Option<Tensor>)> {
        let ids = Tensor::from_slice(&self.ids, (self.batch, self.seq_len), device)?;
        let padded = self.seq_lens.iter().any(|&l| l < self.seq_len);
        let mask = if padded {
            let m: Vec<u8> = (0..self.batch)
                .flat_map(|b| (0..self.seq_len).map(move |t| (t < self.seq_lens[b]) as u8))
                .collect();
            Some(Tensor::from_vec(m, (self.batch, self.seq_len), device)?)
        } else {
            None
        };
        Ok((ids, mask))
    }
}

/// The weighted negative log-likelihood SUM of a batch (not yet divided), as a differentiable
/// scalar, plus the number of counted positions.
pub fn weighted_nll_sum(
    decoder: &Decoder,
    batch: &WeightedBatch,
    ctx: &mut ForwardContext<'_>,
) -> Result<(Tensor, usize)> {
    let device = decoder.device();
    let (ids, mask) = batch.tensors(device)?;
    let hidden = decoder.forward_hidden(&ids, mask.as_ref(), ctx)?;
    let h = decoder.config.hidden_size;
    let (b, t) = (batch.batch, batch.seq_len);
    // Position t-1 predicts token t.
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut weights = Vec::new();
    for bi in 0..b {
        for ti in 1..batch.seq_lens[bi].min(t) {
            let w = batch.weights[bi * t + ti];
            if w != 0.0 {
                rows.push((bi * t + ti - 1) as u32);
                targets.push(batch.ids[bi * t + ti]);
                weights.push(w);
            }
        }
    }
    let count = rows.len();
    if count == 0 {
        return Ok((Tensor::zeros((), DType::F32, device)?, 0));
    }
    let flat = hidden.reshape((b * t, h))?;
    let rows = Tensor::from_vec(rows, count, device)?;
    let selected = flat.index_select(&rows, 0)?;
    let logits = decoder.logits(&selected)?;
    let targets = Tensor::from_vec(targets, count, device)?;
    let weights = Tensor::from_vec(weights, count, device)?;
    let sum = ops::weighted_nll(&logits, &targets, &weights)?;
    Ok((sum, count))
}

/// The loss of one batch on its own: `weighted_nll_sum / denominator(batch)`.
pub fn wit_loss(
    decoder: &Decoder,
    batch: &WeightedBatch,
    norm: Normalization,
    ctx: &mut ForwardContext<'_>,
) -> Result<(Tensor, usize)> {
    let (sum, count) = weighted_nll_sum(decoder, batch, ctx)?;
    let denom = batch.denominator(norm);
    if denom <= 0.0 {
        return Err(Error::InvalidArgument(
            "batch has no position with a non-zero loss weight".into(),
        ));
    }
    Ok(((sum / denom)?, count))
}
