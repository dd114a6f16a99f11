//! Successive halving over the grid (as Hyperband and ASHA do): every cell trains to the first
//! rung and is evaluated on the held-out metric; the best 1/eta go on to the next rung from
//! their checkpoints, and so on. A cell that stops keeps its adapter and metrics from the rung
//! where it stopped. Rung ends are fractions of the full run (`total / eta^(rungs-1-k)` steps),
//! and the learning-rate schedule and data order are those of the full run, so a cell promoted
//! to the end is byte-identical to the same cell trained by the grid strategy.
//!
//! Progress is kept in `<plan>/rungs.json` (each rung's metric per cell and its promotions), so
//! a stopped halving sweep resumes where it was.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::cell::{train_cell, CellOutcome};
use super::plan::{plan_dir, PlannedCell, SweepPlan};
use super::{collect, LocalSweep, SweepResult};
use crate::eval::higher_is_better;
use crate::fsutil::{atomic_write_json, read_json};
use crate::train::RunOptions;
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

impl LocalSweep<'_> {
    /// Runs the plan's cells by successive halving; returns the table with stopped cells marked
    /// (`stopped at rung k`), or stops early (like a grid sweep) when a cell is interrupted.
    pub(super) fn run_halving(
        &self,
        rungs: usize,
        eta: usize,
        on_cell: &mut dyn FnMut(&PlannedCell, &CellOutcome),
    ) -> Result<SweepResult> {
        let plan = self.plan;
        let ends = rung_ends(plan.total_steps, rungs, eta);
        let path = plan_dir(self.registry, &plan.name).join(RUNGS_FILE);
        let mut state: HalvingState = if path.is_file() {
            read_json(&path)?
        } else {
            HalvingState::default()
        };
        state.rungs.resize_with(ends.len(), RungRecord::default);
        let mut alive: Vec<usize> = plan.cells.iter().map(|c| c.index).collect();
        for (k, &end) in ends.iter().enumerate() {
            state.rungs[k].end_step = end;
            let last = k + 1 == ends.len();
            for &index in &alive {
                if state.rungs[k].scores.contains_key(&index) {
                    continue;
                }
                let opts = RunOptions {
                    end_at: (!last).then_some(end),
                    // Past the first rung the cell's entry holds the previous rung's adapter:
                    // continue its kept checkpoint and replace the entry.
                    resume: k > 0,
                    force: k > 0,
                    ..self.opts.clone()
                };
                let outcome = train_cell(self.base, self.data, plan, self.registry, index, &opts)?;
                on_cell(plan.cell(index)?, &outcome);
                let metrics = match outcome {
                    CellOutcome::Trained { metrics, .. }
                    | CellOutcome::AlreadyDone { metrics, .. } => metrics,
                    CellOutcome::Interrupted { .. } => return self.halving_table(&state),
                };
                let score = metrics.get(&plan.metric).copied().ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "--strategy halving ranks cells by `{}`, which cell {index} did not report (halving needs held-out data: eval_fraction > 0 or eval_data)",
                        plan.metric
                    ))
                })?;
                state.rungs[k].scores.insert(index, score);
                atomic_write_json(&path, &state)?;
            }
            if last {
                break;
            }
            let mut ranked: Vec<(usize, f64)> = alive
                .iter()
                .map(|i| (*i, state.rungs[k].scores[i]))
                .collect();
            let higher = higher_is_better(&plan.metric);
            // Best first; NaN last; ties by index so the choice is reproducible.
            ranked.sort_by(|a, b| {
                let (x, y) = if higher { (b.1, a.1) } else { (a.1, b.1) };
                x.partial_cmp(&y)
                    .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
                    .then(a.0.cmp(&b.0))
            });
            let keep = alive.len().div_ceil(eta).max(1);
            alive = ranked.iter().take(keep).map(|(i, _)| *i).collect();
            alive.sort_unstable();
            state.rungs[k].promoted = alive.clone();
            atomic_write_json(&path, &state)?;
        }
        self.halving_table(&state)
    }

    /// The sweep's table (stopped cells marked by [`collect`]); at the end, the kept
    /// checkpoints of the cells that stopped are removed (their adapters stay).
    fn halving_table(&self, state: &HalvingState) -> Result<SweepResult> {
        let complete = state.rungs.last().is_some_and(|r| {
            let finalists = state.rungs.iter().rev().nth(1).map(|p| p.promoted.len());
            finalists.is_some_and(|n| r.scores.len() == n)
        });
        if complete {
            for cell in &self.plan.cells {
                let run_dir = self.registry.run_dir(&cell.name);
                if run_dir.is_dir() && self.registry.contains(&cell.name) {
                    std::fs::remove_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
                }
            }
        }
        collect(self.registry, self.plan, &self.plan.metric)
    }
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

/// The halving progress of a plan, if it has any.
pub fn halving_state(
    registry: &crate::registry::Registry,
    plan: &SweepPlan,
) -> Option<HalvingState> {
    let path = plan_dir(registry, &plan.name).join(RUNGS_FILE);
    path.is_file().then(|| read_json(&path).ok()).flatten()
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
