//! Generation-based metrics: greedy answers to held-out prompts scored against their references.

use std::collections::BTreeMap;

use super::scoring::{contains, exact_match, extract_answer, rouge_l};
use crate::data::{Example, Template};
use crate::generate::{generate, GenerationConfig};
use crate::lora::LoraAdapter;
use crate::model::BaseModel;
use crate::{Error, Result};

/// One scored generation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScoredGeneration {
    pub prompt: String,
    pub reference: String,
    pub output: String,
    pub exact_match: bool,
}

/// Greedy answers for the first `limit` examples that have a reference.
pub fn generate_answers(
    base: &BaseModel,
    adapter: Option<&LoraAdapter>,
    template: &Template,
    examples: &[Example],
    limit: usize,
) -> Result<Vec<ScoredGeneration>> {
    let tokenizer = base.tokenizer()?;
    let mut stop_ids = Vec::new();
    if let Some(eos) = base.decoder.config.eos_token_id {
        stop_ids.push(eos);
    }
    let mut out = Vec::new();
    for ex in examples
        .iter()
        .filter(|e| e.reference.is_some())
        .take(limit)
    {
        let reference = ex.reference.clone().unwrap_or_default();
        let prompt = template.render_prompt(ex)?;
        let ids = tokenizer
            .encode(prompt.as_str(), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec();
        let ref_tokens = tokenizer
            .encode(reference.as_str(), false)
            .map(|e| e.len())
            .unwrap_or(32);
        let room = base.decoder.max_positions().saturating_sub(ids.len());
        let config = GenerationConfig {
            max_new_tokens: (ref_tokens + 16).min(256).min(room),
            stop_ids: stop_ids.clone(),
            ..Default::default()
        };
        if config.max_new_tokens == 0 {
            continue;
        }
        let new = generate(&base.decoder, adapter, &ids, &config, |_| {})?;
        let text = tokenizer
            .decode(&new, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .trim()
            .to_string();
        out.push(ScoredGeneration {
            exact_match: exact_match(&text, &reference),
            prompt: ex
                .messages
                .iter()
                .rev()
                .find(|m| m.role == crate::data::Role::User)
                .map(|m| m.content.clone())
                .unwrap_or_default(),
            reference,
            output: text,
        });
    }
    Ok(out)
}

/// Mean exact match, contains, ROUGE-L and extracted-answer accuracy of generated answers.
pub fn generation_scores(
    base: &BaseModel,
    adapter: Option<&LoraAdapter>,
    template: &Template,
    examples: &[Example],
    limit: usize,
) -> Result<BTreeMap<String, f64>> {
    let answers = generate_answers(base, adapter, template, examples, limit)?;
    Ok(score_answers(&answers))
}

pub fn score_answers(answers: &[ScoredGeneration]) -> BTreeMap<String, f64> {
    let mut scores = BTreeMap::new();
    if answers.is_empty() {
        return scores;
    }
    let n = answers.len() as f64;
    let mean = |f: &dyn Fn(&ScoredGeneration) -> f64| answers.iter().map(f).sum::<f64>() / n;
    scores.insert("exact_match".into(), mean(&|a| a.exact_match as u8 as f64));
    scores.insert(
        "contains".into(),
        mean(&|a| contains(&a.output, &a.reference) as u8 as f64),
    );
    scores.insert(
        "rouge_l".into(),
        mean(&|a| rouge_l(&a.output, &a.reference)),
    );
    let extractable: Vec<&ScoredGeneration> = answers
        .iter()
        .filter(|a| extract_answer(&a.reference).is_some() && a.reference.contains("####"))
        .collect();
    if !extractable.is_empty() {
        let correct = extractable
            .iter()
            .filter(|a| extract_answer(&a.output) == extract_answer(&a.reference))
            .count();
        scores.insert(
            "answer_accuracy".into(),
            correct as f64 / extractable.len() as f64,
        );
    }
    scores
}
