//! From a config to tokenized train/eval sets: load (or generate) examples, split, render with
//! the chosen template, tokenize once with token kinds so any loss weighting can reuse them.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::config::TrainConfig;
use crate::data::{
    self, ChatTemplate, Example, FieldMap, Format, LoadOptions, OnBadRow, Template,
    TokenizeOptions, TokenizedExample, Truncation,
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

/// The template named by `spec`: `chat`, `alpaca`, `raw`, or a Jinja file path.
pub fn build_template(spec: &str, base: &BaseModel) -> Result<Template> {
    let eos = base.eos_token.clone().unwrap_or_default();
    let bos = base.bos_token.clone().unwrap_or_default();
    match spec {
        "chat" => {
            let source = base.chat_template.as_deref().ok_or_else(|| {
                Error::Template(format!(
                    "model `{}` has no chat template; use --template alpaca|raw|FILE",
                    base.name
                ))
            })?;
            Ok(Template::Chat(ChatTemplate::new(source, &bos, &eos)?))
        }
        "alpaca" => Ok(Template::alpaca(eos)),
        "raw" => Ok(Template::raw(eos)),
        path => Ok(Template::Custom(ChatTemplate::from_file(
            Path::new(path),
            &bos,
            &eos,
        )?)),
    }
}

/// The prompt/response field mapping named by `--prompt-field` / `--response-field`; a missing
/// half keeps its default name. `None` when neither is given (auto-detection).
pub fn field_map(prompt: Option<&str>, response: Option<&str>) -> Option<FieldMap> {
    if prompt.is_none() && response.is_none() {
        return None;
    }
    Some(FieldMap::new(
        prompt.unwrap_or("prompt"),
        response.unwrap_or("response"),
    ))
}

fn load_options(cfg: &TrainConfig) -> Result<LoadOptions> {
    let field_map = field_map(cfg.prompt_field.as_deref(), cfg.response_field.as_deref());
    let format = match cfg.format.as_str() {
        "auto" => Format::Auto,
        "alpaca" => Format::Alpaca,
        "chat" | "messages" => Format::Messages,
        "prompt-response" => Format::PromptResponse(field_map.clone().unwrap_or_default()),
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown data format `{other}` (auto, alpaca, prompt-response, chat)"
            )))
        }
    };
    let on_bad_row = match cfg.on_bad_row.as_str() {
        "error" => OnBadRow::Error,
        "skip" => OnBadRow::Skip,
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown on_bad_row `{other}` (error, skip)"
            )))
        }
    };
    Ok(LoadOptions {
        format,
        field_map,
        on_bad_row,
    })
}

/// Loads, splits and tokenizes the data a config names.
pub fn prepare_data(cfg: &TrainConfig, base: &BaseModel) -> Result<PreparedData> {
    let tokenizer = base.tokenizer()?;
    let template = build_template(&cfg.template, base)?;
    let opts = load_options(cfg)?;
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
    let tok_opts = TokenizeOptions {
        max_seq_len: Some(cfg.max_seq_len.min(base.decoder.max_positions())),
        truncation: match cfg.truncate_prompt.as_str() {
            "left" => Truncation::Left,
            "right" => Truncation::Right,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown truncate_prompt `{other}` (left, right)"
                )))
            }
        },
        last_turn_only: cfg.last_turn_only,
        on_error: opts.on_bad_row,
        ..Default::default()
    };
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
