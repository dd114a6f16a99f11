//! Train one WIT adapter (λp = 0.2, λr = 0.8) on the built-in tasks and evaluate it beside the
//! untouched base on the held-out split.
//!
//! `cargo run --release --example train_and_evaluate [MODEL] [STEPS]` (MODEL: a GGUF file, a
//! Hugging Face directory or Hub id; default: the model scripts/fetch-model.sh fetches).

mod common;

use peft_wit::eval::evaluate_losses;
use peft_wit::registry::Registry;
use peft_wit::train::{prepare_data, train, LossPreset, RunOptions, TrainConfig, TrainOutcome};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next();
    let steps: usize = args.next().map_or(Ok(20), |s| s.parse())?;
    let base = common::load_base(model.as_deref())?;
    // `steps` steps at rank 8 (α = 16) on 120 examples of the built-in tasks, under the WIT loss.
    let cfg = TrainConfig {
        loss: LossPreset::Wit,
        prompt_weight: 0.2,
        response_weight: 0.8,
        ..common::short_run(steps, 8, 120)
    };
    let data = prepare_data(&cfg, &base)?;
    let registry_dir = tempfile_dir("peft-wit-example-registry")?;
    let registry = Registry::open(&registry_dir)?;
    let TrainOutcome::Finished { meta, .. } =
        train(&base, &data, &cfg, &registry, &RunOptions::default())?
    else {
        anyhow::bail!("training was interrupted");
    };

    // The same held-out examples, weights and normalisation for the base and the adapter.
    let weights = peft_wit::data::LossWeights {
        prompt: 0.2,
        response: 0.8,
        system: None,
        user: None,
    };
    let base_losses = evaluate_losses(&base, None, &data.eval, &weights, cfg.normalization, 4)?
        .ok_or_else(|| anyhow::anyhow!("no held-out examples"))?;
    println!("{:<10} {:>14} {:>9}", "", "response loss", "WIT loss");
    println!(
        "{:<10} {:>14.4} {:>9.4}",
        "base", base_losses.response_loss, base_losses.wit_loss
    );
    println!(
        "{:<10} {:>14.4} {:>9.4}",
        meta.name, meta.metrics["response_loss"], meta.metrics["wit_loss"]
    );
    println!(
        "adapter written to {}",
        registry_dir.join(&meta.name).display()
    );
    Ok(())
}

/// A fresh folder under the system's temp dir.
fn tempfile_dir(prefix: &str) -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
