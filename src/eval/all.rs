//! Several models evaluated on one loaded base (`peft-wit eval`), one after another or side by
//! side: the bare base and each adapter, on an evaluation data set, benchmark tasks, or both.

use std::time::Instant;

use indicatif::MultiProgress;

use super::compare::{evaluate_adapter, AdapterResult, EvalData, EvalSpec};
use crate::export::with_adapter;
use crate::lanes::{Lanes, Next};
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
    /// Models evaluated at once, each on its share of the threads ([`Lanes`]), adapters then
    /// applied as side paths on the one shared base; 1 evaluates them one after another.
    pub lanes: usize,
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
/// quantized base or when `run.side_path` asks for it. With `run.lanes` > 1, that many models
/// are evaluated at once, adapters as side paths. `on_start` hears each model's name (`base`
/// for the base) just before its evaluation starts. Results come in the order asked.
pub fn evaluate_all(
    base: &mut BaseModel,
    run: &EvalRun<'_>,
    on_start: impl Fn(&str) + Sync,
) -> Result<EvalResults> {
    let mut slots: Vec<Option<(AdapterResult, Option<SuiteResult>)>> = Vec::new();
    evaluate_each(base, run, on_start, |i, result, scores| {
        slots.resize_with(slots.len().max(i + 1), || None);
        slots[i] = Some((result, scores));
        Ok(())
    })?;
    let mut results = EvalResults {
        adapters: Vec::new(),
        suites: Vec::new(),
    };
    // `evaluate_each` returned Ok: every model was handed back.
    for (result, scores) in slots.into_iter().flatten() {
        results.adapters.push(result);
        results.suites.extend(scores);
    }
    Ok(results)
}

/// [`evaluate_all`], handing each model's results to `on_done` as soon as they are final, with
/// the model's position (the base first, if asked, then the adapters in order): one after
/// another, or in the order they finish with `run.lanes` > 1. A sweep stores each cell's
/// scores there, so a failure later on loses none.
pub fn evaluate_each(
    base: &mut BaseModel,
    run: &EvalRun<'_>,
    on_start: impl Fn(&str) + Sync,
    mut on_done: impl FnMut(usize, AdapterResult, Option<SuiteResult>) -> Result<()>,
) -> Result<()> {
    let names: Vec<Option<&String>> = run
        .include_base
        .then_some(None)
        .into_iter()
        .chain(run.adapters.iter().map(Some))
        .collect();
    if run.lanes > 1 && names.len() > 1 {
        // Side by side on the shared base: adapters as side paths, each loaded by its lane
        // when its turn comes, the progress bars one below the other.
        let base: &BaseModel = base;
        let bars = MultiProgress::new();
        return Lanes::new(run.lanes)?.run(
            &names,
            |_, name| match name {
                None => {
                    bars.suspend(|| on_start("base"));
                    evaluate_one(base, "base", None, run, Some(&bars))
                }
                Some(name) => {
                    let adapter = load_adapter(base, run, name)?;
                    bars.suspend(|| on_start(name));
                    evaluate_one(base, name, Some(&adapter), run, Some(&bars))
                }
            },
            |i, (result, scores)| {
                on_done(i, result, scores)?;
                Ok(Next::Continue)
            },
        );
    }
    for (i, name) in names.into_iter().enumerate() {
        let (result, scores) = match name {
            None => {
                on_start("base");
                evaluate_one(base, "base", None, run, None)?
            }
            Some(name) => {
                let adapter = load_adapter(base, run, name)?;
                on_start(name);
                with_adapter(base, &adapter, run.side_path, |b, a| {
                    evaluate_one(b, name, a, run, None)
                })?
            }
        };
        on_done(i, result, scores)?;
    }
    Ok(())
}

/// Resolves and loads the adapter `name` for `base`.
fn load_adapter(base: &BaseModel, run: &EvalRun<'_>, name: &str) -> Result<LoraAdapter> {
    let dir = run.registry.resolve(name)?;
    load_for_base(&dir, base, run.allow_other_base).map_err(|e| Error::LoadAdapter {
        path: dir.clone(),
        source: Box::new(e),
    })
}

/// One model: the data metrics and the benchmark scores under the same weights (the scores
/// also become columns of the data metrics).
fn evaluate_one(
    base: &BaseModel,
    name: &str,
    adapter: Option<&LoraAdapter>,
    run: &EvalRun<'_>,
    bars: Option<&MultiProgress>,
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
            let scores = suite.evaluate_with(base, adapter, name, bars)?;
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
