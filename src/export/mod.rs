//! Getting adapters out of peft-wit in the forms other tools load: a merged Hugging Face
//! directory, a merged GGUF, llama.cpp's LoRA GGUF, a clean PEFT directory, and new adapters
//! combined from several (`merge-adapters`).
//!
//! Every writer is specified by what its reader expects, and every file appears whole or not at
//! all (temp file or temp dir beside the target, then a rename).

pub mod combine;
pub mod gguf;
pub mod hf;
pub mod merge;
pub mod peft_dir;
pub mod svd;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::lora::config::TargetModules;
use crate::lora::peft::{load_peft, PeftAdapterConfig, CONFIG_FILE};
use crate::lora::LoraAdapter;
use crate::model::config::{module_path, ModelConfig, PROJECTIONS};
use crate::model::ModelLocation;
use crate::{Error, Result};

pub use combine::{combine_adapters, CombineMethod, WeightedAdapter};
pub use gguf::{write_gguf_lora, write_merged_gguf, GgufQuant};
pub use hf::{parse_size, write_hf_dir, HfExportOptions};
pub use merge::{merge_into, merged_weight, with_adapter, Unmerge};
pub use peft_dir::export_peft_dir;

/// Loads a PEFT adapter for `model`, first refusing target modules that peft-wit cannot apply
/// (PEFT itself would adapt them, so silently dropping them would change the model).
pub fn load_adapter(dir: &Path, model: &ModelConfig, device: &Device) -> Result<LoraAdapter> {
    check_target_modules(dir, model)?;
    load_peft(dir, model, DType::F32, device)
}

/// Every name in `target_modules` must select one of the seven projections.
pub fn check_target_modules(dir: &Path, model: &ModelConfig) -> Result<()> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(Error::invalid_file(
            path,
            "not found: not a PEFT adapter directory",
        ));
    }
    let config: PeftAdapterConfig = crate::fsutil::read_json(&path)?;
    if let TargetModules::Names(names) = &config.target_modules {
        for name in names {
            let known = (0..model.num_hidden_layers).any(|layer| {
                PROJECTIONS.iter().any(|p| {
                    let full = module_path(layer, p);
                    name == p || *name == full || full.ends_with(&format!(".{name}"))
                })
            });
            if !known {
                return Err(Error::UnsupportedAdapter {
                    path: dir.to_path_buf(),
                    message: format!(
                        "target module `{name}` is not a projection peft-wit can merge ({})",
                        PROJECTIONS.join(", ")
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The base's configuration alone, without reading any weights (for exports that need only
/// shapes and head counts).
pub fn read_model_config(location: &ModelLocation) -> Result<ModelConfig> {
    match location {
        ModelLocation::HfDir(dir) => ModelConfig::from_hf_file(&dir.join("config.json")),
        ModelLocation::Gguf(path) => {
            let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let content = candle_core::quantized::gguf_file::Content::read(&mut file)
                .map_err(|e| Error::invalid_file(path, format!("not a readable GGUF file: {e}")))?;
            ModelConfig::from_gguf(&content).map_err(|e| match e {
                Error::UnsupportedArchitecture(_) => e,
                other => Error::invalid_file(path, other.to_string()),
            })
        }
    }
}

/// Fails with [`Error::NonFiniteWeight`] when `t` holds a NaN or an infinity.
pub(crate) fn check_finite(name: &str, t: &candle_core::Tensor) -> Result<()> {
    // x - x is 0 for every finite x and NaN otherwise, so the sum is exactly 0 iff all finite.
    let t = t.to_dtype(DType::F32)?;
    let s = t.sub(&t)?.sum_all()?.to_scalar::<f32>()?;
    if s == 0.0 {
        Ok(())
    } else {
        Err(Error::NonFiniteWeight {
            name: name.to_string(),
        })
    }
}

/// A sibling temp path for staging `target` (same filesystem, so the final rename is atomic).
pub(crate) fn staging_path(target: &Path, what: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    target.with_file_name(format!(".{name}.{what}.{}", std::process::id()))
}

/// Moves a finished staging folder or file to `target`. An existing target is replaced only
/// with `force` (an empty directory counts as absent); the old one is moved aside first, so a
/// crash never leaves neither.
pub(crate) fn publish(staged: &Path, target: &Path, force: bool) -> Result<()> {
    let empty_dir = target.is_dir()
        && std::fs::read_dir(target)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
    if empty_dir {
        std::fs::remove_dir(target).map_err(|e| Error::io(target, e))?;
    } else if target.exists() {
        if !force {
            let _ = remove_any(staged);
            return Err(Error::InvalidArgument(format!(
                "{} already exists (use --force to replace it)",
                target.display()
            )));
        }
        let trash = staging_path(target, "replaced");
        std::fs::rename(target, &trash).map_err(|e| Error::io(target, e))?;
        std::fs::rename(staged, target).map_err(|e| Error::io(target, e))?;
        return remove_any(&trash);
    }
    std::fs::rename(staged, target).map_err(|e| Error::io(target, e))
}

pub(crate) fn remove_any(path: &Path) -> Result<()> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else if path.exists() {
        std::fs::remove_file(path)
    } else {
        Ok(())
    };
    r.map_err(|e| Error::io(path, e))
}
