//! `peft-wit generate`: a quick look at what a base model (plus adapter) says.

use std::io::Write;

use anyhow::Context;
use peft_wit::generate::{generate_text, GenerationConfig};
use peft_wit::lora::peft::load_peft;

use super::common::{open_registry, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Registry name or PEFT adapter directory.
    #[arg(long)]
    adapter: Option<String>,
    #[arg(long)]
    registry: Option<std::path::PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Render the model's chat template with the prompt as the user turn.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let base = args.model.load()?;
    let adapter = match &args.adapter {
        None => None,
        Some(spec) => {
            let registry = open_registry(args.registry.as_deref())?;
            let dir = registry.resolve(spec)?;
            let adapter = load_peft(
                &dir,
                &base.decoder.config,
                candle_core::DType::F32,
                base.decoder.device(),
            )
            .with_context(|| format!("loading adapter {}", dir.display()))?;
            eprintln!(
                "adapter {} (r={}, {} parameters)",
                dir.display(),
                adapter.config.r,
                adapter.num_parameters()
            );
            Some(adapter)
        }
    };
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop_ids: Vec::new(),
    };
    let mut stdout = std::io::stdout();
    generate_text(
        &base,
        adapter.as_ref(),
        &args.prompt,
        args.chat,
        &config,
        |piece| {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        },
    )?;
    println!();
    Ok(())
}
