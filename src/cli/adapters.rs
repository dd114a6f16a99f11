//! `peft-wit adapters {list,show,rm,import,diff}`: look after the adapter registry.

use std::path::PathBuf;

use anyhow::Context;
use peft_wit::lora::TargetModules;
use peft_wit::registry::{self, AdapterDiff, DiffTotals, EntryInfo, Presence, Registry, RunInfo};
use serde_json::json;

use super::common::{open_registry, table};

#[derive(clap::Args)]
pub struct Args {
    /// Registry folder (default: $PEFT_WIT_REGISTRY or adapters/).
    #[arg(long, global = true)]
    registry: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Table of the registry's adapters (and runs in progress).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Everything recorded about one adapter.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete an adapter.
    Rm { name: String },
    /// Register a PEFT adapter directory trained elsewhere.
    Import {
        dir: PathBuf,
        /// Registry name (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
        /// Replace an existing entry of that name.
        #[arg(long)]
        force: bool,
    },
    /// Compare two adapters in weight space (||ΔW||_F and cosine similarity per module).
    Diff {
        /// Registry name or PEFT adapter directory.
        a: String,
        b: String,
        /// Print every module instead of the most different ones.
        #[arg(long)]
        all: bool,
        /// How many of the most different modules to print.
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let registry = open_registry(args.registry.as_deref())?;
    match args.command {
        Command::List { json } => list(&registry, json),
        Command::Show { name, json } => show(&registry, &name, json),
        Command::Rm { name } => {
            registry.remove(&name)?;
            println!("removed {name} from {}", registry.root().display());
            Ok(())
        }
        Command::Import { dir, name, force } => {
            let (path, meta) = registry::import(&registry, &dir, name.as_deref(), force)
                .with_context(|| format!("importing {}", dir.display()))?;
            println!(
                "imported {} as {} (r = {}, alpha = {}, base {}) -> {}",
                dir.display(),
                meta.name,
                meta.lora.r,
                meta.lora.lora_alpha,
                meta.base.name,
                path.display()
            );
            Ok(())
        }
        Command::Diff {
            a,
            b,
            all,
            top,
            json,
        } => diff(&registry, &a, &b, all, top, json),
    }
}

fn list(registry: &Registry, as_json: bool) -> anyhow::Result<()> {
    let entries = registry.entries()?;
    let runs = registry.runs()?;
    if as_json {
        let value = json!({
            "registry": registry.root(),
            "entries": entries.iter().map(entry_json).collect::<Vec<_>>(),
            "runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    if entries.is_empty() && runs.is_empty() {
        println!("no adapters in {}", registry.root().display());
        return Ok(());
    }
    let header = [
        "name",
        "base",
        "λp/λr",
        "norm",
        "r",
        "targets",
        "data",
        "steps",
        "resp_loss",
        "exact",
        "size",
        "created",
        "status",
    ];
    let mut rows: Vec<Vec<String>> = entries.iter().map(entry_row).collect();
    rows.extend(runs.iter().map(run_row));
    print!("{}", table(&header, &rows));
    Ok(())
}

fn entry_row(e: &EntryInfo) -> Vec<String> {
    let dash = || "-".to_string();
    let m = e.meta.as_ref();
    vec![
        e.name.clone(),
        m.map(|m| m.base.name.clone()).unwrap_or_else(dash),
        m.map(|m| weights(&m.loss)).unwrap_or_else(dash),
        m.filter(|m| m.loss.is_known())
            .map(|m| normalization(m.loss.normalization))
            .unwrap_or_else(dash),
        rank(e).map(|r| r.to_string()).unwrap_or_else(dash),
        targets(e).unwrap_or_else(dash),
        m.map(|m| data(&m.data)).unwrap_or_else(dash),
        m.filter(|m| m.train_config.is_some())
            .map(|m| m.steps.to_string())
            .unwrap_or_else(dash),
        metric(e, "response_loss"),
        metric(e, "exact_match"),
        human_size(e.size_bytes),
        m.map(|m| utc(m.created_unix)).unwrap_or_else(dash),
        if e.problems.is_empty() {
            "ok".into()
        } else {
            format!("DAMAGED: {}", e.problems.join("; "))
        },
    ]
}

fn run_row(r: &RunInfo) -> Vec<String> {
    let mut row = vec!["-".to_string(); 13];
    row[0] = r.name.clone();
    row[12] = match r.step {
        Some(s) => format!("in progress (step {s})"),
        None => "in progress".into(),
    };
    row
}

fn entry_json(e: &EntryInfo) -> serde_json::Value {
    let m = e.meta.as_ref();
    let known = m.filter(|m| m.loss.is_known());
    json!({
        "name": e.name,
        "path": e.path,
        "base": m.map(|m| &m.base.name),
        "prompt_weight": known.map(|m| m.loss.prompt_weight),
        "response_weight": known.map(|m| m.loss.response_weight),
        "prompt_weight_schedule": m.and_then(|m| m.loss.prompt_weight_schedule.clone()),
        "response_weight_schedule": m.and_then(|m| m.loss.response_weight_schedule.clone()),
        "normalization": known.map(|m| m.loss.normalization),
        "rank": rank(e),
        "lora_alpha": e.peft.as_ref().map(|p| p.lora_alpha).or(m.map(|m| m.lora.lora_alpha)),
        "targets": targets(e),
        "data_fingerprint": m.and_then(|m| m.data.fingerprint.clone()),
        "data_source": m.map(|m| &m.data.source),
        "steps": m.map(|m| m.steps),
        "metrics": m.map(|m| &m.metrics),
        "size_bytes": e.size_bytes,
        "created_unix": m.map(|m| m.created_unix),
        "created": m.map(|m| utc(m.created_unix)),
        "imported": m.map(|m| m.train_config.is_none()),
        "parent": m.and_then(|m| m.parent.clone()),
        "problems": e.problems,
    })
}

fn show(registry: &Registry, name: &str, as_json: bool) -> anyhow::Result<()> {
    let e = registry.entry(name)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&e)?);
        return Ok(());
    }
    let mut out = vec![
        ("name", e.name.clone()),
        ("path", e.path.display().to_string()),
    ];
    if !e.problems.is_empty() {
        out.push(("status", format!("DAMAGED: {}", e.problems.join("; "))));
    }
    if let Some(m) = &e.meta {
        let b = &m.base;
        out.push((
            "base",
            format!(
                "{} ({}, {} layers, hidden {}, base dtype {}, fingerprint {})",
                b.name,
                b.architecture,
                b.num_layers,
                b.hidden_size,
                b.base_dtype,
                b.fingerprint.as_deref().unwrap_or("-")
            ),
        ));
        let loss = if m.loss.is_known() {
            let scheduled = |fixed: f32, schedule: &Option<String>| match schedule {
                Some(s) => format!("{s} (ended at {fixed})"),
                None => fixed.to_string(),
            };
            let mut s = format!(
                "prompt {} / response {}, {}",
                scheduled(m.loss.prompt_weight, &m.loss.prompt_weight_schedule),
                scheduled(m.loss.response_weight, &m.loss.response_weight_schedule),
                normalization(m.loss.normalization)
            );
            if let Some(w) = m.loss.system_weight {
                s.push_str(&format!(", system {w}"));
            }
            if let Some(w) = m.loss.user_weight {
                s.push_str(&format!(", user {w}"));
            }
            s
        } else {
            "unknown (imported)".into()
        };
        out.push(("loss", loss));
        let d = &m.data;
        out.push((
            "data",
            format!(
                "{} (template {}, {} train / {} eval examples, fingerprint {})",
                d.source,
                d.template,
                d.train_examples,
                d.eval_examples,
                d.fingerprint.as_deref().unwrap_or("-")
            ),
        ));
        out.push((
            "training",
            if m.train_config.is_some() {
                format!(
                    "{} steps, {} tokens, {:.1}s, seed {}",
                    m.steps,
                    m.tokens_seen,
                    m.wall_time_s,
                    m.seed.map_or("-".into(), |s| s.to_string())
                )
            } else {
                "not trained here (imported)".into()
            },
        ));
        if let Some(parent) = &m.parent {
            out.push(("parent", parent.clone()));
        }
        if let Some(d) = &m.dpo {
            out.push((
                "dpo",
                format!(
                    "beta {}, sft weight {}, {} train / {} eval pairs",
                    d.beta, d.sft_weight, d.pairs, d.eval_pairs
                ),
            ));
        }
        for (k, v) in &m.metrics {
            out.push(("metric", format!("{k} = {v:.4}")));
        }
        out.push(("created", utc(m.created_unix)));
    }
    if let Some(p) = &e.peft {
        out.push((
            "lora",
            format!(
                "r = {}, alpha = {}{}, dropout {}, targets {}{}",
                p.r,
                p.lora_alpha,
                if p.use_rslora { " (rsLoRA)" } else { "" },
                p.lora_dropout,
                targets(&e).unwrap_or_else(|| "-".into()),
                match &p.layers_to_transform {
                    Some(l) if !l.is_null() => format!(", layers {l}"),
                    _ => String::new(),
                }
            ),
        ));
        out.push((
            "peft base",
            p.base_model_name_or_path
                .clone()
                .unwrap_or_else(|| "-".into()),
        ));
    }
    for f in &e.files {
        out.push(("file", format!("{} ({})", f.name, human_size(f.size_bytes))));
    }
    out.push(("size", human_size(e.size_bytes)));
    let width = out.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in out {
        println!("{k:<width$}  {v}");
    }
    Ok(())
}

fn diff(
    registry: &Registry,
    a: &str,
    b: &str,
    all: bool,
    top: usize,
    as_json: bool,
) -> anyhow::Result<()> {
    let load = |spec: &str| -> anyhow::Result<_> {
        let dir = registry.resolve(spec)?;
        peft_wit::lora::peft::read_peft(&dir)
            .map(|p| p.adapter)
            .with_context(|| format!("reading {}", dir.display()))
    };
    let (x, y) = (load(a)?, load(b)?);
    let d = registry::diff(&x, &y)?;
    if as_json {
        let value = json!({
            "a": a,
            "b": b,
            "overall": d.overall,
            "layers": d.by_layer(),
            "modules": d.modules,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("A = {a}, B = {b}");
    print_layers(&d);
    let (title, shown) = if all {
        ("modules".to_string(), d.modules.iter().collect::<Vec<_>>())
    } else {
        (
            format!("{} most different modules", top.min(d.modules.len())),
            d.most_different(top),
        )
    };
    println!("\n{title}:");
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|m| {
            let mut row = vec![
                m.module.clone(),
                match m.presence {
                    Presence::Both => "both",
                    Presence::OnlyA => "only A",
                    Presence::OnlyB => "only B",
                }
                .into(),
            ];
            row.extend(totals_cells(&m.totals));
            row
        })
        .collect();
    print_totals_table(["module", "present"], &rows);
    Ok(())
}

fn print_layers(d: &AdapterDiff) {
    let mut rows: Vec<Vec<String>> = d
        .by_layer()
        .iter()
        .map(|l| {
            let mut row = vec![l.layer.to_string(), l.modules.to_string()];
            row.extend(totals_cells(&l.totals));
            row
        })
        .collect();
    let mut overall = vec!["all".to_string(), d.modules.len().to_string()];
    overall.extend(totals_cells(&d.overall));
    rows.push(overall);
    print_totals_table(["layer", "modules"], &rows);
}

/// A table of rows that end in [`totals_cells`], headed by `first` then the totals' columns.
fn print_totals_table(first: [&str; 2], rows: &[Vec<String>]) {
    let mut header = first.to_vec();
    header.extend(["||ΔA||", "||ΔB||", "cos", "||ΔA-ΔB||", "rel diff"]);
    print!("{}", table(&header, rows));
}

fn totals_cells(t: &DiffTotals) -> Vec<String> {
    vec![
        num(t.norm_a),
        num(t.norm_b),
        t.cosine.map_or("-".into(), |c| format!("{c:.4}")),
        num(t.diff_norm),
        format!("{:.4}", t.relative_diff()),
    ]
}

fn num(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if (1e-3..1e4).contains(&x.abs()) {
        format!("{x:.4}")
    } else {
        format!("{x:.3e}")
    }
}

fn weights(loss: &registry::LossInfo) -> String {
    if loss.is_known() {
        let one = |fixed: f32, schedule: &Option<String>| {
            schedule.clone().unwrap_or_else(|| fixed.to_string())
        };
        format!(
            "{}/{}",
            one(loss.prompt_weight, &loss.prompt_weight_schedule),
            one(loss.response_weight, &loss.response_weight_schedule)
        )
    } else {
        "?".into()
    }
}

fn normalization(n: peft_wit::loss::Normalization) -> String {
    match n {
        peft_wit::loss::Normalization::TokenCount => "token-count".into(),
        peft_wit::loss::Normalization::WeightSum => "weight-sum".into(),
    }
}

fn rank(e: &EntryInfo) -> Option<usize> {
    e.peft
        .as_ref()
        .map(|p| p.r)
        .or(e.meta.as_ref().map(|m| m.lora.r))
}

/// Target projections, short (`q,k,v,o`), or `all` for all seven.
fn targets(e: &EntryInfo) -> Option<String> {
    let t = e
        .peft
        .as_ref()
        .map(|p| &p.target_modules)
        .or(e.meta.as_ref().map(|m| &m.lora.target_modules))?;
    Some(match t {
        TargetModules::Pattern(p) if p == "all-linear" => "all".into(),
        TargetModules::Pattern(p) => format!("re:{p}"),
        TargetModules::Names(names) => {
            let known = peft_wit::model::config::PROJECTIONS;
            if known.iter().all(|k| names.iter().any(|n| n == k)) {
                "all".into()
            } else {
                // PEFT order, whatever order the file lists them in.
                let mut sorted: Vec<&String> = names.iter().collect();
                sorted.sort_by_key(|n| known.iter().position(|k| k == n).unwrap_or(usize::MAX));
                sorted
                    .iter()
                    .map(|n| n.strip_suffix("_proj").unwrap_or(n))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        }
    })
}

fn data(d: &registry::DataInfo) -> String {
    let source: String = if d.source.chars().count() > 28 {
        let tail: String = d
            .source
            .chars()
            .rev()
            .take(27)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    } else {
        d.source.clone()
    };
    match &d.fingerprint {
        Some(f) => format!("{} {source}", f.chars().take(8).collect::<String>()),
        None => source,
    }
}

fn metric(e: &EntryInfo, key: &str) -> String {
    e.meta
        .as_ref()
        .and_then(|m| m.metrics.get(key))
        .map_or("-".into(), |v| format!("{v:.4}"))
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut size = bytes as f64;
    let mut unit = 0;
    while size >= 1024.0 && unit + 1 < UNITS.len() {
        size /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{size:.1} {}", UNITS[unit])
    }
}

/// `YYYY-MM-DD HH:MM UTC` from Unix seconds.
fn utc(unix: u64) -> String {
    peft_wit::fsutil::strftime_utc(unix as i64, "%Y-%m-%d %H:%M UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc(1_795_000_000), "2026-11-18 11:06 UTC");
    }
}
