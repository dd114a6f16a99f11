//! One cell of a planned sweep: claimed with an exclusively created lock file (so the same index
//! submitted twice, on any hosts, trains once), trained from its checkpoint when it has one,
//! evaluated on the held-out data, and committed to the registry. Each transition is recorded in
//! `<plan>/cells/<index>.json` for `sweep status`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::plan::{plan_dir, SweepPlan};
use crate::fsutil::{atomic_write_json, hostname, read_json, LockFile};
use crate::model::BaseModel;
use crate::registry::{AdapterMeta, Registry};
use crate::train::{train, PreparedData, RunOptions, TrainOutcome};
use crate::{Error, Result};

/// The last thing a cell's runner recorded.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RecordedState {
    Running,
    Interrupted,
    Failed,
    Done,
}

/// `<plan>/cells/<index>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CellRecord {
    pub state: RecordedState,
    pub host: String,
    pub pid: u32,
    /// The step it stopped at (interrupted) or reached (done).
    #[serde(default)]
    pub step: Option<usize>,
    /// The error of a failed run.
    #[serde(default)]
    pub message: Option<String>,
    pub updated_unix: u64,
}

/// How a cell's run ended.
#[derive(Debug)]
pub enum CellOutcome {
    /// The adapter was already in the registry: nothing to do.
    AlreadyDone {
        name: String,
        metrics: BTreeMap<String, f64>,
    },
    Trained {
        name: String,
        metrics: BTreeMap<String, f64>,
        /// Tokens this run trained on (a resumed cell counts only what it added).
        tokens_trained: u64,
    },
    /// Stopped on request (Ctrl-C, SIGTERM from the scheduler) after a checkpoint.
    Interrupted { name: String, step: usize },
}

pub fn record_path(registry: &Registry, plan: &SweepPlan, index: usize) -> PathBuf {
    plan_dir(registry, &plan.name)
        .join("cells")
        .join(format!("{index}.json"))
}

pub fn lock_path(registry: &Registry, plan: &SweepPlan, index: usize) -> PathBuf {
    plan_dir(registry, &plan.name)
        .join("locks")
        .join(format!("cell-{index}.lock"))
}

/// The per-cell log file a scheduler writes (`%a` / the index in its name).
pub fn log_path(registry: &Registry, plan: &SweepPlan, index: usize) -> PathBuf {
    plan_dir(registry, &plan.name)
        .join("logs")
        .join(format!("cell-{index}.log"))
}

pub fn read_record(registry: &Registry, plan: &SweepPlan, index: usize) -> Option<CellRecord> {
    let path = record_path(registry, plan, index);
    path.is_file().then(|| read_json(&path).ok()).flatten()
}

fn write_record(
    registry: &Registry,
    plan: &SweepPlan,
    index: usize,
    state: RecordedState,
    step: Option<usize>,
    message: Option<String>,
) -> Result<()> {
    atomic_write_json(
        &record_path(registry, plan, index),
        &CellRecord {
            state,
            host: hostname(),
            pid: std::process::id(),
            step,
            message,
            updated_unix: crate::fsutil::lock::unix_now(),
        },
    )
}

/// The right to run a cell, or the news that it is done.
enum Claim {
    Done(BTreeMap<String, f64>),
    Mine(LockFile),
}

fn claim(registry: &Registry, plan: &SweepPlan, index: usize, force: bool) -> Result<Claim> {
    let cell = plan.cell(index)?;
    let done = || -> Result<Option<BTreeMap<String, f64>>> {
        if registry.contains(&cell.name) && !force {
            return Ok(Some(AdapterMeta::read(&registry.path(&cell.name))?.metrics));
        }
        Ok(None)
    };
    if let Some(metrics) = done()? {
        return Ok(Claim::Done(metrics));
    }
    let path = lock_path(registry, plan, index);
    let purpose = format!(
        "running cell {index} (`{}`) of sweep `{}`",
        cell.name, plan.name
    );
    let lock = match LockFile::try_acquire(&path, &purpose)? {
        Ok(lock) => lock,
        Err(owner) => {
            return Err(Error::Locked {
                path,
                owner: format!(
                    "{owner}: cell {index} (`{}`) is already running; this run stops without touching it",
                    cell.name
                ),
            })
        }
    };
    // It may have finished between the first look and the lock.
    if let Some(metrics) = done()? {
        return Ok(Claim::Done(metrics));
    }
    Ok(Claim::Mine(lock))
}

/// Trains cell `index` on an already loaded base and data (the local launcher's loop).
pub fn train_cell(
    base: &BaseModel,
    data: &PreparedData,
    plan: &SweepPlan,
    registry: &Registry,
    index: usize,
    opts: &RunOptions,
) -> Result<CellOutcome> {
    match claim(registry, plan, index, opts.force)? {
        Claim::Done(metrics) => Ok(CellOutcome::AlreadyDone {
            name: plan.cell(index)?.name.clone(),
            metrics,
        }),
        Claim::Mine(lock) => {
            let cell = CellRef {
                registry,
                plan,
                index,
            };
            train_claimed(base, data, cell, opts, lock)
        }
    }
}

/// `peft-wit sweep run-cell`: reads the plan, claims the cell, loads the base (mmapped) and the
/// plan's tokenized data, checks both against the plan's fingerprints, and trains the cell.
pub fn run_cell(
    registry: &Registry,
    sweep: &str,
    index: usize,
    opts: &RunOptions,
    on_loaded: impl FnOnce(&BaseModel, &PreparedData),
) -> Result<CellOutcome> {
    let plan = SweepPlan::load(registry, sweep)?;
    let lock = match claim(registry, &plan, index, opts.force)? {
        Claim::Done(metrics) => {
            return Ok(CellOutcome::AlreadyDone {
                name: plan.cell(index)?.name.clone(),
                metrics,
            })
        }
        Claim::Mine(lock) => lock,
    };
    let (base, data) = load_for_plan(registry, &plan)?;
    on_loaded(&base, &data);
    let cell = CellRef {
        registry,
        plan: &plan,
        index,
    };
    train_claimed(&base, &data, cell, opts, lock)
}

/// The plan's base (mmapped) and tokenized data, checked against the plan's fingerprints.
pub fn load_for_plan(registry: &Registry, plan: &SweepPlan) -> Result<(BaseModel, PreparedData)> {
    let cfg = &plan.train_config;
    let location = crate::model::resolve::resolve_model(cfg.model.as_deref())?;
    let device = cfg.device.open()?;
    let base = BaseModel::load(&location, cfg.base_dtype, &device)?;
    plan.check_base(&base)?;
    let data = plan.load_data(registry, &base)?;
    Ok((base, data))
}

/// A cell of a plan in a registry.
struct CellRef<'a> {
    registry: &'a Registry,
    plan: &'a SweepPlan,
    index: usize,
}

/// Trains a cell whose lock this process holds (`_lock`, released when the run ends).
fn train_claimed(
    base: &BaseModel,
    data: &PreparedData,
    cell: CellRef<'_>,
    opts: &RunOptions,
    _lock: LockFile,
) -> Result<CellOutcome> {
    let CellRef {
        registry,
        plan,
        index,
    } = cell;
    let cfg = plan.cell_config(index)?;
    let name = plan.cell(index)?.name.clone();
    if data.fingerprint != plan.data_fingerprint {
        return Err(Error::InvalidArgument(format!(
            "sweep `{}`: the data given does not match the plan's data fingerprint",
            plan.name
        )));
    }
    write_record(registry, plan, index, RecordedState::Running, None, None)?;
    // A cell stopped mid-way (preempted, cancelled, Ctrl-C) continues from its checkpoint, as
    // does a cell successive halving takes on to its next rung (`force` replaces its entry,
    // `resume` keeps its checkpoint).
    let has_checkpoint = crate::train::checkpoint::latest(&registry.run_dir(&name))?.is_some();
    let resume = has_checkpoint && (opts.resume || !opts.force);
    let mut tracking_tags = opts.tracking_tags.clone();
    tracking_tags.extend([
        ("peft_wit.sweep".to_string(), plan.name.clone()),
        ("peft_wit.cell".to_string(), index.to_string()),
    ]);
    // A cell trained from step 0 takes its step-0 evaluation from the plan's shared one.
    let initial_eval = match &opts.initial_eval {
        Some(given) => Some(given.clone()),
        None if !resume => super::step0::shared_step0(registry, plan, base, data)?,
        None => None,
    };
    let cell_opts = RunOptions {
        resume,
        tracking_tags,
        initial_eval,
        default_experiment: opts
            .default_experiment
            .clone()
            .or_else(|| Some(plan.name.clone())),
        ..opts.clone()
    };
    match train(base, data, &cfg, registry, &cell_opts) {
        Ok(TrainOutcome::Finished {
            meta,
            tokens_trained,
            ..
        }) => {
            write_record(
                registry,
                plan,
                index,
                RecordedState::Done,
                Some(meta.steps),
                None,
            )?;
            Ok(CellOutcome::Trained {
                name,
                metrics: meta.metrics.clone(),
                tokens_trained,
            })
        }
        Ok(TrainOutcome::Interrupted { step, .. }) => {
            write_record(
                registry,
                plan,
                index,
                RecordedState::Interrupted,
                Some(step),
                None,
            )?;
            Ok(CellOutcome::Interrupted { name, step })
        }
        Err(e) => {
            let _ = write_record(
                registry,
                plan,
                index,
                RecordedState::Failed,
                None,
                Some(e.to_string()),
            );
            Err(e)
        }
    }
}
