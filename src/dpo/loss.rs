//! The DPO loss (Rafailov et al. 2023) on a LoRA policy:
//!
//! `loss = −log σ(β[(log πθ(yw|x) − log πref(yw|x)) − (log πθ(yl|x) − log πref(yl|x))])`,
//!
//! with each `log π(y|x)` summed over the response tokens of `y`, averaged over the pairs of an
//! optimizer step. The implicit reward of an answer is `β (log πθ − log πref)`.
//!
//! One forward pass runs chosen and rejected answers together (rows `0..P` chosen, `P..2P`
//! rejected). The loss itself is a function of 2P numbers, so it is computed on the host in f64
//! (a stable `softplus`, no kink at the tie `z = 0` that `relu`/`abs` gradients would get wrong);
//! backward runs through the surrogate `Σ_i (∂loss/∂log πθ_i) · log πθ_i`, whose gradient is the
//! loss's exactly.

use candle_core::{DType, Tensor};

use super::data::PairTokens;
use crate::data::{Batch, LossWeights, TokenKind};
use crate::loss::batch_tensors;
use crate::model::decoder::{Decoder, ForwardContext};
use crate::{Error, Result};

/// Reference log-probabilities of one pair, computed once before training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefLogps {
    pub chosen: f64,
    pub rejected: f64,
}

/// A padded batch of pairs: chosen rows first, then rejected rows; `weights` mark the response
/// tokens (1) whose log-probabilities are summed.
pub struct PairBatch {
    pub batch: Batch,
    pub pairs: usize,
    /// `[2P x T]` WIT weights (λp on prompt tokens, λr on response tokens) on the chosen rows,
    /// 0 on rejected rows; empty when no SFT term is asked for.
    pub sft_weights: Vec<f32>,
}

impl PairBatch {
    pub fn new(pairs: &[&PairTokens], pad_id: u32, sft: Option<&LossWeights>) -> Self {
        let rows: Vec<&crate::data::TokenizedExample> = pairs
            .iter()
            .map(|p| &p.chosen)
            .chain(pairs.iter().map(|p| &p.rejected))
            .collect();
        let batch = Batch::new(&rows, &LossWeights::new(0.0, 1.0), pad_id);
        let sft_weights = match sft {
            None => Vec::new(),
            Some(w) => {
                let t = batch.seq_len;
                let mut out = vec![0f32; batch.batch * t];
                for (b, p) in pairs.iter().enumerate() {
                    let row = w.token_weights(&p.chosen);
                    out[b * t..b * t + row.len()].copy_from_slice(&row);
                }
                out
            }
        };
        Self {
            batch,
            pairs: pairs.len(),
            sft_weights,
        }
    }

    /// Positions with a non-zero SFT weight (the WIT denominator's share of this batch).
    pub fn sft_tokens(&self) -> usize {
        self.sft_weights.iter().filter(|w| **w != 0.0).count()
    }
}

/// Number of response tokens of `ex` that are predicted (position 0 never is).
fn predicted_response(ex: &crate::data::TokenizedExample) -> usize {
    ex.kinds
        .iter()
        .skip(1)
        .filter(|k| **k == TokenKind::Response)
        .count()
}

/// What one forward pass of the policy gives: per-row summed response log-probs `[2P]`, and the
/// weighted SFT NLL sum over the chosen rows with its token count.
pub struct PolicyOutput {
    pub logps: Tensor,
    pub sft: Option<(Tensor, usize)>,
}

/// `Σ_t log p(y_t | y_<t)` over each row's response tokens, differentiable unless
/// `ctx.no_grad`; with SFT weights in `batch`, also the weighted NLL sum of the chosen rows.
pub fn policy_forward(
    decoder: &Decoder,
    batch: &PairBatch,
    ctx: &mut ForwardContext<'_>,
) -> Result<PolicyOutput> {
    let device = decoder.device();
    let b = &batch.batch;
    let (ids, mask) = batch_tensors(b, device)?;
    let hidden = decoder.forward_hidden(&ids, mask.as_ref(), ctx)?;
    let hidden = if ctx.no_grad { hidden.detach() } else { hidden };
    let (rows, t) = (b.batch, b.seq_len);
    let flat = hidden.reshape((rows * t, decoder.config.hidden_size))?;
    let mut logps = Vec::with_capacity(rows);
    for row in 0..rows {
        let positions: Vec<u32> = (1..b.seq_lens[row].min(t))
            .filter(|&ti| b.weights[row * t + ti] != 0.0)
            .map(|ti| (row * t + ti) as u32)
            .collect();
        if positions.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "pair row {row} has no response token to score"
            )));
        }
        let n = positions.len();
        let targets: Vec<u32> = positions.iter().map(|&p| b.ids[p as usize]).collect();
        let inputs: Vec<u32> = positions.iter().map(|&p| p - 1).collect();
        let selected = flat.index_select(&Tensor::from_vec(inputs, n, device)?, 0)?;
        let targets = Tensor::from_vec(targets, n, device)?;
        let ones = Tensor::ones(n, DType::F32, device)?;
        let nll = decoder.weighted_nll_from_hidden(&selected, &targets, &ones)?;
        logps.push(nll.neg()?);
    }
    let logps = Tensor::stack(&logps, 0)?;
    let sft = if batch.sft_weights.is_empty() {
        None
    } else {
        let (mut inputs, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
        for row in 0..batch.pairs {
            for ti in 1..b.seq_lens[row].min(t) {
                let w = batch.sft_weights[row * t + ti];
                if w != 0.0 {
                    inputs.push((row * t + ti - 1) as u32);
                    targets.push(b.ids[row * t + ti]);
                    weights.push(w);
                }
            }
        }
        let n = inputs.len();
        if n == 0 {
            Some((Tensor::zeros((), logps.dtype(), device)?, 0))
        } else {
            let selected = flat.index_select(&Tensor::from_vec(inputs, n, device)?, 0)?;
            let sum = decoder.weighted_nll_from_hidden(
                &selected,
                &Tensor::from_vec(targets, n, device)?,
                &Tensor::from_vec(weights, n, device)?,
            )?;
            Some((sum, n))
        }
    };
    Ok(PolicyOutput { logps, sft })
}

/// Per-pair log-probabilities without gradient: `(chosen, rejected)` for each pair of `batch`.
pub fn pair_logps(
    decoder: &Decoder,
    batch: &PairBatch,
    ctx: &mut ForwardContext<'_>,
) -> Result<Vec<RefLogps>> {
    let grad_mode = std::mem::replace(&mut ctx.no_grad, true);
    let out = policy_forward(decoder, batch, ctx);
    ctx.no_grad = grad_mode;
    let values = to_f64(&out?.logps)?;
    let p = batch.pairs;
    Ok((0..p)
        .map(|i| RefLogps {
            chosen: values[i],
            rejected: values[p + i],
        })
        .collect())
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// `log(1 + e^x)` without overflow.
pub fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// `σ(x)` without overflow.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Sums over pairs of the DPO quantities; [`DpoStats::mean`] turns them into the logged metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DpoStats {
    pub pairs: usize,
    pub loss: f64,
    /// Pairs whose chosen reward is strictly larger than the rejected one.
    pub correct: usize,
    pub margin: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub chosen_logp: f64,
    pub rejected_logp: f64,
    /// Pairs where the policy itself gives the chosen answer the higher log-probability
    /// (reference-free; meaningful before training too).
    pub logp_correct: usize,
}

/// Means over the pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DpoMetrics {
    pub loss: f64,
    pub reward_accuracy: f64,
    pub reward_margin: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub chosen_logp: f64,
    pub rejected_logp: f64,
    pub logp_accuracy: f64,
}

impl DpoStats {
    /// Adds one pair with policy log-probs `policy` and reference `reference`; returns
    /// `∂loss_i/∂z_i = −σ(−z_i)`.
    pub fn add(&mut self, policy: RefLogps, reference: RefLogps, beta: f64) -> f64 {
        let chosen_reward = beta * (policy.chosen - reference.chosen);
        let rejected_reward = beta * (policy.rejected - reference.rejected);
        let z = chosen_reward - rejected_reward;
        self.pairs += 1;
        self.loss += softplus(-z);
        self.correct += usize::from(chosen_reward > rejected_reward);
        self.margin += z;
        self.chosen_reward += chosen_reward;
        self.rejected_reward += rejected_reward;
        self.chosen_logp += policy.chosen;
        self.rejected_logp += policy.rejected;
        self.logp_correct += usize::from(policy.chosen > policy.rejected);
        -sigmoid(-z)
    }

    pub fn merge(&mut self, other: &DpoStats) {
        self.pairs += other.pairs;
        self.loss += other.loss;
        self.correct += other.correct;
        self.margin += other.margin;
        self.chosen_reward += other.chosen_reward;
        self.rejected_reward += other.rejected_reward;
        self.chosen_logp += other.chosen_logp;
        self.rejected_logp += other.rejected_logp;
        self.logp_correct += other.logp_correct;
    }

    pub fn mean(&self) -> DpoMetrics {
        let n = self.pairs.max(1) as f64;
        DpoMetrics {
            loss: self.loss / n,
            reward_accuracy: self.correct as f64 / n,
            reward_margin: self.margin / n,
            chosen_reward: self.chosen_reward / n,
            rejected_reward: self.rejected_reward / n,
            chosen_logp: self.chosen_logp / n,
            rejected_logp: self.rejected_logp / n,
            logp_accuracy: self.logp_correct as f64 / n,
        }
    }
}

/// The objective of one micro-batch as part of an optimizer step.
pub struct MicroObjective {
    /// This micro-batch's share of the step's objective value:
    /// `Σ_i loss_i / step_pairs + sft_weight · sft_sum / sft_denominator`.
    pub value: f64,
    pub stats: DpoStats,
    /// The SFT (WIT) NLL sum of the chosen rows, undivided (0 without SFT).
    pub sft_sum: f64,
    /// A scalar whose gradient is the gradient of `value`.
    pub surrogate: Tensor,
}

/// How a micro-batch's terms are scaled inside its optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct StepScale {
    pub beta: f64,
    /// Pairs in the whole step (the DPO mean divides by this).
    pub step_pairs: usize,
    pub sft_weight: f64,
    /// Non-zero-weight SFT tokens in the whole step (the WIT normalisation).
    pub sft_denominator: f64,
}

/// Forward pass of the policy on `batch` and its part of the step's objective.
pub fn micro_objective(
    decoder: &Decoder,
    batch: &PairBatch,
    reference: &[RefLogps],
    scale: StepScale,
    ctx: &mut ForwardContext<'_>,
) -> Result<MicroObjective> {
    if reference.len() != batch.pairs {
        return Err(Error::InvalidArgument(format!(
            "{} reference log-probs for {} pairs",
            reference.len(),
            batch.pairs
        )));
    }
    let out = policy_forward(decoder, batch, ctx)?;
    let values = to_f64(&out.logps)?;
    let p = batch.pairs;
    let mut stats = DpoStats::default();
    let mut coeff = vec![0f64; 2 * p];
    let per_pair = 1.0 / scale.step_pairs.max(1) as f64;
    for i in 0..p {
        let policy = RefLogps {
            chosen: values[i],
            rejected: values[p + i],
        };
        let dz = stats.add(policy, reference[i], scale.beta);
        // z = β(logπ_c − ref_c) − β(logπ_r − ref_r)
        coeff[i] = dz * scale.beta * per_pair;
        coeff[p + i] = -dz * scale.beta * per_pair;
    }
    let coeff = Tensor::from_vec(coeff, 2 * p, decoder.device())?.to_dtype(out.logps.dtype())?;
    let mut surrogate = (&out.logps * &coeff)?.sum_all()?;
    let mut value = stats.loss * per_pair;
    let mut sft_sum = 0.0;
    if let Some((sum, _)) = &out.sft {
        if scale.sft_weight != 0.0 && scale.sft_denominator > 0.0 {
            sft_sum = sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let factor = scale.sft_weight / scale.sft_denominator;
            value += factor * sft_sum;
            surrogate = (surrogate + (sum * factor)?)?;
        }
    }
    Ok(MicroObjective {
        value,
        stats,
        sft_sum,
        surrogate,
    })
}

/// Response tokens that would be scored for a pair (both answers), for throughput.
pub fn scored_tokens(pair: &PairTokens) -> usize {
    predicted_response(&pair.chosen) + predicted_response(&pair.rejected)
}
