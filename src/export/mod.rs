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

use crate::lora::peft::load_peft;
use crate::lora::LoraAdapter;
use crate::model::config::ModelConfig;
use crate::{Error, Result};

pub use combine::{combine_adapters, CombineMethod, WeightedAdapter};
pub use gguf::{write_gguf_lora, write_merged_gguf, GgufQuant};
pub use hf::{parse_size, write_hf_dir, HfExportOptions};
pub use merge::{merge_into, merged_weight, with_adapter, Unmerge};
pub use peft_dir::export_peft_dir;

/// Loads a PEFT adapter for `model` on `device` (f32) through the one PEFT reader.
pub fn load_adapter(dir: &Path, model: &ModelConfig, device: &Device) -> Result<LoraAdapter> {
    load_peft(dir, model, DType::F32, device)
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

/// Refuses, before any work, to write over a non-empty `target` without `force` (an empty
/// directory counts as absent, as in [`publish`]).
pub(crate) fn check_target_free(target: &Path, force: bool) -> Result<()> {
    let occupied = target.exists()
        && target
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
    if occupied && !force {
        return Err(Error::AlreadyExists {
            path: target.to_path_buf(),
        });
    }
    Ok(())
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
            return Err(Error::AlreadyExists {
                path: target.to_path_buf(),
            });
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
