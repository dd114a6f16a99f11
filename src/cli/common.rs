//! Flags and helpers shared by the commands that load a model.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use peft_wit::device::DeviceSpec;
use peft_wit::model::{resolve_model, BaseDType, BaseModel};
use peft_wit::registry::Registry;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct ModelArgs {
    /// GGUF file, Hugging Face directory or Hub id (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    pub model: Option<String>,
    /// How the frozen base is held: f32, f16, bf16 or quantized (GGUF blocks).
    #[arg(long)]
    pub base_dtype: Option<BaseDType>,
    /// cpu, cuda[:N] or metal[:N].
    #[arg(long)]
    pub device: Option<DeviceSpec>,
}

impl ModelArgs {
    /// Loads the base these flags name: f32 on the CPU unless told otherwise.
    pub fn load(&self) -> anyhow::Result<BaseModel> {
        load_model(
            self.model.as_deref(),
            self.base_dtype.unwrap_or(BaseDType::F32),
            self.device.unwrap_or_default(),
        )
    }
}

/// Opens the registry at `path`, or the default one (`$PEFT_WIT_REGISTRY` or `adapters/`).
pub fn open_registry(path: Option<&Path>) -> anyhow::Result<Registry> {
    let root = path
        .map(Path::to_path_buf)
        .unwrap_or_else(peft_wit::registry::default_root);
    Ok(Registry::open(root)?)
}

/// Loads the base model, printing what and how long to stderr.
pub fn load_model(
    model: Option<&str>,
    base_dtype: BaseDType,
    device: DeviceSpec,
) -> anyhow::Result<BaseModel> {
    let location = resolve_model(model)?;
    let device = device.open()?;
    let started = std::time::Instant::now();
    let base = BaseModel::load(&location, base_dtype, &device)
        .with_context(|| format!("loading {location:?}"))?;
    eprintln!(
        "loaded {} ({}, {} layers, base {}) in {:.1}s",
        base.name,
        base.decoder.config.architecture.name(),
        base.decoder.config.num_hidden_layers,
        base_dtype.name(),
        started.elapsed().as_secs_f64()
    );
    Ok(base)
}

/// A stop flag set by Ctrl-C or SIGTERM (a scheduler's cancel, preemption or requeue): the
/// trainer checkpoints and exits cleanly.
pub fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    let installed = ctrlc::set_handler(move || {
        if handler_flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            eprintln!("\nsecond stop request: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nstop requested (Ctrl-C or SIGTERM): finishing the current step, then saving a checkpoint (Ctrl-C again to abort)");
    });
    if let Err(e) = installed {
        eprintln!("warning: cannot install the Ctrl-C handler: {e}");
    }
    flag
}

/// Left-aligned text table with a header rule.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    out.push('\n');
    out.push_str(
        &widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  "),
    );
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.clone()));
        out.push('\n');
    }
    out
}
