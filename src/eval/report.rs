//! Writing evaluation results: JSON, CSV, and a self-contained HTML report (tables and inline
//! SVG charts; opens in a browser with no network).

use std::collections::BTreeSet;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::compare::AdapterResult;
use super::higher_is_better;

/// Everything an `eval` run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub model: String,
    pub data: String,
    pub examples: usize,
    pub templates: Vec<String>,
    pub base_load_seconds: f64,
    pub adapters: Vec<AdapterResult>,
}

impl EvalReport {
    /// Metric names present in any result, in a stable order (the comparable ones first).
    pub fn metric_names(&self) -> Vec<String> {
        let all: BTreeSet<String> = self
            .adapters
            .iter()
            .flat_map(|a| a.metrics.keys().cloned())
            .collect();
        let first = [
            "response_loss",
            "response_ppl",
            "wit_loss",
            "exact_match",
            "contains",
            "rouge_l",
            "answer_accuracy",
            "sensitivity",
        ];
        let mut names: Vec<String> = first
            .iter()
            .filter(|m| all.contains(**m))
            .map(|m| m.to_string())
            .collect();
        names.extend(all.into_iter().filter(|m| !first.contains(&m.as_str())));
        names
    }

    /// The index of the best adapter for each metric.
    pub fn best(&self, metric: &str) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, a) in self.adapters.iter().enumerate() {
            let Some(&v) = a.metrics.get(metric) else {
                continue;
            };
            if !v.is_finite() || metric.ends_with("_std") {
                continue;
            }
            let better = match best {
                None => true,
                Some((_, b)) => {
                    if higher_is_better(metric) {
                        v > b
                    } else {
                        v < b
                    }
                }
            };
            if better {
                best = Some((i, v));
            }
        }
        best.map(|(i, _)| i)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn to_csv(&self) -> String {
        let names = self.metric_names();
        let mut out = String::from("name");
        for n in &names {
            out.push(',');
            out.push_str(n);
        }
        out.push('\n');
        for a in &self.adapters {
            out.push_str(&csv_field(&a.name));
            for n in &names {
                out.push(',');
                if let Some(v) = a.metrics.get(n) {
                    let _ = write!(out, "{v}");
                }
            }
            out.push('\n');
        }
        out
    }

    /// Rows for a terminal table: one per adapter, the best value of each column starred.
    pub fn table_rows(&self, metrics: &[String]) -> Vec<Vec<String>> {
        let best: Vec<Option<usize>> = metrics.iter().map(|m| self.best(m)).collect();
        self.adapters
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let mut row = vec![a.name.clone()];
                for (k, m) in metrics.iter().enumerate() {
                    let star = if best[k] == Some(i) { " *" } else { "" };
                    row.push(
                        a.metrics
                            .get(m)
                            .map(|v| format!("{v:.4}{star}"))
                            .unwrap_or_else(|| "-".into()),
                    );
                }
                row
            })
            .collect()
    }

    pub fn to_html(&self) -> String {
        let names = self.metric_names();
        let mut h = String::new();
        let _ = write!(
            h,
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>peft-wit eval</title><style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}.best{{font-weight:bold;background:#e6f4ea}}.gen td{{text-align:left;vertical-align:top;white-space:pre-wrap;max-width:28em}}</style></head><body>"
        );
        let _ = write!(
            h,
            "<h1>peft-wit evaluation</h1><p>Model <b>{}</b>; data <b>{}</b> ({} examples); templates: {}; base loaded once in {:.1}s.</p>",
            esc(&self.model),
            esc(&self.data),
            self.examples,
            esc(&self.templates.join(", ")),
            self.base_load_seconds
        );
        h.push_str("<h2>Metrics</h2><table id=\"metrics\"><tr><th>adapter</th>");
        for n in &names {
            let _ = write!(h, "<th>{}</th>", esc(n));
        }
        h.push_str("<th>seconds</th></tr>");
        for (i, a) in self.adapters.iter().enumerate() {
            let _ = write!(h, "<tr><td>{}</td>", esc(&a.name));
            for n in &names {
                let class = if self.best(n) == Some(i) {
                    " class=\"best\""
                } else {
                    ""
                };
                match a.metrics.get(n) {
                    Some(v) => {
                        let _ = write!(h, "<td{class}>{v:.4}</td>");
                    }
                    None => h.push_str("<td>-</td>"),
                }
            }
            let _ = write!(h, "<td>{:.1}</td></tr>", a.seconds);
        }
        h.push_str("</table>");
        h.push_str("<h2>Charts</h2>");
        for n in names.iter().filter(|n| !n.ends_with("_std")).take(6) {
            h.push_str(&bar_chart(n, &self.adapters));
        }
        if let Some(first) = self.adapters.first() {
            if !first.generations.is_empty() {
                h.push_str("<h2>Generations</h2><table class=\"gen\"><tr><th>prompt</th><th>reference</th>");
                for a in &self.adapters {
                    let _ = write!(h, "<th>{}</th>", esc(&a.name));
                }
                h.push_str("</tr>");
                for (k, g) in first.generations.iter().enumerate().take(8) {
                    let _ = write!(
                        h,
                        "<tr><td>{}</td><td>{}</td>",
                        esc(&truncate(&g.prompt, 400)),
                        esc(&g.reference)
                    );
                    for a in &self.adapters {
                        let out = a
                            .generations
                            .get(k)
                            .map(|g| g.output.as_str())
                            .unwrap_or("");
                        let _ = write!(h, "<td>{}</td>", esc(out));
                    }
                    h.push_str("</tr>");
                }
                h.push_str("</table>");
            }
        }
        h.push_str("</body></html>\n");
        h
    }
}

fn bar_chart(metric: &str, adapters: &[AdapterResult]) -> String {
    let values: Vec<(String, f64)> = adapters
        .iter()
        .filter_map(|a| Some((a.name.clone(), *a.metrics.get(metric)?)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    if values.is_empty() {
        return String::new();
    }
    let max = values
        .iter()
        .map(|(_, v)| v.abs())
        .fold(0.0, f64::max)
        .max(1e-12);
    let (bar_h, label_w, chart_w) = (22.0, 180.0, 360.0);
    let height = bar_h * values.len() as f64 + 30.0;
    let mut s = format!(
        "<figure><figcaption>{}</figcaption><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-size=\"12\">",
        esc(metric),
        label_w + chart_w + 80.0
    );
    for (i, (name, v)) in values.iter().enumerate() {
        let y = 10.0 + i as f64 * bar_h;
        let w = v.abs() / max * chart_w;
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1}\" height=\"{}\" fill=\"#4878d0\"/><text x=\"{}\" y=\"{}\">{v:.4}</text>",
            label_w - 6.0,
            y + 14.0,
            esc(name),
            bar_h - 6.0,
            label_w + w + 4.0,
            y + 14.0
        );
    }
    s.push_str("</svg></figure>");
    s
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
