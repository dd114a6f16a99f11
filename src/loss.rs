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

use crate::data::Batch;
use crate::model::decoder::{Decoder, ForwardContext};
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

/// The denominator contribution of `batch` under `norm`.
pub fn denominator(batch: &Batch, norm: Normalization) -> f64 {
    match norm {
        Normalization::TokenCount => batch.counted_tokens() as f64,
        Normalization::WeightSum => batch.weights.iter().map(|w| *w as f64).sum(),
    }
}

/// `[B, T]` ids and, when any row is padded, the `[B, T]` key mask.
pub fn batch_tensors(batch: &Batch, device: &Device) -> Result<(Tensor, Option<Tensor>)> {
    let ids = Tensor::from_slice(&batch.ids, (batch.batch, batch.seq_len), device)?;
    let padded = batch.seq_lens.iter().any(|&l| l < batch.seq_len);
    let mask = if padded {
        let m: Vec<u8> = (0..batch.batch)
            .flat_map(|b| (0..batch.seq_len).map(move |t| (t < batch.seq_lens[b]) as u8))
            .collect();
        Some(Tensor::from_vec(m, (batch.batch, batch.seq_len), device)?)
    } else {
        None
    };
    Ok((ids, mask))
}

/// Rows of the flattened `[B*T]` hidden states that predict a weighted token: `(row, target,
/// weight)` for every position `t >= 1` with non-zero weight (row = position `t - 1`).
fn weighted_positions(batch: &Batch) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let t = batch.seq_len;
    let (mut rows, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    for b in 0..batch.batch {
        for ti in 1..batch.seq_lens[b].min(t) {
            let w = batch.weights[b * t + ti];
            if w != 0.0 {
                rows.push((b * t + ti - 1) as u32);
                targets.push(batch.ids[b * t + ti]);
                weights.push(w);
            }
        }
    }
    (rows, targets, weights)
}

/// The weighted negative log-likelihood SUM of a batch (not yet divided), as a differentiable
/// scalar, plus the number of counted positions.
pub fn weighted_nll_sum(
    decoder: &Decoder,
    batch: &Batch,
    ctx: &mut ForwardContext<'_>,
) -> Result<(Tensor, usize)> {
    let device = decoder.device();
    let (ids, mask) = batch_tensors(batch, device)?;
    let hidden = decoder.forward_hidden(&ids, mask.as_ref(), ctx)?;
    let h = decoder.config.hidden_size;
    let (b, t) = (batch.batch, batch.seq_len);
    let (rows, targets, weights) = weighted_positions(batch);
    let count = rows.len();
    if count == 0 {
        return Ok((Tensor::zeros((), DType::F32, device)?, 0));
    }
    let flat = hidden.reshape((b * t, h))?;
    let rows = Tensor::from_vec(rows, count, device)?;
    let selected = flat.index_select(&rows, 0)?;
    let targets = Tensor::from_vec(targets, count, device)?;
    let weights = Tensor::from_vec(weights, count, device)?;
    let sum = decoder.weighted_nll_from_hidden(&selected, &targets, &weights)?;
    Ok((sum, count))
}

/// The loss of one batch on its own: `weighted_nll_sum / denominator(batch)`.
pub fn wit_loss(
    decoder: &Decoder,
    batch: &Batch,
    norm: Normalization,
    ctx: &mut ForwardContext<'_>,
) -> Result<(Tensor, usize)> {
    let (sum, count) = weighted_nll_sum(decoder, batch, ctx)?;
    let denom = denominator(batch, norm);
    if denom <= 0.0 {
        return Err(Error::InvalidArgument(
            "batch has no position with a non-zero loss weight".into(),
        ));
    }
    Ok(((sum / denom)?, count))
}

/// Per-position negative log-likelihood, without gradient, for every position with non-zero
/// weight in `batch`: `(flat index b*T + t, nll)` in row-major order. Evaluation combines these
/// under several weightings from one forward pass.
pub fn position_nll(
    decoder: &Decoder,
    batch: &Batch,
    ctx: &mut ForwardContext<'_>,
) -> Result<Vec<(usize, f32)>> {
    let device = decoder.device();
    let (ids, mask) = batch_tensors(batch, device)?;
    let grad_mode = std::mem::replace(&mut ctx.no_grad, true);
    let hidden = decoder.forward_hidden(&ids, mask.as_ref(), ctx);
    ctx.no_grad = grad_mode;
    let hidden = hidden?.detach();
    let (rows, targets, _) = weighted_positions(batch);
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let flat = hidden.reshape((batch.batch * batch.seq_len, decoder.config.hidden_size))?;
    let index: Vec<usize> = rows.iter().map(|&r| r as usize + 1).collect();
    let selected = flat.index_select(&Tensor::from_slice(&rows, rows.len(), device)?, 0)?;
    let nll = decoder.nll_from_hidden(&selected, &targets)?;
    Ok(index
        .into_iter()
        .zip(nll.into_iter().map(|v| v as f32))
        .collect())
}
