//! Running tasks: contexts are built once (they do not depend on the adapter), then each model
//! (the base, or the base with one adapter) answers every task's requests and is scored.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::config::{OutputType, TaskConfig};
use super::lm::LanguageModel;
use super::prompt::{ContextBuilder, PromptOptions, Target};
use super::scoring::{mean_stderr, CompiledStep, ExactMatch, Pipeline};
use super::source::{DataSource, Doc};
use super::TaskError;
use crate::data::template::ChatTemplate;
use crate::Result;

/// How a run lays out prompts and how much it asks of the model.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// First N documents of each task (the harness's `--limit`).
    pub limit: Option<usize>,
    /// Overrides every task's `num_fewshot`.
    pub num_fewshot: Option<usize>,
    /// Caps every task's `max_gen_toks` (generation on a CPU).
    pub max_gen_toks: Option<usize>,
    /// Sequences decoded together.
    pub batch_size: usize,
    pub apply_chat_template: bool,
    pub fewshot_as_multiturn: bool,
    /// Documents per task for the prompt-robustness index over the task's
    /// `doc_to_text_variants` (0: off).
    pub sensitivity: usize,
}

/// What a document asks of the model.
#[derive(Debug, Clone)]
enum Request {
    Choices { choices: Vec<String>, gold: usize },
    Generate { target: String },
}

/// A task with its documents and contexts, ready for any adapter.
pub struct PreparedTask {
    pub config: TaskConfig,
    /// Documents in the test split before `--limit`.
    pub original_len: usize,
    pub docs: Vec<Doc>,
    pub contexts: Vec<String>,
    requests: Vec<Request>,
    pipelines: Vec<Pipeline>,
    exact_match: Option<ExactMatch>,
    ifeval: bool,
    pub num_fewshot: usize,
    pub max_gen_toks: usize,
    /// Written between a context and a choice: the task's `target_delimiter`, or nothing when
    /// the context ends in a chat template's generation prompt (the harness's rule).
    choice_delimiter: String,
    /// `[variant][doc]` contexts of the first `--sensitivity` documents under `doc_to_text`
    /// and each of its variants (empty when off).
    variant_contexts: Vec<Vec<String>>,
}

impl PreparedTask {
    /// Loads the task's documents and builds every context.
    pub fn prepare(
        config: TaskConfig,
        data: &DataSource,
        opts: &RunOptions,
        chat_template: Option<&ChatTemplate>,
    ) -> Result<Self> {
        let num_fewshot = opts.num_fewshot.unwrap_or(config.num_fewshot);
        // Loaded once, with the few-shot split when the effective shot count needs it.
        let loaded = data.load(&TaskConfig {
            num_fewshot,
            ..config.clone()
        })?;
        let original_len = loaded.test.len();
        let mut docs = loaded.test;
        if let Some(limit) = opts.limit {
            docs.truncate(limit);
        }
        if docs.is_empty() {
            return Err(TaskError::MissingData {
                task: config.task.clone(),
                message: "the test split has no documents".into(),
            }
            .into());
        }
        let fewshot_pool = loaded.fewshot;
        let prompt_opts = PromptOptions {
            num_fewshot,
            chat_template: if opts.apply_chat_template {
                chat_template
            } else {
                None
            },
            fewshot_as_multiturn: opts.fewshot_as_multiturn,
        };
        if opts.apply_chat_template && chat_template.is_none() {
            return Err(crate::Error::InvalidArgument(
                "--apply-chat-template: the model has no chat template".into(),
            ));
        }
        let mut builder = ContextBuilder::new(&config);
        let mut contexts = Vec::with_capacity(docs.len());
        let mut requests = Vec::with_capacity(docs.len());
        for doc in &docs {
            contexts.push(builder.context(doc, &fewshot_pool, &prompt_opts)?);
            let r = builder.renderer();
            requests.push(match config.output_type {
                OutputType::MultipleChoice => {
                    let choices = r.choices(doc)?.unwrap_or_default();
                    let gold = match r.target(doc)? {
                        Target::Index(i) => i,
                        Target::Text(t) => {
                            choices.iter().position(|c| *c == t).ok_or_else(|| {
                                TaskError::Template {
                                    task: config.task.clone(),
                                    field: "doc_to_target".into(),
                                    message: format!("target `{t}` is not one of the choices"),
                                }
                            })?
                        }
                    };
                    if gold >= choices.len() {
                        return Err(TaskError::Template {
                            task: config.task.clone(),
                            field: "doc_to_target".into(),
                            message: format!(
                                "index {gold} is out of range for {} choices",
                                choices.len()
                            ),
                        }
                        .into());
                    }
                    Request::Choices { choices, gold }
                }
                OutputType::GenerateUntil => Request::Generate {
                    target: match r.target(doc)? {
                        Target::Text(t) => t,
                        Target::Index(i) => i.to_string(),
                    },
                },
            });
        }
        let mut variant_contexts = Vec::new();
        if opts.sensitivity > 0 && !config.doc_to_text_variants.is_empty() {
            let n = opts.sensitivity.min(docs.len());
            let templates = std::iter::once(config.doc_to_text.clone())
                .chain(config.doc_to_text_variants.iter().cloned());
            for template in templates {
                let mut variant = config.clone();
                variant.doc_to_text = template;
                // A fresh builder per variant: the same few-shot draws for the same documents.
                let mut builder = ContextBuilder::new(&variant);
                variant_contexts.push(
                    docs[..n]
                        .iter()
                        .map(|d| builder.context(d, &fewshot_pool, &prompt_opts))
                        .collect::<Result<Vec<_>, _>>()?,
                );
            }
        }
        let pipelines = if config.filter_list.is_empty() {
            vec![Pipeline {
                name: "none".into(),
                steps: vec![CompiledStep::TakeFirst],
            }]
        } else {
            config
                .filter_list
                .iter()
                .map(|p| {
                    Ok(Pipeline {
                        name: p.name.clone(),
                        steps: p
                            .filter
                            .iter()
                            .map(|s| CompiledStep::new(s, &config.task))
                            .collect::<Result<_, TaskError>>()?,
                    })
                })
                .collect::<Result<_, TaskError>>()?
        };
        let exact_match = config
            .metric_list
            .iter()
            .find(|m| m.metric == "exact_match")
            .map(|m| ExactMatch::new(m, &config.task))
            .transpose()?;
        let ifeval = config.metric_list.iter().any(|m| m.metric == "ifeval");
        let max_gen_toks = match opts.max_gen_toks {
            Some(cap) => config.generation_kwargs.max_gen_toks.min(cap),
            None => config.generation_kwargs.max_gen_toks,
        };
        Ok(Self {
            original_len,
            docs,
            contexts,
            requests,
            pipelines,
            exact_match,
            ifeval,
            num_fewshot,
            max_gen_toks,
            variant_contexts,
            choice_delimiter: if opts.apply_chat_template {
                String::new()
            } else {
                config.target_delimiter.clone()
            },
            config,
        })
    }

    /// The POSIX-style prompt sensitivity index (Chatterjee et al. 2024) over the prompt
    /// variants: per document, with variant contexts `x_j` and the model's answers `y_j` to
    /// them (the chosen option, or the greedy generation), the mean over ordered pairs i ≠ j of
    /// |log P(y_i | x_j) − log P(y_j | x_j)| / len(y_i) in tokens. Lower is more robust.
    fn sensitivity(&self, lm: &mut LanguageModel<'_>, batch_size: usize) -> Result<Option<f64>> {
        if self.variant_contexts.len() < 2 {
            return Ok(None);
        }
        let docs = self.variant_contexts[0].len();
        // answers[variant][doc]
        let mut answers: Vec<Vec<String>> = Vec::new();
        for contexts in &self.variant_contexts {
            answers.push(match self.config.output_type {
                OutputType::MultipleChoice => {
                    let mut chosen = Vec::with_capacity(docs);
                    for (context, request) in contexts.iter().zip(&self.requests) {
                        let Request::Choices { choices, .. } = request else {
                            continue;
                        };
                        let conts: Vec<String> = choices
                            .iter()
                            .map(|c| format!("{}{c}", self.choice_delimiter))
                            .collect();
                        let lls = lm.loglikelihoods(context, &conts)?;
                        let lps: Vec<f64> = lls.iter().map(|l| l.logprob).collect();
                        chosen.push(conts[first_argmax(&lps)].clone());
                    }
                    chosen
                }
                OutputType::GenerateUntil => lm.generate_until(
                    contexts,
                    &self.config.generation_kwargs.until,
                    self.max_gen_toks,
                    batch_size,
                    |_| {},
                )?,
            });
        }
        let (mut total, mut pairs) = (0.0, 0usize);
        for d in 0..docs {
            for (j, contexts) in self.variant_contexts.iter().enumerate() {
                let own_answer = &answers[j][d];
                if own_answer.is_empty() {
                    continue;
                }
                let own =
                    lm.loglikelihoods(&contexts[d], std::slice::from_ref(own_answer))?[0].logprob;
                for (i, other) in answers.iter().enumerate() {
                    let y = &other[d];
                    if i == j || y.is_empty() {
                        continue;
                    }
                    let cross =
                        lm.loglikelihoods(&contexts[d], std::slice::from_ref(y))?[0].logprob;
                    let len = lm.encode_pair(&contexts[d], y)?.1.len().max(1);
                    total += (cross - own).abs() / len as f64;
                    pairs += 1;
                }
            }
        }
        Ok((pairs > 0).then(|| total / pairs as f64))
    }

    /// Answers and scores every document with `lm`; `progress` is told of each finished one.
    pub fn evaluate(
        &self,
        lm: &mut LanguageModel<'_>,
        adapter_name: &str,
        batch_size: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<TaskOutcome> {
        let truncated_before = lm.truncated;
        let mut samples = Vec::with_capacity(self.docs.len());
        match self.config.output_type {
            OutputType::MultipleChoice => {
                for (doc_id, (context, request)) in
                    self.contexts.iter().zip(&self.requests).enumerate()
                {
                    let Request::Choices { choices, gold } = request else {
                        continue;
                    };
                    let continuations: Vec<String> = choices
                        .iter()
                        .map(|c| format!("{}{c}", self.choice_delimiter))
                        .collect();
                    let lls = lm.loglikelihoods(context, &continuations)?;
                    let logprobs: Vec<f64> = lls.iter().map(|l| l.logprob).collect();
                    let pred = first_argmax(&logprobs);
                    let mut metrics = BTreeMap::new();
                    for m in &self.config.metric_list {
                        let value = match m.metric.as_str() {
                            "acc" => f64::from(u8::from(pred == *gold)),
                            "acc_norm" => {
                                let normed: Vec<f64> = logprobs
                                    .iter()
                                    .zip(choices)
                                    .map(|(lp, c)| lp / c.chars().count().max(1) as f64)
                                    .collect();
                                f64::from(u8::from(first_argmax(&normed) == *gold))
                            }
                            _ => continue,
                        };
                        metrics.insert(format!("{},none", m.metric), MetricValue::Scalar(value));
                    }
                    samples.push(Sample {
                        adapter: adapter_name.to_string(),
                        task: self.config.task.clone(),
                        doc_id,
                        prompt: context.clone(),
                        target: choices[*gold].clone(),
                        choices: Some(choices.clone()),
                        loglikelihoods: Some(logprobs),
                        prediction_index: Some(pred),
                        output: None,
                        filtered: BTreeMap::new(),
                        metrics,
                    });
                    progress(1);
                }
            }
            OutputType::GenerateUntil => {
                let until = &self.config.generation_kwargs.until;
                let outputs = lm.generate_until(
                    &self.contexts,
                    until,
                    self.max_gen_toks,
                    batch_size,
                    &mut progress,
                )?;
                for (doc_id, ((context, request), output)) in self
                    .contexts
                    .iter()
                    .zip(&self.requests)
                    .zip(outputs)
                    .enumerate()
                {
                    let Request::Generate { target } = request else {
                        continue;
                    };
                    let mut metrics = BTreeMap::new();
                    let mut filtered = BTreeMap::new();
                    if self.ifeval {
                        let doc = &self.docs[doc_id];
                        for (k, v) in ifeval_metrics(doc, &output, &self.config.task)? {
                            metrics.insert(format!("{k},none"), v);
                        }
                    } else {
                        for p in &self.pipelines {
                            let value = p.run(&output);
                            if let Some(em) = &self.exact_match {
                                metrics.insert(
                                    format!("exact_match,{}", p.name),
                                    MetricValue::Scalar(em.score(&value, target)),
                                );
                            }
                            filtered.insert(p.name.clone(), value);
                        }
                    }
                    samples.push(Sample {
                        adapter: adapter_name.to_string(),
                        task: self.config.task.clone(),
                        doc_id,
                        prompt: context.clone(),
                        target: target.clone(),
                        choices: None,
                        loglikelihoods: None,
                        prediction_index: None,
                        output: Some(output),
                        filtered,
                        metrics,
                    });
                }
            }
        }
        let mut outcome = TaskOutcome::new(
            &self.config,
            samples,
            self.original_len,
            lm.truncated - truncated_before,
        );
        if let Some(s) = self.sensitivity(lm, batch_size)? {
            outcome.metrics.insert("sensitivity,none".into(), (s, None));
        }
        Ok(outcome)
    }
}

/// IFEval's four accuracies for one response.
fn ifeval_metrics(
    doc: &Doc,
    response: &str,
    task: &str,
) -> Result<Vec<(&'static str, MetricValue)>> {
    let bad = |message: String| TaskError::MissingData {
        task: task.to_string(),
        message,
    };
    let prompt = doc
        .get("prompt")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("document without `prompt`".into()))?;
    let ids: Vec<String> = doc
        .get("instruction_id_list")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("document without `instruction_id_list`".into()))?
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    let kwargs: Vec<serde_json::Map<String, Value>> = doc
        .get("kwargs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("document without `kwargs`".into()))?
        .iter()
        .map(|v| v.as_object().cloned().unwrap_or_default())
        .collect();
    let verdicts =
        super::ifeval::evaluate(prompt, &ids, &kwargs, response).map_err(TaskError::from)?;
    let flags = |v: &[bool]| {
        v.iter()
            .map(|b| f64::from(u8::from(*b)))
            .collect::<Vec<_>>()
    };
    Ok(vec![
        (
            "prompt_level_strict_acc",
            MetricValue::Scalar(f64::from(u8::from(verdicts.strict.iter().all(|b| *b)))),
        ),
        (
            "inst_level_strict_acc",
            MetricValue::List(flags(&verdicts.strict)),
        ),
        (
            "prompt_level_loose_acc",
            MetricValue::Scalar(f64::from(u8::from(verdicts.loose.iter().all(|b| *b)))),
        ),
        (
            "inst_level_loose_acc",
            MetricValue::List(flags(&verdicts.loose)),
        ),
    ])
}

fn first_argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// A per-document metric: one number, or one per instruction (IFEval's instruction level,
/// averaged over all instructions of all documents).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum MetricValue {
    Scalar(f64),
    List(Vec<f64>),
}

/// One document's request, response and verdicts (`--log-samples`).
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub adapter: String,
    pub task: String,
    pub doc_id: usize,
    pub prompt: String,
    pub target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loglikelihoods: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction_index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub filtered: BTreeMap<String, String>,
    pub metrics: BTreeMap<String, MetricValue>,
}

/// A task's scores for one model.
#[derive(Debug, Clone)]
pub struct TaskOutcome {
    pub task: String,
    pub groups: Vec<String>,
    /// `"<metric>,<filter>"` → (score, standard error when the harness reports one).
    pub metrics: super::results::Scores,
    pub n: usize,
    pub original_len: usize,
    pub truncated: usize,
    pub samples: Vec<Sample>,
}

impl TaskOutcome {
    fn new(
        config: &TaskConfig,
        samples: Vec<Sample>,
        original_len: usize,
        truncated: usize,
    ) -> Self {
        let mut keys: Vec<String> = samples
            .iter()
            .flat_map(|s| s.metrics.keys().cloned())
            .collect();
        keys.sort();
        keys.dedup();
        let mut metrics = BTreeMap::new();
        for key in keys {
            let mut scalars = Vec::new();
            let mut flat = Vec::new();
            let mut is_list = false;
            for s in &samples {
                match s.metrics.get(&key) {
                    Some(MetricValue::Scalar(v)) => scalars.push(*v),
                    Some(MetricValue::List(v)) => {
                        is_list = true;
                        flat.extend_from_slice(v);
                    }
                    None => {}
                }
            }
            let value = if is_list {
                // The harness's agg_inst_level_acc: a mean over instructions, no stderr.
                let n = flat.len().max(1) as f64;
                (flat.iter().sum::<f64>() / n, None)
            } else {
                mean_stderr(&scalars)
            };
            metrics.insert(key, value);
        }
        Self {
            task: config.task.clone(),
            groups: config.groups.clone(),
            metrics,
            n: samples.len(),
            original_len,
            truncated,
            samples,
        }
    }
}
