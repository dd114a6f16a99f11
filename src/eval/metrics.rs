//! Metrics of one adapter (or the bare base) on held-out examples: the response loss that is
//! comparable across loss weightings, the WIT loss at given weights, and generation scores.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::{Batch, LossWeights, TokenKind, TokenizedExample};
use crate::lora::LoraAdapter;
use crate::loss::{position_nll, Normalization};
use crate::model::decoder::{Decoder, ForwardContext};
use crate::model::BaseModel;
use crate::Result;

/// Loss metrics over a whole evaluation set (micro-averaged over tokens).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossMetrics {
    /// Total NLL of response tokens / their count.
    pub response_loss: f64,
    pub response_ppl: f64,
    /// The WIT loss at the given weights, normalised over the whole set.
    pub wit_loss: f64,
    pub response_tokens: usize,
}

impl LossMetrics {
    pub fn insert_into(&self, map: &mut BTreeMap<String, f64>) {
        map.insert("response_loss".into(), self.response_loss);
        map.insert("response_ppl".into(), self.response_ppl);
        map.insert("wit_loss".into(), self.wit_loss);
    }
}

/// Loss metrics of `adapter` (or the bare base) on a tokenized eval split; `None` when the split
/// is empty. Pads with the base's pad id.
pub fn evaluate_losses(
    base: &BaseModel,
    adapter: Option<&LoraAdapter>,
    eval: &[TokenizedExample],
    weights: &LossWeights,
    normalization: Normalization,
    batch_size: usize,
) -> Result<Option<LossMetrics>> {
    if eval.is_empty() {
        return Ok(None);
    }
    let metrics = loss_metrics(
        &base.decoder,
        adapter,
        eval,
        weights,
        normalization,
        batch_size,
        base.pad_id(),
    )?;
    Ok(Some(metrics))
}

/// Evaluates `examples` in batches of `batch_size` (in length order, to cut padding).
pub fn loss_metrics(
    decoder: &Decoder,
    adapter: Option<&LoraAdapter>,
    examples: &[TokenizedExample],
    weights: &LossWeights,
    normalization: Normalization,
    batch_size: usize,
    pad_id: u32,
) -> Result<LossMetrics> {
    let scored = TokenLosses::compute(
        decoder,
        adapter,
        examples,
        batch_size,
        pad_id,
        has_prompt_weight(weights),
    )?;
    Ok(scored.metrics(weights, normalization))
}

/// The NLL of every scored token of an eval split under one model, in a fixed order, from which
/// the metrics under any loss weights follow without another forward pass. A sweep's cells all
/// start as the same untouched base (B = 0), so their step-0 evaluations are one of these,
/// weighted per cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLosses {
    /// `(kind, nll)` of each scored token, in evaluation order.
    tokens: Vec<(TokenKind, f32)>,
    /// Whether prompt-side tokens were scored (needed for weights with a non-zero prompt part).
    prompt_scored: bool,
    /// The split's size and the batch size it was evaluated with (batching changes the
    /// arithmetic's rounding, so a cached evaluation stands in only for the same batching).
    pub examples: usize,
    pub batch_size: usize,
}

impl TokenLosses {
    /// Scores `examples` (response tokens, and prompt-side ones with `score_prompt`) in
    /// batches of `batch_size`, longest first.
    pub fn compute(
        decoder: &Decoder,
        adapter: Option<&LoraAdapter>,
        examples: &[TokenizedExample],
        batch_size: usize,
        pad_id: u32,
        score_prompt: bool,
    ) -> Result<Self> {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
        // One forward pass scores every position either weighting needs.
        let any = LossWeights {
            prompt: if score_prompt { 1.0 } else { 0.0 },
            response: 1.0,
            system: None,
            user: None,
        };
        let mut tokens = Vec::new();
        for chunk in order.chunks(batch_size.max(1)) {
            let rows: Vec<&TokenizedExample> = chunk.iter().map(|&i| &examples[i]).collect();
            let batch = Batch::new(&rows, &any, pad_id);
            let mut ctx = ForwardContext {
                adapter: adapter.map(|a| a as _),
                ..Default::default()
            };
            let nll = position_nll(decoder, &batch, &mut ctx)?;
            let t = batch.seq_len;
            tokens.extend(
                nll.into_iter()
                    .map(|(flat, value)| (rows[flat / t].kinds[flat % t], value)),
            );
        }
        Ok(Self {
            tokens,
            prompt_scored: score_prompt,
            examples: examples.len(),
            batch_size,
        })
    }

    /// Whether these losses can give the metrics under `weights`.
    pub fn covers(&self, weights: &LossWeights) -> bool {
        self.prompt_scored || !has_prompt_weight(weights)
    }

    /// The metrics under `weights` (micro-averaged over tokens, as [`loss_metrics`]).
    pub fn metrics(&self, weights: &LossWeights, normalization: Normalization) -> LossMetrics {
        let (mut resp_sum, mut resp_count) = (0f64, 0usize);
        let (mut wit_sum, mut wit_denom) = (0f64, 0f64);
        for &(kind, value) in &self.tokens {
            let value = value as f64;
            if kind == TokenKind::Response {
                resp_sum += value;
                resp_count += 1;
            }
            let w = weights.weight_of(kind) as f64;
            if w != 0.0 {
                wit_sum += w * value;
                wit_denom += match normalization {
                    Normalization::TokenCount => 1.0,
                    Normalization::WeightSum => w,
                };
            }
        }
        let response_loss = if resp_count > 0 {
            resp_sum / resp_count as f64
        } else {
            f64::NAN
        };
        LossMetrics {
            response_loss,
            response_ppl: response_loss.exp(),
            wit_loss: if wit_denom > 0.0 {
                wit_sum / wit_denom
            } else {
                f64::NAN
            },
            response_tokens: resp_count,
        }
    }
}

fn has_prompt_weight(w: &LossWeights) -> bool {
    w.prompt != 0.0 || w.system.is_some_and(|x| x != 0.0) || w.user.is_some_and(|x| x != 0.0)
}

/// Whether a larger value of `metric` is better (losses, perplexities and prompt sensitivity are
/// better lower; accuracies and match rates higher). The one rule every table and sweep uses.
pub fn higher_is_better(metric: &str) -> bool {
    !(metric.contains("loss") || metric.contains("ppl") || metric.contains("sensitivity"))
}
