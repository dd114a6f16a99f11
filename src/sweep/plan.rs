//! A sweep as a plan on the registry's filesystem, so its cells can run anywhere the registry is
//! shared: `<registry>/.sweeps/<name>/` holds the grid, the full training config, the base and
//! data fingerprints, and the tokenized data, so a cell on another host neither re-tokenizes
//! nor trains against other data. Every launcher (local, Slurm, Kubernetes, print) writes it
//! first; each cell then runs as `peft-wit sweep run-cell --sweep <name> --index I`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{cell_name, AxisValue, Strategy};
use crate::data::{Example, TokenizedExample};
use crate::fsutil::{atomic_write, atomic_write_json, read_json};
use crate::model::BaseModel;
use crate::registry::Registry;
use crate::train::trainer::{config_hash, total_steps};
use crate::train::{LossPreset, PreparedData, TrainConfig};
use crate::{Error, Result};

/// Where plans live inside a registry (hidden: not adapters).
pub const PLANS_DIR: &str = ".sweeps";
/// Bumped when the plan's layout changes; a plan of another format is refused.
pub const PLAN_FORMAT_VERSION: u32 = 1;
const PLAN_FILE: &str = "plan.json";
const DATA_FILE: &str = "data.json";

/// One trainable cell of the grid ((0, 0) has no loss and gets no index).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlannedCell {
    pub index: usize,
    pub name: String,
    pub prompt_weight: AxisValue,
    pub response_weight: AxisValue,
}

/// The base every cell must load: the model as given (made absolute), and what it must hash to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlannedBase {
    pub name: String,
    pub fingerprint: String,
}

/// What a sweep is over: its name, the cells' name prefix, the ranking metric and the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct GridSpec {
    pub name: String,
    pub prefix: String,
    pub metric: String,
    pub prompt_weights: Vec<AxisValue>,
    pub response_weights: Vec<AxisValue>,
    pub strategy: Strategy,
}

/// A sweep's plan: everything a cell needs besides the base's weights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SweepPlan {
    pub format_version: u32,
    /// The peft-wit version that wrote it: cells trained by another version could differ.
    pub peft_wit_version: String,
    pub name: String,
    pub prefix: String,
    /// The metric the table and heatmap rank by (held-out eval or benchmark column).
    pub metric: String,
    pub prompt_weights: Vec<AxisValue>,
    pub response_weights: Vec<AxisValue>,
    /// Every cell to the end (grid), or successive halving.
    #[serde(default)]
    pub strategy: Strategy,
    pub cells: Vec<PlannedCell>,
    /// The training config shared by every cell (each sets its own weights and name).
    pub train_config: TrainConfig,
    pub base: PlannedBase,
    pub data_fingerprint: String,
    pub train_examples: usize,
    /// Optimizer steps per cell.
    pub total_steps: usize,
    pub created_unix: u64,
}

/// The tokenized data of a plan (the template is rebuilt from the base and the config).
#[derive(Serialize, Deserialize)]
struct DataCache {
    fingerprint: String,
    source: String,
    template_name: String,
    report: Vec<String>,
    train: Vec<TokenizedExample>,
    eval: Vec<TokenizedExample>,
    eval_examples: Vec<Example>,
}

/// The folder of the plan `name` in `registry`.
pub fn plan_dir(registry: &Registry, name: &str) -> PathBuf {
    registry.root().join(PLANS_DIR).join(name)
}

/// A sweep name is one path component a scheduler can carry in a job name.
pub fn validate_sweep_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "sweep name `{name}`: use 1-64 letters, digits, `-`, `_` or `.` (not first)"
        )))
    }
}

impl SweepPlan {
    /// The plan for a grid over `base` and `data` with `config` (not yet written).
    pub fn new(
        grid: &GridSpec,
        config: &TrainConfig,
        base: &BaseModel,
        data: &PreparedData,
    ) -> Result<SweepPlan> {
        validate_sweep_name(&grid.name)?;
        grid.strategy.validate()?;
        let mut cells = Vec::new();
        for &r in &grid.response_weights {
            for &p in &grid.prompt_weights {
                if p.is(0.0) && r.is(0.0) {
                    continue;
                }
                cells.push(PlannedCell {
                    index: cells.len(),
                    name: cell_name(&grid.prefix, p, r),
                    prompt_weight: p,
                    response_weight: r,
                });
            }
        }
        if cells.is_empty() {
            return Err(Error::InvalidArgument(
                "the grid has no cell with a non-zero weight".into(),
            ));
        }
        crate::registry::validate_name(&cells[0].name)?;
        let mut config = config.clone();
        config.name = None;
        config.registry = None;
        // Cells run in other working directories: paths in the config must not be relative.
        config.model = config.model.as_deref().map(absolute_spec);
        config.data = config.data.as_deref().map(absolute_path);
        config.eval_data = config.eval_data.as_deref().map(absolute_path);
        if config.model.is_none() {
            let default = crate::model::resolve::default_model_path();
            config.model = Some(absolute_path(&default).display().to_string());
        }
        let plan = SweepPlan {
            format_version: PLAN_FORMAT_VERSION,
            peft_wit_version: env!("CARGO_PKG_VERSION").to_string(),
            name: grid.name.clone(),
            prefix: grid.prefix.clone(),
            metric: grid.metric.clone(),
            prompt_weights: grid.prompt_weights.clone(),
            response_weights: grid.response_weights.clone(),
            strategy: grid.strategy,
            cells,
            total_steps: total_steps(&config, data.train.len()),
            train_config: config,
            base: PlannedBase {
                name: base.name.clone(),
                fingerprint: base.fingerprint.clone(),
            },
            data_fingerprint: data.fingerprint.clone(),
            train_examples: data.train.len(),
            created_unix: crate::fsutil::lock::unix_now(),
        };
        // A cell whose weights leave nothing to learn is refused before anything runs.
        for cell in &plan.cells {
            plan.cell_config(cell.index)?
                .validate()
                .map_err(|e| Error::InvalidArgument(format!("cell `{}`: {e}", cell.name)))?;
        }
        Ok(plan)
    }

    /// The config of cell `index` (its weights and registry name set).
    pub fn cell_config(&self, index: usize) -> Result<TrainConfig> {
        let cell = self.cell(index)?;
        let mut cfg = self.train_config.clone();
        cfg.loss = LossPreset::Wit;
        cfg.prompt_weight = cell.prompt_weight.weight();
        cfg.response_weight = cell.response_weight.weight();
        cfg.prompt_weight_schedule = cell.prompt_weight.schedule();
        cfg.response_weight_schedule = cell.response_weight.schedule();
        cfg.name = Some(cell.name.clone());
        Ok(cfg)
    }

    pub fn cell(&self, index: usize) -> Result<&PlannedCell> {
        self.cells.get(index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "cell index {index} is out of range: sweep `{}` has {} cells (0-{})",
                self.name,
                self.cells.len(),
                self.cells.len() - 1
            ))
        })
    }

    /// What decides the cells' weights: two plans with the same key train the same adapters.
    fn key(&self) -> String {
        let grid: Vec<String> = self
            .cells
            .iter()
            .map(|c| format!("{}:{}:{}", c.name, c.prompt_weight, c.response_weight))
            .collect();
        format!(
            "{}|{}|{}|{:?}|{}|{}|{}",
            self.format_version,
            self.peft_wit_version,
            grid.join(","),
            self.strategy,
            config_hash(&self.train_config),
            self.base.fingerprint,
            self.data_fingerprint
        )
    }

    /// Writes the plan and its data into `plan_dir`, or checks that the plan already there is
    /// this one (a launcher run again on the same sweep resubmits it). Returns whether it was new.
    /// The folder appears whole: it is staged beside and renamed into place.
    pub fn write_or_match(&self, registry: &Registry, data: &PreparedData) -> Result<bool> {
        let dir = plan_dir(registry, &self.name);
        if dir.join(PLAN_FILE).is_file() {
            let existing = SweepPlan::load(registry, &self.name)?;
            if existing.key() != self.key() {
                return Err(Error::InvalidArgument(format!(
                    "sweep `{}` in {} was planned with other settings ({}); use another --sweep-name, or remove {} to start it over",
                    self.name,
                    registry.root().display(),
                    existing.differences(self).join(", "),
                    dir.display()
                )));
            }
            return Ok(false);
        }
        let parent = registry.root().join(PLANS_DIR);
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let staged = parent.join(format!(
            ".{}.staged.{}.{}",
            self.name,
            crate::fsutil::hostname(),
            std::process::id()
        ));
        if staged.exists() {
            std::fs::remove_dir_all(&staged).map_err(|e| Error::io(&staged, e))?;
        }
        let cache = DataCache {
            fingerprint: data.fingerprint.clone(),
            source: data.source.clone(),
            template_name: data.template_name.clone(),
            report: data.report.clone(),
            train: data.train.clone(),
            eval: data.eval.clone(),
            eval_examples: data.eval_examples.clone(),
        };
        let text = serde_json::to_vec(&cache).map_err(|error| Error::Json {
            path: staged.join(DATA_FILE),
            error,
        })?;
        atomic_write(&staged.join(DATA_FILE), &text)?;
        atomic_write_json(&staged.join(PLAN_FILE), self)?;
        for sub in ["logs", "cells", "locks"] {
            let d = staged.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        match std::fs::rename(&staged, &dir) {
            Ok(()) => Ok(true),
            // Another process planned the same sweep first: theirs stands if it is the same.
            Err(_) if dir.join(PLAN_FILE).is_file() => {
                let _ = std::fs::remove_dir_all(&staged);
                self.write_or_match(registry, data)
            }
            Err(e) => Err(Error::io(&dir, e)),
        }
    }

    /// Reads the plan `name`, refusing one written in another format or by another version.
    pub fn load(registry: &Registry, name: &str) -> Result<SweepPlan> {
        validate_sweep_name(name)?;
        let dir = plan_dir(registry, name);
        let path = dir.join(PLAN_FILE);
        if !path.is_file() {
            let known = list_plans(registry).unwrap_or_default();
            return Err(Error::InvalidArgument(format!(
                "no sweep `{name}` in {} (planned sweeps: {})",
                registry.root().display(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        let value: serde_json::Value = read_json(&path)?;
        let format = value.get("format_version").and_then(|v| v.as_u64());
        let version = value.get("peft_wit_version").and_then(|v| v.as_str());
        if format != Some(PLAN_FORMAT_VERSION as u64) || version != Some(env!("CARGO_PKG_VERSION"))
        {
            return Err(Error::invalid_file(
                &path,
                format!(
                    "written by peft-wit {} (plan format {}); this is peft-wit {} (plan format {PLAN_FORMAT_VERSION}): run the cells with the version that planned them, or plan the sweep again under a new name",
                    version.unwrap_or("?"),
                    format.map(|f| f.to_string()).unwrap_or_else(|| "?".into()),
                    env!("CARGO_PKG_VERSION"),
                ),
            ));
        }
        serde_json::from_value(value).map_err(|error| Error::Json { path, error })
    }

    /// Loads the plan's tokenized data, with the template the config names.
    pub fn load_data(&self, registry: &Registry, base: &BaseModel) -> Result<PreparedData> {
        let path = plan_dir(registry, &self.name).join(DATA_FILE);
        let cache: DataCache = read_json(&path)?;
        if cache.fingerprint != self.data_fingerprint {
            return Err(Error::invalid_file(
                &path,
                "its data does not match the plan's data fingerprint",
            ));
        }
        Ok(PreparedData {
            train: cache.train,
            eval: cache.eval,
            eval_examples: cache.eval_examples,
            template: base.template(&self.train_config.template)?,
            template_name: cache.template_name,
            source: cache.source,
            fingerprint: cache.fingerprint,
            report: cache.report,
        })
    }

    /// The plan's tokenized examples, train then eval, without loading a base: what its cells
    /// trained and were evaluated on (read by `suggest` for the data's statistics).
    pub fn load_tokenized(&self, registry: &Registry) -> Result<Vec<TokenizedExample>> {
        /// The part of [`DataCache`] holding tokens (the other fields are not parsed).
        #[derive(Deserialize)]
        struct Tokens {
            fingerprint: String,
            train: Vec<TokenizedExample>,
            eval: Vec<TokenizedExample>,
        }
        let path = plan_dir(registry, &self.name).join(DATA_FILE);
        let tokens: Tokens = read_json(&path)?;
        if tokens.fingerprint != self.data_fingerprint {
            return Err(Error::invalid_file(
                &path,
                "its data does not match the plan's data fingerprint",
            ));
        }
        let mut all = tokens.train;
        all.extend(tokens.eval);
        Ok(all)
    }

    /// Checks that `base` is the base this plan was made for.
    pub fn check_base(&self, base: &BaseModel) -> Result<()> {
        if base.fingerprint != self.base.fingerprint {
            return Err(Error::InvalidArgument(format!(
                "sweep `{}` was planned for the base {} (fingerprint {}), but {} loaded with fingerprint {}: the cells must train on the same base",
                self.name,
                self.base.name,
                short(&self.base.fingerprint),
                self.train_config.model.as_deref().unwrap_or("the default model"),
                short(&base.fingerprint)
            )));
        }
        Ok(())
    }

    fn differences(&self, other: &SweepPlan) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.base.fingerprint != other.base.fingerprint {
            out.push("another base");
        }
        if self.data_fingerprint != other.data_fingerprint {
            out.push("other data");
        }
        if config_hash(&self.train_config) != config_hash(&other.train_config) {
            out.push("another training config");
        }
        if self.cells != other.cells {
            out.push("another grid");
        }
        if self.strategy != other.strategy {
            out.push("another strategy");
        }
        if self.peft_wit_version != other.peft_wit_version {
            out.push("another peft-wit version");
        }
        if out.is_empty() {
            out.push("another plan format");
        }
        out
    }
}

/// Names of the planned sweeps in a registry.
pub fn list_plans(registry: &Registry) -> Result<Vec<String>> {
    let dir = registry.root().join(PLANS_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().join(PLAN_FILE).is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn short(fingerprint: &str) -> &str {
    &fingerprint[..fingerprint.len().min(16)]
}

fn absolute_path(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// A model spec made absolute when it names a local file or folder (a Hub id stays as it is).
fn absolute_spec(spec: &str) -> String {
    if Path::new(spec).exists() {
        absolute_path(Path::new(spec)).display().to_string()
    } else {
        spec.to_string()
    }
}
