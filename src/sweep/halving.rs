//! Successive halving over the grid (as Hyperband and ASHA do): every cell trains to the first
//! rung and is evaluated on the held-out metric; the best 1/eta go on to the next rung from
//! their checkpoints, and so on. A cell that stops keeps its adapter and metrics from the rung
//! where it stopped. Rung ends are fractions of the full run (`total / eta^(rungs-1-k)` steps),
//! and the learning-rate schedule and data order are those of the full run, so a cell promoted
//! to the end is byte-identical to the same cell trained by the grid strategy.
//!
//! Progress is kept in `<plan>/rungs.json` (each rung's metric per cell and its promotions), so
//! a stopped halving sweep resumes where it was. On a cluster the rungs are waves: wave `k` has
//! one task per slot (its size is known up front: `n`, `ceil(n/eta)`, ...), each task resolving
//! its slot to a cell from the previous rung's promotions when it starts ([`assign_slot`]), so
//! every wave is submitted at once, each after the one before.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::cell::{train_cell, CellOutcome};
use super::plan::{plan_dir, PlannedCell, SweepPlan};
use super::{collect, LocalSweep, SweepResult};
use crate::eval::higher_is_better;
use crate::fsutil::{atomic_write_json, read_json, LockFile};
use crate::lanes::Next;
use crate::model::BaseModel;
use crate::registry::{AdapterMeta, Registry};
use crate::train::{PreparedData, RunOptions};
use crate::{Error, Result};

const RUNGS_FILE: &str = "rungs.json";

/// How a sweep spends its training budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "strategy", rename_all = "lowercase")]
pub enum Strategy {
    /// Every cell trained to the end.
    #[default]
    Grid,
    /// Successive halving with `rungs` rungs, keeping the best 1/`eta` at each.
    Halving { rungs: usize, eta: usize },
}

impl Strategy {
    pub fn validate(&self) -> Result<()> {
        if let Strategy::Halving { rungs, eta } = *self {
            if rungs < 2 || eta < 2 {
                return Err(Error::InvalidArgument(format!(
                    "--strategy halving needs --rungs >= 2 and --eta >= 2 (got {rungs} and {eta})"
                )));
            }
        }
        Ok(())
    }
}

/// The optimizer step each rung ends at (strictly increasing, the last one `total`).
pub fn rung_ends(total: usize, rungs: usize, eta: usize) -> Vec<usize> {
    let mut ends: Vec<usize> = (0..rungs)
        .map(|k| {
            let divisor = (eta as f64).powi((rungs - 1 - k) as i32);
            ((total as f64 / divisor).ceil() as usize).clamp(1, total)
        })
        .collect();
    ends.dedup();
    ends
}

/// One rung's outcome.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RungRecord {
    pub end_step: usize,
    /// Cell index → the metric at this rung.
    pub scores: BTreeMap<usize, f64>,
    /// Cells going on to the next rung (empty until the rung is complete).
    pub promoted: Vec<usize>,
}

/// `<plan>/rungs.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HalvingState {
    pub rungs: Vec<RungRecord>,
}

impl HalvingState {
    /// The cells that train in rung `k` (0-based): every cell in the first rung, the previous
    /// rung's promotions after it; `None` while the previous rung is not complete.
    pub fn entrants(&self, k: usize, plan: &SweepPlan) -> Option<Vec<usize>> {
        if k == 0 {
            return Some(plan.cells.iter().map(|c| c.index).collect());
        }
        let previous = self.rungs.get(k - 1)?;
        (!previous.promoted.is_empty()).then(|| previous.promoted.clone())
    }

    /// Whether every entrant of rung `k` has its score.
    pub fn is_complete(&self, k: usize, plan: &SweepPlan) -> bool {
        let scores = self.rungs.get(k).map(|r| &r.scores);
        match (self.entrants(k, plan), scores) {
            (Some(entrants), Some(scores)) => entrants.iter().all(|i| scores.contains_key(i)),
            _ => false,
        }
    }
}

/// A halving plan's rungs: where each ends and how many cells each keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Ladder {
    /// The optimizer step each rung ends at.
    pub ends: Vec<usize>,
    pub eta: usize,
    /// How many cells train in each rung: all of them, then `ceil(n / eta)` of the previous
    /// rung's `n`, ... (known before any score, so every wave can be submitted at once).
    pub sizes: Vec<usize>,
}

impl Ladder {
    /// The plan's ladder, or `None` for a grid plan.
    pub fn of(plan: &SweepPlan) -> Option<Ladder> {
        let Strategy::Halving { rungs, eta } = plan.strategy else {
            return None;
        };
        let ends = rung_ends(plan.total_steps, rungs, eta);
        let mut sizes = vec![plan.cells.len()];
        while sizes.len() < ends.len() {
            let previous = sizes[sizes.len() - 1];
            sizes.push(keep_count(previous, eta));
        }
        Some(Ladder { ends, eta, sizes })
    }

    pub fn is_last(&self, k: usize) -> bool {
        k + 1 == self.ends.len()
    }
}

/// How many of `n` cells go on: the best `ceil(n / eta)`, at least one.
fn keep_count(n: usize, eta: usize) -> usize {
    n.div_ceil(eta).max(1)
}

/// The entrants that go on from a complete rung: best first by `scores` (NaN last, ties by
/// index so the choice is reproducible), returned in index order.
fn promotions(
    entrants: &[usize],
    scores: &BTreeMap<usize, f64>,
    eta: usize,
    higher: bool,
) -> Vec<usize> {
    let mut ranked: Vec<(usize, f64)> = entrants.iter().map(|i| (*i, scores[i])).collect();
    ranked.sort_by(|a, b| {
        let (x, y) = if higher { (b.1, a.1) } else { (a.1, b.1) };
        x.partial_cmp(&y)
            .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
            .then(a.0.cmp(&b.0))
    });
    let mut kept: Vec<usize> = ranked
        .iter()
        .take(keep_count(entrants.len(), eta))
        .map(|(i, _)| *i)
        .collect();
    kept.sort_unstable();
    kept
}

fn state_path(registry: &Registry, plan: &SweepPlan) -> PathBuf {
    plan_dir(registry, &plan.name).join(RUNGS_FILE)
}

/// The plan's halving progress (empty before the first score), one record per rung.
pub fn load_state(registry: &Registry, plan: &SweepPlan, ladder: &Ladder) -> Result<HalvingState> {
    let path = state_path(registry, plan);
    let mut state: HalvingState = if path.is_file() {
        read_json(&path)?
    } else {
        HalvingState::default()
    };
    state
        .rungs
        .resize_with(ladder.ends.len(), RungRecord::default);
    for (record, &end) in state.rungs.iter_mut().zip(&ladder.ends) {
        record.end_step = end;
    }
    Ok(state)
}

/// Records cell `index`'s score at rung `k`, and the rung's promotions once its last entrant
/// is scored. A read-modify-write under the plan's rungs lock, so cells of one wave finishing
/// at once on many hosts all land.
pub fn record_score(
    registry: &Registry,
    plan: &SweepPlan,
    ladder: &Ladder,
    k: usize,
    index: usize,
    score: f64,
) -> Result<HalvingState> {
    let lock_path = plan_dir(registry, &plan.name)
        .join("locks")
        .join("rungs.lock");
    let purpose = format!("recording rung {} of sweep `{}`", k + 1, plan.name);
    let _lock = LockFile::acquire(&lock_path, &purpose, Duration::from_secs(120))?;
    let mut state = load_state(registry, plan, ladder)?;
    state.rungs[k].scores.insert(index, score);
    if !ladder.is_last(k) && state.rungs[k].promoted.is_empty() && state.is_complete(k, plan) {
        let entrants = state.entrants(k, plan).unwrap_or_default();
        state.rungs[k].promoted = promotions(
            &entrants,
            &state.rungs[k].scores,
            ladder.eta,
            higher_is_better(&plan.metric),
        );
    }
    atomic_write_json(&state_path(registry, plan), &state)?;
    Ok(state)
}

/// What running cell `index` at rung `k` came to.
pub enum RungOutcome {
    /// Trained (or found trained) to the rung's end and scored.
    Scored { outcome: CellOutcome, score: f64 },
    /// Stopped on request; the cell's checkpoint continues it.
    Interrupted(CellOutcome),
}

/// Trains cell `index` through rung `k` (from its checkpoint past the first rung), scores it
/// on the plan's metric and records the score: the one step the local driver and the cluster's
/// wave tasks share.
pub fn train_rung(
    base: &BaseModel,
    data: &PreparedData,
    plan: &SweepPlan,
    registry: &Registry,
    ladder: &Ladder,
    (k, index): (usize, usize),
    opts: &RunOptions,
) -> Result<RungOutcome> {
    let end = ladder.ends[k];
    let name = &plan.cell(index)?.name;
    // Trained to this rung's end already (a task that died between the commit and the
    // score, or a rerun): its entry holds the metrics.
    let done = registry
        .contains(name)
        .then(|| AdapterMeta::read(&registry.path(name)).ok())
        .flatten()
        .filter(|m| m.steps >= end);
    let outcome = if let Some(meta) = done {
        CellOutcome::AlreadyDone {
            name: name.clone(),
            metrics: meta.metrics,
        }
    } else {
        let opts = RunOptions {
            end_at: (!ladder.is_last(k)).then_some(end),
            // Past the first rung the cell's entry holds the previous rung's adapter: continue
            // its kept checkpoint and replace the entry.
            resume: k > 0,
            force: k > 0,
            ..opts.clone()
        };
        train_cell(base, data, plan, registry, index, &opts)?
    };
    let metrics = match &outcome {
        CellOutcome::Trained { metrics, .. } | CellOutcome::AlreadyDone { metrics, .. } => metrics,
        CellOutcome::Interrupted { .. } => return Ok(RungOutcome::Interrupted(outcome)),
    };
    let score = metrics.get(&plan.metric).copied().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "--strategy halving ranks cells by `{}`, which cell {index} did not report (halving needs held-out data: eval_fraction > 0 or eval_data)",
            plan.metric
        ))
    })?;
    record_score(registry, plan, ladder, k, index, score)?;
    Ok(RungOutcome::Scored { outcome, score })
}

/// Where a cluster task of a halving sweep stands: the cell it runs at a rung, or why it has
/// nothing to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Assignment {
    Run {
        rung: usize,
        index: usize,
    },
    /// The cell went as far as halving takes it (the end, or the rung that stopped it).
    Finished {
        index: usize,
        rung: usize,
    },
}

/// The cell that slot `slot` of rung `k`'s wave runs: the slot-th entrant (in index order).
/// Fails, saying which cells are missing, while the previous rung is incomplete.
pub fn assign_slot(
    registry: &Registry,
    plan: &SweepPlan,
    ladder: &Ladder,
    k: usize,
    slot: usize,
) -> Result<usize> {
    if k >= ladder.ends.len() {
        return Err(Error::InvalidArgument(format!(
            "sweep `{}` has {} rungs; --rung {} does not exist",
            plan.name,
            ladder.ends.len(),
            k + 1
        )));
    }
    let state = load_state(registry, plan, ladder)?;
    let Some(entrants) = state.entrants(k, plan) else {
        return Err(incomplete(plan, &state, k - 1));
    };
    entrants.get(slot).copied().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "rung {} of sweep `{}` trains {} cells; slot {slot} has none",
            k + 1,
            plan.name,
            entrants.len()
        ))
    })
}

/// The next rung cell `index` trains in, or where it finished.
pub fn next_rung_of(
    registry: &Registry,
    plan: &SweepPlan,
    ladder: &Ladder,
    index: usize,
) -> Result<Assignment> {
    plan.cell(index)?;
    let state = load_state(registry, plan, ladder)?;
    for k in 0..ladder.ends.len() {
        let Some(entrants) = state.entrants(k, plan) else {
            return Err(incomplete(plan, &state, k - 1));
        };
        if !entrants.contains(&index) {
            return Ok(Assignment::Finished { index, rung: k });
        }
        if !state.rungs[k].scores.contains_key(&index) {
            return Ok(Assignment::Run { rung: k, index });
        }
    }
    Ok(Assignment::Finished {
        index,
        rung: ladder.ends.len(),
    })
}

/// The error of a wave started before the rung it follows is complete.
fn incomplete(plan: &SweepPlan, state: &HalvingState, k: usize) -> Error {
    let missing: Vec<String> = state
        .entrants(k, plan)
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !state.rungs[k].scores.contains_key(i))
        .map(|i| i.to_string())
        .collect();
    Error::InvalidArgument(format!(
        "rung {} of sweep `{}` is not complete (cells without a score: {}); see `peft-wit sweep status {}`, and run the sweep command again to resubmit them",
        k + 1,
        plan.name,
        if missing.is_empty() {
            "those of an earlier rung".to_string()
        } else {
            missing.join(", ")
        },
        plan.name
    ))
}

/// Which cell a `run-cell` task of a halving sweep runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskTarget {
    /// Cell `index`, at the next rung it has earned.
    Cell(usize),
    /// Slot `slot` of rung `rung`'s wave (0-based both).
    Slot { rung: usize, slot: usize },
}

/// What a halving sweep's cluster task came to.
pub enum TaskOutcome {
    /// The cell trained (or was found trained) through `rung` and was scored.
    Scored {
        index: usize,
        rung: usize,
        outcome: CellOutcome,
        score: f64,
    },
    Interrupted {
        index: usize,
        rung: usize,
        outcome: CellOutcome,
    },
    /// Nothing to run: the cell went as far as halving takes it.
    Finished { index: usize, rung: usize },
}

/// `peft-wit sweep run-cell` on a halving plan: resolves the task to a cell and rung, loads the
/// plan's base and data, trains and scores the cell through that rung, and when that was the
/// sweep's last score, removes the checkpoints halving kept.
pub fn run_task(
    registry: &Registry,
    plan: &SweepPlan,
    target: TaskTarget,
    opts: &RunOptions,
    on_loaded: impl FnOnce(usize, usize, &BaseModel, &PreparedData),
) -> Result<TaskOutcome> {
    let ladder = Ladder::of(plan).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "sweep `{}` is a grid sweep: its cells run with --index",
            plan.name
        ))
    })?;
    let (rung, index) = match target {
        TaskTarget::Slot { rung, slot } => {
            (rung, assign_slot(registry, plan, &ladder, rung, slot)?)
        }
        TaskTarget::Cell(index) => match next_rung_of(registry, plan, &ladder, index)? {
            Assignment::Run { rung, index } => (rung, index),
            Assignment::Finished { index, rung } => {
                return Ok(TaskOutcome::Finished { index, rung })
            }
        },
    };
    let state = load_state(registry, plan, &ladder)?;
    if state.rungs[rung].scores.contains_key(&index) {
        return Ok(TaskOutcome::Finished { index, rung });
    }
    let (base, data) = super::cell::load_for_plan(registry, plan)?;
    on_loaded(index, rung, &base, &data);
    match train_rung(&base, &data, plan, registry, &ladder, (rung, index), opts)? {
        RungOutcome::Scored { outcome, score } => {
            let state = load_state(registry, plan, &ladder)?;
            remove_kept_checkpoints(registry, plan, &ladder, &state)?;
            Ok(TaskOutcome::Scored {
                index,
                rung,
                outcome,
                score,
            })
        }
        RungOutcome::Interrupted(outcome) => Ok(TaskOutcome::Interrupted {
            index,
            rung,
            outcome,
        }),
    }
}

impl LocalSweep<'_> {
    /// Runs the plan's cells by successive halving; returns the table with stopped cells marked
    /// (`stopped at rung k`), or stops early (like a grid sweep) when a cell is interrupted.
    pub(super) fn run_halving(
        &self,
        ladder: &Ladder,
        on_cell: &mut dyn FnMut(&PlannedCell, &CellOutcome),
    ) -> Result<SweepResult> {
        let plan = self.plan;
        let opts = self.lane_opts();
        for k in 0..ladder.ends.len() {
            let state = load_state(self.registry, plan, ladder)?;
            let Some(entrants) = state.entrants(k, plan) else {
                return Err(incomplete(plan, &state, k - 1));
            };
            let todo: Vec<usize> = entrants
                .into_iter()
                .filter(|index| !state.rungs[k].scores.contains_key(index))
                .collect();
            let mut interrupted = false;
            self.run_cells(
                &todo,
                |index| {
                    train_rung(
                        self.base,
                        self.data,
                        plan,
                        self.registry,
                        ladder,
                        (k, index),
                        &opts,
                    )
                },
                |index, outcome| {
                    Ok(match outcome {
                        RungOutcome::Scored { outcome, .. } => {
                            on_cell(plan.cell(index)?, &outcome);
                            Next::Continue
                        }
                        RungOutcome::Interrupted(outcome) => {
                            on_cell(plan.cell(index)?, &outcome);
                            interrupted = true;
                            Next::Stop
                        }
                    })
                },
            )?;
            if interrupted {
                return collect(self.registry, plan, &plan.metric);
            }
        }
        finish_halving(self.registry, plan, ladder)
    }
}

/// The sweep's table (stopped cells marked by [`collect`]), after removing the checkpoints
/// halving kept once the last rung is complete.
pub fn finish_halving(
    registry: &Registry,
    plan: &SweepPlan,
    ladder: &Ladder,
) -> Result<SweepResult> {
    let state = load_state(registry, plan, ladder)?;
    remove_kept_checkpoints(registry, plan, ladder, &state)?;
    collect(registry, plan, &plan.metric)
}

/// One line per rung of a halving plan: where it ends, how many of its cells are scored, and
/// how many went on (empty for a grid plan).
pub fn rung_summary(registry: &Registry, plan: &SweepPlan) -> Result<Vec<String>> {
    let Some(ladder) = Ladder::of(plan) else {
        return Ok(Vec::new());
    };
    let state = load_state(registry, plan, &ladder)?;
    Ok((0..ladder.ends.len())
        .map(|k| {
            let head = format!(
                "rung {} of {} (to step {} of {}, {} cells)",
                k + 1,
                ladder.ends.len(),
                ladder.ends[k],
                plan.total_steps,
                ladder.sizes[k]
            );
            let record = &state.rungs[k];
            let tail = match state.entrants(k, plan) {
                None => format!("waits for rung {}", k),
                Some(_) if !state.is_complete(k, plan) => {
                    format!("{} scored", record.scores.len())
                }
                Some(_) if ladder.is_last(k) => "complete".to_string(),
                Some(_) => format!("complete, {} went on", record.promoted.len()),
            };
            format!("{head}: {tail}")
        })
        .collect())
}

/// Marks the cells of `result` that successive halving stopped at an earlier rung.
pub fn mark_stopped(result: &mut SweepResult, plan: &SweepPlan, state: &HalvingState) {
    let total_rungs = state.rungs.len();
    for cell in &mut result.cells {
        let Some(planned) = plan.cells.iter().find(|c| c.name == cell.name) else {
            continue;
        };
        // The complete rung that scored the cell and did not promote it.
        let stopped = state.rungs.iter().enumerate().find(|(k, r)| {
            *k + 1 < total_rungs
                && r.scores.contains_key(&planned.index)
                && !r.promoted.is_empty()
                && !r.promoted.contains(&planned.index)
        });
        if let Some((k, rung)) = stopped {
            cell.stopped_at_rung = Some(k + 1);
            cell.status = format!(
                "stopped at rung {} of {total_rungs} (step {} of {})",
                k + 1,
                rung.end_step,
                plan.total_steps
            );
        }
    }
}

/// Once the last rung is complete, removes the kept checkpoints of every cell (their adapters
/// stay); before that, nothing.
fn remove_kept_checkpoints(
    registry: &Registry,
    plan: &SweepPlan,
    ladder: &Ladder,
    state: &HalvingState,
) -> Result<()> {
    if !state.is_complete(ladder.ends.len() - 1, plan) {
        return Ok(());
    }
    for cell in &plan.cells {
        let run_dir = registry.run_dir(&cell.name);
        if run_dir.is_dir() && registry.contains(&cell.name) {
            std::fs::remove_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
        }
    }
    Ok(())
}

/// The halving progress of a halving plan (`None` for a grid plan or an unreadable file).
pub fn halving_state(registry: &Registry, plan: &SweepPlan) -> Option<HalvingState> {
    let ladder = Ladder::of(plan)?;
    load_state(registry, plan, &ladder).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rungs_end_at_fractions_of_the_full_run() {
        assert_eq!(rung_ends(200, 3, 3), vec![23, 67, 200]);
        assert_eq!(rung_ends(9, 3, 3), vec![1, 3, 9]);
        assert_eq!(rung_ends(2, 3, 3), vec![1, 2]);
        assert!(Strategy::Halving { rungs: 1, eta: 3 }.validate().is_err());
        assert!(Strategy::Halving { rungs: 3, eta: 3 }.validate().is_ok());
    }
}
