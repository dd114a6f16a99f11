//! A 2 × 2 sweep over (λp, λr) on the built-in tasks, then the grid read back from the registry
//! alone (what any later process sees), best cell first.
//!
//! `cargo run --release --example small_sweep [MODEL] [REGISTRY]`

mod common;

use peft_wit::eval::higher_is_better;
use peft_wit::registry::{AdapterMeta, Registry};
use peft_wit::sweep::{GridSpec, LocalSweep, SweepPlan};
use peft_wit::train::{prepare_data, RunOptions};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next();
    let registry_dir = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("peft-wit-sweep-{}", std::process::id()))
        });
    let base = common::load_base(model.as_deref())?;
    // 10 steps at rank 4 (α = 8) on 80 examples of the built-in tasks.
    let cfg = common::short_run(10, 4, 80);
    // Tokenized once; every cell reuses it with its own weights.
    let data = prepare_data(&cfg, &base)?;
    let registry = Registry::open(&registry_dir)?;
    let metric = "response_loss";
    // The plan (grid, config, fingerprints, tokenized data) goes into the registry first, so
    // the same sweep could also run as cluster cells (`peft-wit sweep run-cell`).
    let grid = GridSpec {
        name: "example-grid".into(),
        prefix: "example-".into(),
        metric: metric.into(),
        prompt_weights: vec![0.0.into(), 0.5.into()],
        response_weights: vec![0.5.into(), 1.0.into()],
        strategy: peft_wit::sweep::Strategy::Grid,
    };
    let plan = SweepPlan::new(&grid, &cfg, &base, &data)?;
    plan.write_or_match(&registry, &data)?;
    LocalSweep {
        base: &base,
        data: &data,
        plan: &plan,
        registry: &registry,
        opts: &RunOptions::default(),
        // Two cells at once, each on its share of the threads.
        lanes: 2,
    }
    .run(|cell, _| eprintln!("cell {} ({}) finished", cell.index, cell.name))?;

    let mut cells: Vec<AdapterMeta> = registry
        .adapter_names()?
        .iter()
        .filter(|name| name.starts_with("example-"))
        .map(|name| AdapterMeta::read(&registry.path(name)))
        .collect::<peft_wit::Result<_>>()?;
    let score = |m: &AdapterMeta| m.metrics.get(metric).copied().unwrap_or(f64::NAN);
    cells.sort_by(|a, b| {
        let (x, y) = (score(a), score(b));
        if higher_is_better(metric) {
            y.total_cmp(&x)
        } else {
            x.total_cmp(&y)
        }
    });
    println!("{:<24} {:>5} {:>5} {:>14}", "adapter", "λp", "λr", metric);
    for m in &cells {
        println!(
            "{:<24} {:>5} {:>5} {:>14.4}",
            m.name,
            m.loss.prompt_weight,
            m.loss.response_weight,
            score(m)
        );
    }
    println!("registry: {}", registry_dir.display());
    Ok(())
}
