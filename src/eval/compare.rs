//! Side-by-side evaluation of several adapters (and the bare base) on one loaded base model:
//! loss metrics, generation scores, and prompt robustness across templates.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::generation::{generate_answers, score_answers, ScoredGeneration};
use super::metrics::loss_metrics;
use crate::data::{self, Batch, Example, LossWeights, Template, TokenizeOptions, TokenizedExample};
use crate::lora::LoraAdapter;
use crate::loss::{position_nll, Normalization};
use crate::model::decoder::ForwardContext;
use crate::model::BaseModel;
use crate::{Error, Result};

/// What to compute.
#[derive(Debug)]
pub struct EvalSpec {
    /// `(name, template)`: the first is the main one; more enable robustness metrics.
    pub templates: Vec<(String, Template)>,
    /// Loss weights for the `wit_loss` column.
    pub weights: LossWeights,
    pub normalization: Normalization,
    pub batch_size: usize,
    pub max_seq_len: usize,
    /// Examples answered by greedy generation (0 = none).
    pub generate: usize,
    /// Examples used for the POSIX-style sensitivity index (needs ≥ 2 templates).
    pub sensitivity_examples: usize,
}

/// Results for one adapter (or `base`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterResult {
    pub name: String,
    /// Main-template metrics, plus `<metric>_mean` / `<metric>_std` across templates and
    /// `sensitivity` when several templates are given.
    pub metrics: BTreeMap<String, f64>,
    pub per_template: BTreeMap<String, BTreeMap<String, f64>>,
    pub generations: Vec<ScoredGeneration>,
    pub seconds: f64,
}

/// Tokenized evaluation data for every template, shared by all adapters.
pub struct EvalData {
    pub examples: Vec<Example>,
    /// Per template: tokenized examples (those that fit) for the loss metrics.
    pub tokenized: Vec<Vec<TokenizedExample>>,
}

impl EvalData {
    pub fn new(base: &BaseModel, examples: Vec<Example>, spec: &EvalSpec) -> Result<Self> {
        let tokenizer = base.tokenizer()?;
        let opts = TokenizeOptions {
            max_seq_len: Some(spec.max_seq_len.min(base.decoder.max_positions())),
            on_error: data::OnBadRow::Skip,
            ..Default::default()
        };
        let mut tokenized = Vec::new();
        for (_, template) in &spec.templates {
            tokenized
                .push(data::tokenize_examples(&examples, template, tokenizer, &opts)?.examples);
        }
        Ok(Self {
            examples,
            tokenized,
        })
    }
}

/// Evaluates one adapter (`None` = the base) under every template.
pub fn evaluate_adapter(
    base: &BaseModel,
    name: &str,
    adapter: Option<&LoraAdapter>,
    data: &EvalData,
    spec: &EvalSpec,
) -> Result<AdapterResult> {
    let started = Instant::now();
    let pad = base.decoder.config.eos_token_id.unwrap_or(0);
    let mut per_template = BTreeMap::new();
    let mut generations = Vec::new();
    let mut answers_per_template = Vec::new();
    for (i, (tname, template)) in spec.templates.iter().enumerate() {
        let mut m = BTreeMap::new();
        let losses = loss_metrics(
            &base.decoder,
            adapter,
            &data.tokenized[i],
            &spec.weights,
            spec.normalization,
            spec.batch_size,
            pad,
        )?;
        losses.insert_into(&mut m);
        if spec.generate > 0 {
            let answers = generate_answers(base, adapter, template, &data.examples, spec.generate)?;
            m.extend(score_answers(&answers));
            if i == 0 {
                generations = answers.clone();
            }
            answers_per_template.push(answers);
        }
        per_template.insert(tname.clone(), m);
    }
    let main = spec
        .templates
        .first()
        .map(|(n, _)| n.clone())
        .unwrap_or_default();
    let mut metrics = per_template.get(&main).cloned().unwrap_or_default();
    if spec.templates.len() > 1 {
        let keys: Vec<String> = metrics.keys().cloned().collect();
        for key in keys {
            let values: Vec<f64> = per_template
                .values()
                .filter_map(|m| m.get(&key).copied())
                .collect();
            let n = values.len() as f64;
            let mean = values.iter().sum::<f64>() / n;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            metrics.insert(format!("{key}_mean"), mean);
            metrics.insert(format!("{key}_std"), var.sqrt());
        }
        if spec.sensitivity_examples > 0 {
            let s = sensitivity(base, adapter, &data.examples, spec)?;
            if s.is_finite() {
                metrics.insert("sensitivity".into(), s);
            }
        }
    }
    Ok(AdapterResult {
        name: name.to_string(),
        metrics,
        per_template,
        generations,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A POSIX-style prompt sensitivity index (Chatterjee et al. 2024): for each example, with
/// prompt variants `x_j` (one per template) and the model's greedy responses `y_i` to them, the
/// mean over ordered pairs i ≠ j of |log P(y_i | x_j) − log P(y_j | x_j)| / len(y_i).
/// Lower is more robust.
pub fn sensitivity(
    base: &BaseModel,
    adapter: Option<&LoraAdapter>,
    examples: &[Example],
    spec: &EvalSpec,
) -> Result<f64> {
    let tokenizer = base.tokenizer()?;
    let stop: Vec<u32> = base.decoder.config.eos_token_id.into_iter().collect();
    let mut total = 0f64;
    let mut pairs = 0usize;
    for ex in examples.iter().take(spec.sensitivity_examples) {
        let mut prompts = Vec::new();
        for (_, template) in &spec.templates {
            let text = template.render_prompt(ex)?;
            let ids = tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec();
            prompts.push(ids);
        }
        let responses: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let config = crate::generate::GenerationConfig {
                    max_new_tokens: 24.min(base.decoder.max_positions().saturating_sub(p.len())),
                    stop_ids: stop.clone(),
                    ..Default::default()
                };
                crate::generate::generate(&base.decoder, adapter, p, &config, |_| {})
            })
            .collect::<Result<_>>()?;
        for (j, x) in prompts.iter().enumerate() {
            let own = log_prob(base, adapter, x, &responses[j])?;
            for (i, y) in responses.iter().enumerate() {
                if i == j || y.is_empty() {
                    continue;
                }
                let cross = log_prob(base, adapter, x, y)?;
                total += (cross - own).abs() / y.len() as f64;
                pairs += 1;
            }
        }
    }
    Ok(if pairs > 0 {
        total / pairs as f64
    } else {
        f64::NAN
    })
}

/// `log P(y | x)` summed over the tokens of `y`.
fn log_prob(base: &BaseModel, adapter: Option<&LoraAdapter>, x: &[u32], y: &[u32]) -> Result<f64> {
    if y.is_empty() {
        return Ok(0.0);
    }
    let mut ids = x.to_vec();
    ids.extend_from_slice(y);
    let mut weights = vec![0f32; ids.len()];
    for w in weights.iter_mut().skip(x.len()) {
        *w = 1.0;
    }
    let len = ids.len();
    let batch = Batch {
        ids,
        weights,
        seq_lens: vec![len],
        batch: 1,
        seq_len: len,
    };
    let mut ctx = ForwardContext {
        adapter: adapter.map(|a| a as _),
        ..Default::default()
    };
    let nll = position_nll(&base.decoder, &batch, &mut ctx)?;
    Ok(-nll.iter().map(|(_, v)| *v as f64).sum::<f64>())
}
