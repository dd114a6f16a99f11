//! `peft-wit export`: an adapter in a form another tool loads (llama.cpp's LoRA GGUF, or a clean
//! PEFT directory for the Hub).

use super::common::open_registry;
use std::path::PathBuf;

use anyhow::Context;
use peft_wit::export::{export_peft_dir, load_adapter, write_gguf_lora};
use peft_wit::model::read_model_config;

#[derive(clap::Args)]
pub struct Args {
    /// Registry name or PEFT adapter directory.
    #[arg(long)]
    adapter: String,
    #[arg(long)]
    registry: Option<PathBuf>,
    /// gguf-lora (llama.cpp `--lora`) or peft (adapter_config.json + safetensors + README.md).
    #[arg(long)]
    format: String,
    /// Output file (gguf-lora) or directory (peft).
    #[arg(long)]
    out: PathBuf,
    /// The base model (only its config is read; default: the default model).
    #[arg(long)]
    model: Option<String>,
    /// Store gguf-lora tensors as F16 instead of F32.
    #[arg(long)]
    f16: bool,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let format = args.format.to_ascii_lowercase();
    if !matches!(format.as_str(), "gguf-lora" | "peft") {
        anyhow::bail!("unknown --format `{format}` (gguf-lora, peft)");
    }
    let registry = open_registry(args.registry.as_deref())?;
    let dir = registry.resolve(&args.adapter)?;
    let location = peft_wit::model::resolve_model(args.model.as_deref())?;
    let config = read_model_config(&location)
        .with_context(|| format!("reading the config of {location:?}"))?;
    if format == "peft" {
        export_peft_dir(&dir, &config, &args.out, args.force)?;
    } else {
        let adapter = load_adapter(&dir, &config, &candle_core::Device::Cpu)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        write_gguf_lora(&adapter, &config, &args.out, args.f16, args.force)?;
    }
    eprintln!(
        "exported {} -> {} ({format})",
        dir.display(),
        args.out.display()
    );
    Ok(())
}
