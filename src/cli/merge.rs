//! `peft-wit merge` (an adapter folded into its base, written as a Hugging Face directory or a
//! GGUF) and `peft-wit merge-adapters` (a weighted combination written into the registry).

use std::path::PathBuf;

use anyhow::Context;
use peft_wit::export::combine::{commit_combined, parse_weighted_specs, CombineRequest};
use peft_wit::export::hf::parse_dtype;
use peft_wit::export::{
    combine_adapters, load_adapter, parse_size, write_hf_dir, write_merged_gguf, CombineMethod,
    GgufQuant, HfExportOptions, WeightedAdapter,
};
use peft_wit::registry::{AdapterMeta, SIDECAR_FILE};

use super::common::{open_registry, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Registry name or PEFT adapter directory.
    #[arg(long)]
    adapter: String,
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Output directory (hf) or file (gguf).
    #[arg(long)]
    out: PathBuf,
    /// hf (safetensors + config + tokenizer) or gguf (default: gguf when --out ends in .gguf).
    #[arg(long)]
    format: Option<String>,
    /// Tensor dtype of the hf output: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Weight type of the gguf output: f32, f16, q8_0, q4_0, q4_1, q4_k, q6_k.
    #[arg(long, default_value = "f16")]
    quant: String,
    /// Shard the hf output above this size (e.g. 2GB, 500MB).
    #[arg(long, default_value = "2GB")]
    max_shard_size: String,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Validate the cheap flags before loading anything.
    let is_gguf_path = args
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let format = match &args.format {
        Some(f) => f.to_ascii_lowercase(),
        None if is_gguf_path => "gguf".into(),
        None => "hf".into(),
    };
    let (hf_options, quant) = match format.as_str() {
        "hf" | "safetensors" => (
            Some(HfExportOptions {
                dtype: parse_dtype(&args.dtype)?,
                max_shard_size: parse_size(&args.max_shard_size)?,
                force: args.force,
            }),
            None,
        ),
        "gguf" => (None, Some(args.quant.parse::<GgufQuant>()?)),
        other => anyhow::bail!("unknown --format `{other}` (hf, gguf)"),
    };
    let registry = open_registry(args.registry.as_deref())?;
    let dir = registry.resolve(&args.adapter)?;
    let base = args.model.load()?;
    let adapter = load_adapter(&dir, &base.decoder.config, base.decoder.device())
        .with_context(|| format!("loading adapter {}", dir.display()))?;
    let started = std::time::Instant::now();
    if let Some(options) = hf_options {
        write_hf_dir(&base, Some(&adapter), &args.out, &options)?;
    } else if let Some(quant) = quant {
        write_merged_gguf(&base, Some(&adapter), &args.out, quant, args.force)?;
    }
    eprintln!(
        "merged {} into {} -> {} ({:.1}s)",
        dir.display(),
        base.name,
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct CombineArgs {
    /// Adapters and weights: `a:0.5,b:0.5` (registry names or PEFT directories).
    adapters: String,
    /// linear (same rank, approximate), cat (exact, ranks add up) or svd (exact sum truncated to --rank).
    #[arg(long, default_value = "cat")]
    method: String,
    /// Rank of the result for --method svd (default: the largest input rank).
    #[arg(long)]
    rank: Option<usize>,
    /// Name of the new adapter in the registry.
    #[arg(long)]
    out: String,
    /// The base model the adapters belong to (for shape checks).
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    registry: Option<PathBuf>,
    #[arg(long)]
    force: bool,
}

pub fn run_combine(args: CombineArgs) -> anyhow::Result<()> {
    let method: CombineMethod = args.method.parse()?;
    if args.rank.is_some() && method != CombineMethod::Svd {
        anyhow::bail!("--rank applies to --method svd only");
    }
    peft_wit::registry::validate_name(&args.out)?;
    let specs = parse_weighted_specs(&args.adapters)?;
    let registry = open_registry(args.registry.as_deref())?;
    let location = peft_wit::model::resolve_model(args.model.as_deref())?;
    let config = peft_wit::model::read_model_config(&location)?;
    let mut adapters = Vec::new();
    let mut sources = Vec::new();
    for (spec, weight) in &specs {
        let dir = registry.resolve(spec)?;
        let adapter = load_adapter(&dir, &config, &candle_core::Device::Cpu)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        let meta = if dir.join(SIDECAR_FILE).is_file() {
            Some(AdapterMeta::read(&dir)?)
        } else {
            None
        };
        adapters.push(adapter);
        sources.push((spec.clone(), *weight, meta));
    }
    let base_name = sources
        .iter()
        .find_map(|(_, _, m)| m.as_ref().map(|m| m.base.name.clone()))
        .unwrap_or_else(|| location_name(&location));
    let inputs: Vec<WeightedAdapter<'_>> = adapters
        .iter()
        .zip(&specs)
        .map(|(adapter, (_, weight))| WeightedAdapter {
            adapter,
            weight: *weight,
        })
        .collect();
    let combined = combine_adapters(&inputs, method, args.rank)?;
    let path = commit_combined(
        &registry,
        &CombineRequest {
            name: &args.out,
            adapter: &combined,
            model: &config,
            base_name: &base_name,
            sources: &sources,
            method,
            force: args.force,
        },
    )?;
    eprintln!(
        "combined {} adapters ({}, r = {}) -> {}",
        specs.len(),
        method.name(),
        combined.config.r,
        path.display()
    );
    Ok(())
}

fn location_name(location: &peft_wit::model::ModelLocation) -> String {
    match location {
        peft_wit::model::ModelLocation::Gguf(p) | peft_wit::model::ModelLocation::HfDir(p) => {
            p.display().to_string()
        }
    }
}
