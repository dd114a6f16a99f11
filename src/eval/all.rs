//! Several models evaluated one after another on one loaded base (`peft-wit eval`): the bare
//! base and each adapter, on an evaluation data set, benchmark tasks, or both.

use std::time::Instant;

use super::compare::{evaluate_adapter, AdapterResult, EvalData, EvalSpec};
use crate::export::with_adapter;
use crate::lora::LoraAdapter;
use crate::model::BaseModel;
use crate::registry::{load_for_base, Registry};
use crate::tasks::{Suite, SuiteResult};
use crate::{Error, Result};

/// What to evaluate, and on what.
pub struct EvalRun<'a> {
    /// Resolves the adapter names.
    pub registry: &'a Registry,
    /// Evaluate the base without adapter first (reported as `base`).
    pub include_base: bool,
    /// Registry names or PEFT adapter directories, in report order.
    pub adapters: &'a [String],
    /// Loss and generation metrics on a data set (None: benchmarks only).
    pub data: Option<(&'a EvalSpec, &'a EvalData)>,
    /// Benchmark tasks, scored under the same weights as the data metrics.
    pub suite: Option<&'a Suite>,
    /// Apply adapters as a low-rank side path instead of merging them into a dense base.
    pub side_path: bool,
    /// Accept adapters whose sidecar names another base fingerprint.
    pub allow_other_base: bool,
}

/// Every model's results, in the order evaluated.
pub struct EvalResults {
    /// Data metrics, with the benchmark scores added as columns.
    pub adapters: Vec<AdapterResult>,
    /// Per-task benchmark results (empty without a suite).
    pub suites: Vec<SuiteResult>,
}

/// Evaluates the base (if asked) and then each adapter in turn on `base`. Each adapter is
/// loaded only when its turn comes, merged into the dense base for its evaluation (exact, and
/// as fast as the base) and taken out again bit-exactly, or applied as a side path on a
/// quantized base or when `run.side_path` asks for it. `on_start` hears each model's name
/// (`base` for the base) just before its evaluation starts.
pub fn evaluate_all(
    base: &mut BaseModel,
    run: &EvalRun<'_>,
    mut on_start: impl FnMut(&str),
) -> Result<EvalResults> {
    let mut results = EvalResults {
        adapters: Vec::new(),
        suites: Vec::new(),
    };
    let mut push = |(r, s): (AdapterResult, Option<SuiteResult>)| {
        results.adapters.push(r);
        results.suites.extend(s);
    };
    if run.include_base {
        on_start("base");
        push(evaluate_one(base, "base", None, run)?);
    }
    for name in run.adapters {
        let dir = run.registry.resolve(name)?;
        let adapter =
            load_for_base(&dir, base, run.allow_other_base).map_err(|e| Error::LoadAdapter {
                path: dir.clone(),
                source: Box::new(e),
            })?;
        on_start(name);
        push(with_adapter(base, &adapter, run.side_path, |b, a| {
            evaluate_one(b, name, a, run)
        })?);
    }
    Ok(results)
}

/// One model: the data metrics and the benchmark scores under the same weights (the scores
/// also become columns of the data metrics).
fn evaluate_one(
    base: &BaseModel,
    name: &str,
    adapter: Option<&LoraAdapter>,
    run: &EvalRun<'_>,
) -> Result<(AdapterResult, Option<SuiteResult>)> {
    let started = Instant::now();
    let mut result = match run.data {
        Some((spec, eval_data)) => evaluate_adapter(base, name, adapter, eval_data, spec)?,
        None => AdapterResult {
            name: name.to_string(),
            metrics: Default::default(),
            per_template: Default::default(),
            generations: Vec::new(),
            seconds: 0.0,
        },
    };
    let scores = match run.suite {
        Some(suite) => {
            let scores = suite.evaluate(base, adapter, name)?;
            for (label, score, _) in scores.columns() {
                result.metrics.insert(label, score);
            }
            Some(scores)
        }
        None => None,
    };
    result.seconds = started.elapsed().as_secs_f64();
    Ok((result, scores))
}
