//! Where each cell of a planned sweep stands, read from the registry alone (so it works from any
//! host that sees it): done (in the registry), running (its lock is alive; the step from its
//! checkpoint or metrics log), interrupted (a checkpoint to resume from), failed (the error and
//! the tail of its log), or pending.

use std::collections::BTreeMap;

use super::cell::{lock_path, log_path, read_record, RecordedState};
use super::plan::{PlannedCell, SweepPlan};
use super::{SweepCell, SweepResult};
use crate::fsutil::lock::{inspect, stale_after, Holder};
use crate::registry::{AdapterMeta, Registry, METRICS_FILE};
use crate::Result;

/// One cell's state.
#[derive(Debug, Clone, PartialEq)]
pub enum CellState {
    Pending,
    Running {
        step: usize,
        host: String,
        pid: u32,
    },
    Interrupted {
        step: usize,
    },
    Failed {
        message: String,
        log_tail: Vec<String>,
    },
    Done {
        metrics: BTreeMap<String, f64>,
    },
}

#[derive(Debug, Clone)]
pub struct CellStatus {
    pub cell: PlannedCell,
    pub state: CellState,
}

impl CellState {
    pub fn is_done(&self) -> bool {
        matches!(self, CellState::Done { .. })
    }

    /// One line for a table: `running (step 3 of 20, on host pid 12)`, `done`, ...
    pub fn describe(&self, total_steps: usize) -> String {
        match self {
            CellState::Pending => "pending".into(),
            CellState::Running { step, host, pid } => {
                format!("running (step {step} of {total_steps}, {host} pid {pid})")
            }
            CellState::Interrupted { step } => {
                format!("interrupted at step {step} of {total_steps} (resumes)")
            }
            CellState::Failed { message, .. } => format!("failed: {message}"),
            CellState::Done { .. } => "done".into(),
        }
    }
}

/// Lines kept from the end of a failed cell's log.
const LOG_TAIL_LINES: usize = 5;

/// The state of every planned cell.
pub fn cell_statuses(registry: &Registry, plan: &SweepPlan) -> Result<Vec<CellStatus>> {
    plan.cells
        .iter()
        .map(|cell| {
            Ok(CellStatus {
                cell: cell.clone(),
                state: cell_state(registry, plan, cell)?,
            })
        })
        .collect()
}

fn cell_state(registry: &Registry, plan: &SweepPlan, cell: &PlannedCell) -> Result<CellState> {
    if registry.contains(&cell.name) {
        let metrics = AdapterMeta::read(&registry.path(&cell.name))
            .map(|m| m.metrics)
            .unwrap_or_default();
        return Ok(CellState::Done { metrics });
    }
    let run_dir = registry.run_dir(&cell.name);
    if let Holder::Live(owner) = inspect(&lock_path(registry, plan, cell.index), stale_after())? {
        return Ok(CellState::Running {
            step: progress_step(&run_dir),
            host: owner.host,
            pid: owner.pid,
        });
    }
    let record = read_record(registry, plan, cell.index);
    let tail = || log_tail(&log_path(registry, plan, cell.index));
    Ok(match record.map(|r| (r.state, r)) {
        Some((RecordedState::Failed, r)) => CellState::Failed {
            message: r.message.unwrap_or_else(|| "failed".into()),
            log_tail: tail(),
        },
        Some((RecordedState::Running, r)) => CellState::Failed {
            message: format!(
                "stopped without a word (killed?) on {} pid {}",
                r.host, r.pid
            ),
            log_tail: tail(),
        },
        Some((RecordedState::Done, _)) => CellState::Failed {
            message: format!("recorded done, but `{}` is not in the registry", cell.name),
            log_tail: tail(),
        },
        Some((RecordedState::Interrupted, r)) => CellState::Interrupted {
            step: r.step.unwrap_or_else(|| progress_step(&run_dir)),
        },
        None => match checkpoint_step(&run_dir) {
            Some(step) => CellState::Interrupted { step },
            None => CellState::Pending,
        },
    })
}

fn checkpoint_step(run_dir: &std::path::Path) -> Option<usize> {
    let dir = crate::train::checkpoint::latest(run_dir).ok()??;
    let state: crate::train::checkpoint::CheckpointState =
        crate::fsutil::read_json(&dir.join("state.json")).ok()?;
    Some(state.step)
}

/// How far a running cell is: the later of its checkpoint and its metrics log.
fn progress_step(run_dir: &std::path::Path) -> usize {
    let logged = std::fs::read_to_string(run_dir.join(METRICS_FILE))
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .and_then(|v| v.get("step")?.as_u64())
        })
        .unwrap_or(0) as usize;
    logged.max(checkpoint_step(run_dir).unwrap_or(0))
}

fn log_tail(path: &std::path::Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    // Progress bars redraw with carriage returns: keep what the last redraw left.
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.rsplit('\r').next().unwrap_or(l).trim_end().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].to_vec()
}

/// The sweep's table from its cells as they are now: done cells with their metrics, the others
/// with their state; (0, 0) marked invalid. The best cell is ranked by `metric`.
pub fn collect(registry: &Registry, plan: &SweepPlan, metric: &str) -> Result<SweepResult> {
    let statuses = cell_statuses(registry, plan)?;
    let mut cells = Vec::new();
    let mut unfinished = false;
    for &r in &plan.response_weights {
        for &p in &plan.prompt_weights {
            let found = statuses
                .iter()
                .find(|s| s.cell.prompt_weight == p && s.cell.response_weight == r);
            let Some(status) = found else {
                cells.push(SweepCell {
                    prompt_weight: p,
                    response_weight: r,
                    name: super::cell_name(&plan.prefix, p, r),
                    status: "invalid (all weights 0)".into(),
                    metrics: BTreeMap::new(),
                    stopped_at_rung: None,
                });
                continue;
            };
            unfinished |= !status.state.is_done();
            cells.push(SweepCell {
                prompt_weight: p,
                response_weight: r,
                name: status.cell.name.clone(),
                status: status.state.describe(plan.total_steps),
                metrics: match &status.state {
                    CellState::Done { metrics } => metrics.clone(),
                    _ => BTreeMap::new(),
                },
                stopped_at_rung: None,
            });
        }
    }
    let mut result = SweepResult {
        metric: metric.to_string(),
        prompt_weights: plan.prompt_weights.clone(),
        response_weights: plan.response_weights.clone(),
        cells,
        best: None,
        interrupted: unfinished,
    };
    if let Some(state) = super::halving::halving_state(registry, plan) {
        super::halving::mark_stopped(&mut result, plan, &state);
        // A cell halving stopped is finished, not unfinished.
        result.interrupted = result.cells.iter().any(|c| {
            c.stopped_at_rung.is_none()
                && !c.status.starts_with("done")
                && !c.status.starts_with("invalid")
        });
    }
    Ok(result.by_metric(metric))
}
