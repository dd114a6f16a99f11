//! From a config to tokenized train/eval sets: load (or generate) examples, split, render with
//! the chosen template, tokenize once with token kinds so any loss weighting can reuse them.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::config::TrainConfig;
use crate::data::{
    self, Example, FieldMap, LoadOptions, Template, TokenizeOptions, TokenizedExample,
};
use crate::model::BaseModel;
use crate::{Error, Result};

/// Seed offset of the built-in dataset, so it does not move with the training seed.
pub const BUILTIN_DATA_SEED: u64 = 20_250_101;

/// Tokenized data for a run (or a sweep: the same data serves every weight setting).
pub struct PreparedData {
    pub train: Vec<TokenizedExample>,
    pub eval: Vec<TokenizedExample>,
    /// The raw eval examples, aligned with `eval`, for generation-based metrics.
    pub eval_examples: Vec<Example>,
    pub template: Template,
    pub template_name: String,
    pub source: String,
    /// sha256 of the tokenized train and eval examples (ids and token kinds).
    pub fingerprint: String,
    /// Human-readable lines: what was kept, truncated, skipped, and why.
    pub report: Vec<String>,
}

/// How training reads the rows of the data a config names (shared with `suggest`, which must
/// see the data exactly as training does).
pub fn load_options(cfg: &TrainConfig) -> LoadOptions {
    let field_map =
        FieldMap::from_fields(cfg.prompt_field.as_deref(), cfg.response_field.as_deref());
    LoadOptions {
        format: cfg.format.resolve(field_map.as_ref()),
        field_map,
        on_bad_row: cfg.on_bad_row,
    }
}

/// How training tokenizes and truncates for a config and base (shared with `suggest`).
pub fn tokenize_options(cfg: &TrainConfig, base: &BaseModel) -> TokenizeOptions {
    TokenizeOptions {
        max_seq_len: Some(cfg.max_seq_len.min(base.decoder.max_positions())),
        truncation: cfg.truncate_prompt,
        last_turn_only: cfg.last_turn_only,
        on_error: cfg.on_bad_row,
        ..Default::default()
    }
}

/// Loads, splits and tokenizes the data a config names.
pub fn prepare_data(cfg: &TrainConfig, base: &BaseModel) -> Result<PreparedData> {
    let tokenizer = base.tokenizer()?;
    let template = base.template(&cfg.template)?;
    let opts = load_options(cfg);
    let mut report = Vec::new();
    let (mut train_examples, source) = match &cfg.data {
        None => (
            data::builtin_examples(cfg.builtin_examples, BUILTIN_DATA_SEED),
            format!("built-in tasks ({} examples)", cfg.builtin_examples),
        ),
        Some(path) => {
            let (examples, load_report) = data::load_examples(path, &opts)?;
            report.push(format!("{load_report}"));
            (examples, path.display().to_string())
        }
    };
    let eval_examples = match &cfg.eval_data {
        Some(path) => {
            let (examples, load_report) = data::load_examples(path, &opts)?;
            report.push(format!("eval: {load_report}"));
            examples
        }
        None => {
            // A seeded split, independent of file order.
            let n_eval = ((train_examples.len() as f64) * cfg.eval_fraction).round() as usize;
            let mut order: Vec<usize> = (0..train_examples.len()).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0x5eed));
            let eval_set: std::collections::HashSet<usize> =
                order[..n_eval].iter().copied().collect();
            let mut eval = Vec::with_capacity(n_eval);
            let mut train = Vec::with_capacity(train_examples.len() - n_eval);
            for (i, ex) in train_examples.into_iter().enumerate() {
                if eval_set.contains(&i) {
                    eval.push(ex);
                } else {
                    train.push(ex);
                }
            }
            train_examples = train;
            eval
        }
    };
    let tok_opts = tokenize_options(cfg, base);
    let train = data::tokenize_examples(&train_examples, &template, tokenizer, &tok_opts)?;
    report.push(format!("train: {}", train.report));
    let eval = data::tokenize_examples(&eval_examples, &template, tokenizer, &tok_opts)?;
    report.push(format!("eval: {}", eval.report));
    if train.examples.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "no training example left from {source} (see the report above)"
        )));
    }
    let eval_raw: Vec<Example> = eval
        .source_index
        .iter()
        .map(|&i| eval_examples[i].clone())
        .collect();
    let lens: Vec<usize> = train.examples.iter().map(|e| e.len()).collect();
    let grouped = data::length_grouped_batches(&lens, cfg.batch_size, cfg.seed, true);
    report.push(format!(
        "train: {} tokens, padding {:.1}% with length-grouped batches of {}",
        lens.iter().sum::<usize>(),
        100.0 * data::batch::padding_fraction(&lens, &grouped),
        cfg.batch_size
    ));
    let mut all = train.examples.clone();
    all.extend(eval.examples.iter().cloned());
    Ok(PreparedData {
        fingerprint: data::fingerprint(&all),
        train: train.examples,
        eval: eval.examples,
        eval_examples: eval_raw,
        template,
        template_name: cfg.template.clone(),
        source,
        report,
    })
}
