//! A sweep over the (λp, λr) grid: one adapter per cell in the registry, finished cells skipped
//! (so a stopped sweep resumes), and a heatmap of the chosen metric with the best cell marked,
//! like the WIT paper's Figure 2. A sweep is first a plan in the registry ([`plan`]); its cells
//! run here ([`LocalSweep`]: one after another, or side by side in [`crate::lanes`]) or on a cluster
//! ([`launch`]), each claimed and trained by [`cell`], and [`status`] reads where they stand
//! from the registry alone.

pub mod cell;
pub mod halving;
pub mod launch;
pub mod plan;
pub mod status;
pub mod step0;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::eval::{evaluate_each, higher_is_better, EvalRun};
use crate::fsutil::{atomic_write, atomic_write_json};
use crate::lanes::{Lanes, Next};
use crate::model::BaseModel;
use crate::registry::Registry;
use crate::train::{PreparedData, RunOptions, WeightSchedule};
use crate::{Error, Result};

pub use cell::{run_cell, train_cell, CellOutcome};
pub use halving::Strategy;
pub use launch::Launcher;
pub use plan::{GridSpec, PlannedCell, SweepPlan};
pub use status::{cell_statuses, collect, CellState};

/// One value on an axis of the grid: a fixed weight, or a schedule (`linear:1->0`) the weight
/// follows during training. Written in JSON as a number or as the schedule's text.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AxisValue {
    Weight(f32),
    Schedule(WeightSchedule),
}

impl From<f32> for AxisValue {
    fn from(w: f32) -> Self {
        AxisValue::Weight(w)
    }
}

impl AxisValue {
    /// The fixed weight a config gets (for a schedule its end value, which the schedule
    /// overrides during training).
    pub fn weight(&self) -> f32 {
        match self {
            AxisValue::Weight(w) => *w,
            AxisValue::Schedule(s) => s.ends(0.0).1,
        }
    }

    pub fn schedule(&self) -> WeightSchedule {
        match self {
            AxisValue::Weight(_) => WeightSchedule::Constant,
            AxisValue::Schedule(s) => *s,
        }
    }

    /// The value in a cell's registry name (`0.2`, `lin1to0`).
    pub fn name_part(&self) -> String {
        self.schedule().name_part(self.weight())
    }

    /// Whether it is the fixed weight `w`.
    pub fn is(&self, w: f32) -> bool {
        *self == AxisValue::Weight(w)
    }
}

impl std::fmt::Display for AxisValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AxisValue::Weight(w) => write!(f, "{w}"),
            AxisValue::Schedule(s) => write!(f, "{s}"),
        }
    }
}

/// One cell of the grid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SweepCell {
    pub prompt_weight: AxisValue,
    pub response_weight: AxisValue,
    pub name: String,
    /// `done`, `pending`, `running (...)`, `interrupted at ...`, `failed: ...`, `invalid ...`
    /// or `stopped at rung k ...`.
    pub status: String,
    pub metrics: BTreeMap<String, f64>,
    /// Successive halving stopped the cell at this rung (1-based); its metrics are from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at_rung: Option<usize>,
}

/// The whole grid's results.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SweepResult {
    pub metric: String,
    pub prompt_weights: Vec<AxisValue>,
    pub response_weights: Vec<AxisValue>,
    pub cells: Vec<SweepCell>,
    /// Name of the best cell under `metric` (lower is better for losses, higher otherwise).
    pub best: Option<String>,
    pub interrupted: bool,
}

/// Parses `0,0.2,0.4` (or `0:1:0.2` for a range with step) into weights; list items may be
/// schedules (`linear:1->0,0.2,0`).
pub fn parse_weights(spec: &str) -> Result<Vec<AxisValue>> {
    let bad = |m: String| Error::InvalidArgument(format!("weight list `{spec}`: {m}"));
    let parts: Vec<&str> = spec.split(':').collect();
    let is_range = parts.len() == 3 && parts.iter().all(|p| p.trim().parse::<f64>().is_ok());
    let values: Vec<AxisValue> = if is_range {
        let nums: Vec<f64> = parts
            .iter()
            .map(|p| p.trim().parse::<f64>().map_err(|e| bad(e.to_string())))
            .collect::<Result<_>>()?;
        let (start, end, step) = (nums[0], nums[1], nums[2]);
        if step <= 0.0 || end < start {
            return Err(bad("range needs start <= end and step > 0".into()));
        }
        let n = ((end - start) / step + 1e-9).floor() as usize;
        (0..=n)
            .map(|i| AxisValue::Weight((start + i as f64 * step) as f32))
            .collect()
    } else {
        spec.split(',')
            .map(|p| {
                let p = p.trim();
                if p.contains(':') || p == "constant" {
                    let schedule: WeightSchedule = p.parse()?;
                    if schedule.is_constant() {
                        return Err(bad("`constant` needs a weight: write the number".into()));
                    }
                    Ok(AxisValue::Schedule(schedule))
                } else {
                    p.parse::<f32>()
                        .map(AxisValue::Weight)
                        .map_err(|e| bad(format!("`{p}`: {e}")))
                }
            })
            .collect::<Result<_>>()?
    };
    let fixed_ok = |v: &AxisValue| match v {
        AxisValue::Weight(w) => w.is_finite() && *w >= 0.0,
        AxisValue::Schedule(_) => true,
    };
    if values.is_empty() || !values.iter().all(fixed_ok) {
        return Err(bad("weights must be finite and non-negative".into()));
    }
    Ok(values)
}

/// The registry name of a cell.
pub fn cell_name(prefix: &str, p: AxisValue, r: AxisValue) -> String {
    format!("{prefix}wit-p{}-r{}", p.name_part(), r.name_part())
}

/// A sweep run here on one loaded base: the plan's cells one after another, or `lanes` of
/// them side by side, the threads split between them ([`crate::lanes`]).
pub struct LocalSweep<'a> {
    pub base: &'a BaseModel,
    pub data: &'a PreparedData,
    pub plan: &'a SweepPlan,
    pub registry: &'a Registry,
    pub opts: &'a RunOptions,
    /// Cells at once (0 or 1: one after another).
    pub lanes: usize,
}

impl LocalSweep<'_> {
    /// Trains every cell not yet done (each claimed as `run-cell` would claim it, so a local
    /// sweep and cluster cells can share a plan), starting no more after an interrupted cell;
    /// then the table of all cells, as `sweep collect` gives it.
    pub fn run(&self, mut on_cell: impl FnMut(&PlannedCell, &CellOutcome)) -> Result<SweepResult> {
        if let Some(ladder) = halving::Ladder::of(self.plan) {
            return self.run_halving(&ladder, &mut on_cell);
        }
        let indices: Vec<usize> = self.plan.cells.iter().map(|c| c.index).collect();
        let opts = self.lane_opts();
        self.run_cells(
            &indices,
            |index| train_cell(self.base, self.data, self.plan, self.registry, index, &opts),
            |index, outcome| {
                on_cell(self.plan.cell(index)?, &outcome);
                Ok(match outcome {
                    CellOutcome::Interrupted { .. } => Next::Stop,
                    _ => Next::Continue,
                })
            },
        )?;
        collect(self.registry, self.plan, &self.plan.metric)
    }

    /// `job` on each of `indices` in this sweep's lanes, `done` with each cell index and its
    /// result. Before
    /// several lanes start, the plan's shared step-0 evaluation is computed once (on all the
    /// threads) where a cell will need it, instead of by the first cell of every lane.
    fn run_cells<R: Send>(
        &self,
        indices: &[usize],
        job: impl Fn(usize) -> Result<R> + Sync,
        mut done: impl FnMut(usize, R) -> Result<Next>,
    ) -> Result<()> {
        let fresh = |&i: &usize| {
            self.plan
                .cell(i)
                .is_ok_and(|c| !self.registry.contains(&c.name))
        };
        if self.lanes > 1 && indices.iter().filter(|i| fresh(i)).count() > 1 {
            step0::shared_step0(self.registry, self.plan, self.base, self.data)?;
        }
        Lanes::new(self.lanes)?.run(indices, |_, &i| job(i), |pos, r| done(indices[pos], r))
    }

    /// The cells' run options: with several lanes, their progress bars join one group so
    /// that they draw one below the other.
    fn lane_opts(&self) -> RunOptions {
        let group =
            self.opts.progress_group.clone().or_else(|| {
                (self.lanes > 1 && self.opts.progress).then(indicatif::MultiProgress::new)
            });
        RunOptions {
            progress_group: group,
            ..self.opts.clone()
        }
    }
}

/// The file in an adapter's folder holding its benchmark scores and the settings they were
/// measured with (a rerun with the same settings reuses them).
pub const BENCHMARK_FILE: &str = "benchmarks.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct StoredScores {
    settings: String,
    scores: BTreeMap<String, f64>,
}

/// Scores every finished cell on the benchmark `suite` with the base loaded once, through
/// [`evaluate_each`] (each adapter
/// merged into a dense base, or as a side path on a quantized one; with `lanes` > 1 that many
/// cells at once, as side paths on the shared base), stores the scores beside the adapter, and
/// adds them to the cells' metrics under the suite's column names (`mmlu`,
/// `gsm8k:strict-match`, ...). Returns the column names.
pub fn benchmark_cells(
    base: &mut BaseModel,
    registry: &Registry,
    result: &mut SweepResult,
    suite: &crate::tasks::Suite,
    lanes: usize,
) -> Result<Vec<String>> {
    let settings = suite.settings();
    let finished = |cell: &SweepCell| registry.contains(&cell.name) && !cell.metrics.is_empty();
    // Scores stored with the same settings stand; the other finished cells are scored.
    let mut scores: Vec<Option<BTreeMap<String, f64>>> = result
        .cells
        .iter()
        .map(|cell| {
            let path = registry.path(&cell.name).join(BENCHMARK_FILE);
            let stored = finished(cell).then(|| std::fs::read_to_string(path).ok())??;
            serde_json::from_str::<StoredScores>(&stored)
                .ok()
                .filter(|s| s.settings == settings)
                .map(|s| s.scores)
        })
        .collect();
    let todo: Vec<usize> = (0..result.cells.len())
        .filter(|&i| finished(&result.cells[i]) && scores[i].is_none())
        .collect();
    let names: Vec<String> = todo.iter().map(|&i| result.cells[i].name.clone()).collect();
    let run = EvalRun {
        registry,
        include_base: false,
        adapters: &names,
        data: None,
        suite: Some(suite),
        side_path: false,
        allow_other_base: false,
        lanes,
    };
    // Without data, a model's metrics are its benchmark columns. Each cell's scores are
    // stored as soon as they are final.
    evaluate_each(
        base,
        &run,
        |_| {},
        |k, scored, _| {
            let stored = StoredScores {
                settings: settings.clone(),
                scores: scored.metrics,
            };
            atomic_write_json(&registry.path(&names[k]).join(BENCHMARK_FILE), &stored)?;
            scores[todo[k]] = Some(stored.scores);
            Ok(())
        },
    )?;
    let mut columns: Vec<String> = Vec::new();
    for (cell, cell_scores) in result.cells.iter_mut().zip(scores) {
        let Some(cell_scores) = cell_scores else {
            continue;
        };
        for label in cell_scores.keys() {
            if !columns.contains(label) {
                columns.push(label.clone());
            }
        }
        cell.metrics.extend(cell_scores);
    }
    Ok(columns)
}

/// One row of the paper's summary table: a cell's relative gain over the standard cell
/// (λp = 0, λr = 1) on each benchmark, and their mean.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GainRow {
    pub name: String,
    pub prompt_weight: AxisValue,
    pub response_weight: AxisValue,
    /// Benchmark → (score, relative gain in % over the standard cell).
    pub scores: BTreeMap<String, (f64, Option<f64>)>,
    pub mean_gain: Option<f64>,
}

impl SweepResult {
    /// This sweep judged by another metric (best cell recomputed).
    pub fn by_metric(&self, metric: &str) -> SweepResult {
        let better = |a: f64, b: f64| {
            if higher_is_better(metric) {
                a > b
            } else {
                a < b
            }
        };
        let mut best: Option<(&SweepCell, f64)> = None;
        for cell in &self.cells {
            if let Some(&v) = cell.metrics.get(metric) {
                if v.is_finite() && best.is_none_or(|(_, b)| better(v, b)) {
                    best = Some((cell, v));
                }
            }
        }
        SweepResult {
            metric: metric.to_string(),
            best: best.map(|(c, _)| c.name.clone()),
            ..self.clone()
        }
    }

    /// The summary table over `benchmarks` (empty when the grid has no standard cell).
    pub fn gains(&self, benchmarks: &[String]) -> Vec<GainRow> {
        let standard = self
            .cells
            .iter()
            .find(|c| c.prompt_weight.is(0.0) && c.response_weight.is(1.0));
        self.cells
            .iter()
            .filter(|c| benchmarks.iter().any(|b| c.metrics.contains_key(b)))
            .map(|c| {
                let mut scores = BTreeMap::new();
                let mut gains = Vec::new();
                for b in benchmarks {
                    let Some(&v) = c.metrics.get(b) else { continue };
                    let gain = standard
                        .and_then(|s| s.metrics.get(b))
                        .filter(|s| **s != 0.0)
                        .map(|s| 100.0 * (v - s) / s.abs());
                    gains.extend(gain);
                    scores.insert(b.clone(), (v, gain));
                }
                GainRow {
                    name: c.name.clone(),
                    prompt_weight: c.prompt_weight,
                    response_weight: c.response_weight,
                    scores,
                    mean_gain: (!gains.is_empty())
                        .then(|| gains.iter().sum::<f64>() / gains.len() as f64),
                }
            })
            .collect()
    }

    /// Writes one heatmap per benchmark (`heatmap-<benchmark>.svg`) into `dir`.
    pub fn write_benchmark_heatmaps(&self, dir: &Path, benchmarks: &[String]) -> Result<()> {
        for b in benchmarks {
            let file = format!("heatmap-{}.svg", b.replace([':', '/', ','], "-"));
            atomic_write(&dir.join(file), self.by_metric(b).heatmap_svg().as_bytes())?;
        }
        Ok(())
    }

    /// `values[row = response weight][col = prompt weight]` of the metric (NaN where missing).
    pub fn grid(&self) -> Vec<Vec<f64>> {
        self.response_weights
            .iter()
            .map(|&r| {
                self.prompt_weights
                    .iter()
                    .map(|&p| {
                        self.cells
                            .iter()
                            .find(|c| c.prompt_weight == p && c.response_weight == r)
                            .and_then(|c| c.metrics.get(&self.metric).copied())
                            .unwrap_or(f64::NAN)
                    })
                    .collect()
            })
            .collect()
    }

    pub fn heatmap_svg(&self) -> String {
        let best = self.best.as_ref().and_then(|name| {
            let cell = self.cells.iter().find(|c| &c.name == name)?;
            let row = self
                .response_weights
                .iter()
                .position(|r| *r == cell.response_weight)?;
            let col = self
                .prompt_weights
                .iter()
                .position(|p| *p == cell.prompt_weight)?;
            Some((row, col))
        });
        let notes: Vec<Vec<String>> = self
            .response_weights
            .iter()
            .map(|r| {
                self.prompt_weights
                    .iter()
                    .map(|p| {
                        self.cells
                            .iter()
                            .find(|c| c.prompt_weight == *p && c.response_weight == *r)
                            .and_then(|c| c.stopped_at_rung)
                            .map(|k| format!("stopped at rung {k}"))
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .collect();
        crate::plot::heatmap(
            &format!("{} over the loss-weight grid (best outlined)", self.metric),
            "response weight λr",
            "prompt weight λp",
            &self
                .response_weights
                .iter()
                .map(AxisValue::name_part)
                .collect::<Vec<_>>(),
            &self
                .prompt_weights
                .iter()
                .map(AxisValue::name_part)
                .collect::<Vec<_>>(),
            &self.grid(),
            best,
            &notes,
        )
    }

    /// Writes `sweep.json` and `heatmap.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        atomic_write_json(&dir.join("sweep.json"), self)?;
        atomic_write(&dir.join("heatmap.svg"), self.heatmap_svg().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_lists_and_ranges() {
        let w = |v: f32| AxisValue::Weight(v);
        assert_eq!(
            parse_weights("0,0.2,1").unwrap(),
            vec![w(0.0), w(0.2), w(1.0)]
        );
        let r = parse_weights("0:1:0.2").unwrap();
        assert_eq!(r.len(), 6);
        assert!((r[5].weight() - 1.0).abs() < 1e-6);
        assert!(parse_weights("a,b").is_err());
        assert!(parse_weights("-1").is_err());
        assert!(parse_weights("constant").is_err());
        assert_eq!(cell_name("", w(0.2), w(1.0)), "wit-p0.2-r1");
        let axis = parse_weights("linear:1->0,0.2,0").unwrap();
        assert_eq!(axis.len(), 3);
        assert_eq!(axis[0].to_string(), "linear:1->0");
        assert_eq!(cell_name("", axis[0], w(1.0)), "wit-plin1to0-r1");
        assert_eq!(
            serde_json::to_string(&axis).unwrap(),
            r#"["linear:1->0",0.2,0.0]"#
        );
        assert!(!higher_is_better("response_loss"));
        assert!(higher_is_better("exact_match"));
    }

    #[test]
    fn relative_gains_over_the_standard_cell() {
        let cell = |p: f32, r: f32, mmlu: f64, bbh: f64| SweepCell {
            prompt_weight: p.into(),
            response_weight: r.into(),
            name: cell_name("", p.into(), r.into()),
            status: "done".into(),
            metrics: [("mmlu".to_string(), mmlu), ("bbh".to_string(), bbh)].into(),
            stopped_at_rung: None,
        };
        let result = SweepResult {
            metric: "response_loss".into(),
            prompt_weights: vec![0.0.into(), 0.2.into()],
            response_weights: vec![1.0.into()],
            cells: vec![cell(0.0, 1.0, 0.40, 0.20), cell(0.2, 1.0, 0.44, 0.19)],
            best: None,
            interrupted: false,
        };
        let benches = vec!["mmlu".to_string(), "bbh".to_string()];
        let rows = result.gains(&benches);
        let wit = &rows[1];
        assert!((wit.scores["mmlu"].1.unwrap() - 10.0).abs() < 1e-9);
        assert!((wit.scores["bbh"].1.unwrap() + 5.0).abs() < 1e-9);
        assert!((wit.mean_gain.unwrap() - 2.5).abs() < 1e-9);
        assert_eq!(
            result.by_metric("mmlu").best.as_deref(),
            Some("wit-p0.2-r1")
        );
        assert_eq!(result.by_metric("bbh").best.as_deref(), Some("wit-p0-r1"));
    }
}
