//! Scores of one model on a set of tasks, with the groups aggregated as the harness does
//! (weighted by subtask size, pooled standard error, inner groups first), written in the
//! harness's results layout (`results.<task>["<metric>,<filter>"]`, `…_stderr`, `n-samples`,
//! `configs`) so tools that read lm-evaluation-harness output read ours.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::run::{PreparedTask, TaskOutcome};
use super::scoring::pooled;

/// A score and its standard error (where the harness reports one).
pub type Score = (f64, Option<f64>);
/// Metric key (`"acc,none"`) → score.
pub type Scores = BTreeMap<String, Score>;
/// Metric key → (score, standard error, documents behind it).
pub type SizedScores = BTreeMap<String, (f64, Option<f64>, usize)>;

/// One model's (base or adapter) scores.
#[derive(Debug, Clone)]
pub struct SuiteResult {
    pub adapter: String,
    pub tasks: Vec<TaskOutcome>,
    /// Group name → metric key → (score, stderr, size).
    pub groups: BTreeMap<String, SizedScores>,
    /// Group name → its direct children (tasks and groups).
    pub group_children: BTreeMap<String, Vec<String>>,
    pub seconds: f64,
}

impl SuiteResult {
    pub fn new(adapter: &str, tasks: Vec<TaskOutcome>, seconds: f64) -> Self {
        let mut children: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in &tasks {
            let mut child = t.task.clone();
            for g in t.groups.iter().rev() {
                let list = children.entry(g.clone()).or_default();
                if !list.contains(&child) {
                    list.push(child.clone());
                }
                child = g.clone();
            }
        }
        let mut groups: BTreeMap<String, SizedScores> = BTreeMap::new();
        // Innermost groups first: a group's children are done before it.
        let mut pending: Vec<String> = children.keys().cloned().collect();
        while !pending.is_empty() {
            let before = pending.len();
            pending.retain(|g| {
                let kids = &children[g];
                if kids
                    .iter()
                    .any(|k| children.contains_key(k) && !groups.contains_key(k))
                {
                    return true;
                }
                let parts: Vec<SizedScores> = kids
                    .iter()
                    .map(|k| match groups.get(k) {
                        Some(m) => m.clone(),
                        None => tasks
                            .iter()
                            .find(|t| &t.task == k)
                            .map(|t| {
                                t.metrics
                                    .iter()
                                    .map(|(key, (s, se))| (key.clone(), (*s, *se, t.n)))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                    .collect();
                let mut metrics = BTreeMap::new();
                if let Some(first) = parts.first() {
                    for key in first.keys() {
                        let values: Option<Vec<(f64, Option<f64>, usize)>> =
                            parts.iter().map(|p| p.get(key).copied()).collect();
                        if let Some(values) = values {
                            let size = values.iter().map(|v| v.2).sum();
                            let (score, se) = pooled(&values);
                            metrics.insert(key.clone(), (score, se, size));
                        }
                    }
                }
                groups.insert(g.clone(), metrics);
                false
            });
            if pending.len() == before {
                break; // a cycle cannot arise from group paths, but never loop forever
            }
        }
        Self {
            adapter: adapter.to_string(),
            tasks,
            groups,
            group_children: children,
            seconds,
        }
    }

    /// The top-level units (outermost groups and ungrouped tasks) with their metrics, in the
    /// order the tasks ran.
    pub fn headline(&self) -> Vec<(String, Scores)> {
        let mut out: Vec<(String, Scores)> = Vec::new();
        for t in &self.tasks {
            let unit = t.groups.first().cloned().unwrap_or_else(|| t.task.clone());
            if out.iter().any(|(u, _)| *u == unit) {
                continue;
            }
            let metrics = match self.groups.get(&unit) {
                Some(m) => m
                    .iter()
                    .map(|(k, (s, se, _))| (k.clone(), (*s, *se)))
                    .collect(),
                None => t.metrics.clone(),
            };
            out.push((unit, metrics));
        }
        out
    }

    /// Short column names and scores for tables and heatmaps: `unit` alone for a unit with one
    /// metric, else `unit:<filter or metric>`.
    pub fn columns(&self) -> Vec<(String, f64, Option<f64>)> {
        let mut out = Vec::new();
        for (unit, metrics) in self.headline() {
            // The robustness index is a column of its own; it does not make a task's single
            // score ambiguous.
            let scores = metrics
                .keys()
                .filter(|k| !k.starts_with("sensitivity,"))
                .count();
            let several = scores > 1;
            for (key, (score, se)) in metrics {
                let (metric, filter) = key.split_once(',').unwrap_or((key.as_str(), "none"));
                let label = if metric == "sensitivity" {
                    format!("{unit}:sensitivity")
                } else if !several {
                    unit.clone()
                } else if filter == "none" {
                    format!("{unit}:{metric}")
                } else {
                    format!("{unit}:{filter}")
                };
                out.push((label, score, se));
            }
        }
        out
    }

    /// The harness's results JSON for this model.
    pub fn harness_json(&self, prepared: &[PreparedTask], model: &str) -> Value {
        let stderr_value =
            |se: Option<f64>| se.map(Value::from).unwrap_or_else(|| Value::from("N/A"));
        let mut results = Map::new();
        let mut groups = Map::new();
        for t in &self.tasks {
            let mut entry = Map::new();
            entry.insert("alias".into(), Value::from(t.task.clone()));
            for (key, (score, se)) in &t.metrics {
                let (metric, filter) = key.split_once(',').unwrap_or((key.as_str(), "none"));
                entry.insert(key.clone(), Value::from(*score));
                entry.insert(format!("{metric}_stderr,{filter}"), stderr_value(*se));
            }
            results.insert(t.task.clone(), Value::Object(entry));
        }
        for (g, metrics) in &self.groups {
            let mut entry = Map::new();
            entry.insert("alias".into(), Value::from(g.clone()));
            for (key, (score, se, _)) in metrics {
                let (metric, filter) = key.split_once(',').unwrap_or((key.as_str(), "none"));
                entry.insert(key.clone(), Value::from(*score));
                entry.insert(format!("{metric}_stderr,{filter}"), stderr_value(*se));
            }
            results.insert(g.clone(), Value::Object(entry.clone()));
            groups.insert(g.clone(), Value::Object(entry));
        }
        let mut n_samples = Map::new();
        let mut configs = Map::new();
        let mut n_shot = Map::new();
        let mut higher = Map::new();
        for (t, p) in self.tasks.iter().zip(prepared) {
            n_samples.insert(
                t.task.clone(),
                json!({"original": t.original_len, "effective": t.n}),
            );
            let mut config = serde_json::to_value(&p.config).unwrap_or(Value::Null);
            if let Value::Object(c) = &mut config {
                c.insert("num_fewshot".into(), Value::from(p.num_fewshot));
            }
            configs.insert(t.task.clone(), config);
            n_shot.insert(t.task.clone(), Value::from(p.num_fewshot));
            let metrics: Map<String, Value> = t
                .metrics
                .keys()
                .map(|k| {
                    (
                        k.split(',').next().unwrap_or(k).to_string(),
                        Value::Bool(true),
                    )
                })
                .collect();
            higher.insert(t.task.clone(), Value::Object(metrics));
        }
        let truncated: usize = self.tasks.iter().map(|t| t.truncated).sum();
        json!({
            "results": results,
            "groups": groups,
            "group_subtasks": self.group_children,
            "configs": configs,
            "n-shot": n_shot,
            "higher_is_better": higher,
            "n-samples": n_samples,
            "config": {"model": "peft-wit", "model_args": model, "adapter": self.adapter},
            "truncated_contexts": truncated,
            "total_evaluation_time_seconds": format!("{:.2}", self.seconds),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(task: &str, groups: &[&str], score: f64, se: f64, n: usize) -> TaskOutcome {
        TaskOutcome {
            task: task.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            metrics: [("acc,none".to_string(), (score, Some(se)))].into(),
            n,
            original_len: n,
            truncated: 0,
            samples: Vec::new(),
        }
    }

    #[test]
    fn groups_are_weighted_by_size_inner_first() {
        let r = SuiteResult::new(
            "base",
            vec![
                outcome("a", &["g", "g1"], 1.0, 0.1, 10),
                outcome("b", &["g", "g1"], 0.0, 0.1, 30),
                outcome("c", &["g", "g2"], 0.5, 0.2, 40),
                outcome("solo", &[], 0.3, 0.05, 5),
            ],
            1.0,
        );
        assert_eq!(r.groups["g1"]["acc,none"].0, 0.25);
        assert_eq!(r.groups["g1"]["acc,none"].2, 40);
        assert_eq!(
            r.groups["g"]["acc,none"].0,
            (0.25 * 40.0 + 0.5 * 40.0) / 80.0
        );
        assert_eq!(
            r.group_children["g"],
            vec!["g1".to_string(), "g2".to_string()]
        );
        let heads: Vec<String> = r.headline().into_iter().map(|(u, _)| u).collect();
        assert_eq!(heads, vec!["g".to_string(), "solo".to_string()]);
        let json = r.harness_json(&[], "m");
        assert_eq!(json["results"]["a"]["acc,none"], 1.0);
        assert_eq!(json["results"]["a"]["acc_stderr,none"], 0.1);
        assert!(json["groups"]["g"]["acc_stderr,none"].is_number());
    }
}
