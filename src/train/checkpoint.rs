//! Checkpoints: adapter + optimizer moments + step, written into a fresh folder and then
//! published by atomically rewriting `latest.json`. A crash mid-write leaves the previous
//! checkpoint as the one a resume trusts.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use crate::fsutil::{atomic_write, atomic_write_json, read_json};
use crate::lora::peft::serialize_safetensors;
use crate::lora::LoraAdapter;
use crate::{Error, Result};

const LATEST: &str = "latest.json";

/// What a resume needs besides tensors. The data order, learning rate and dropout masks are
/// functions of `step` and the config, so the step is the whole position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointState {
    pub step: usize,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
    /// Hash of the resolved config: resuming with other settings would not give the same run.
    pub config_hash: String,
    pub data_fingerprint: String,
}

#[derive(Serialize, Deserialize)]
struct Latest {
    dir: String,
    step: usize,
}

pub fn save(
    run_dir: &Path,
    adapter: &LoraAdapter,
    optimizer: &AdamW,
    state: &CheckpointState,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{:06}", state.step);
    let dir = run_dir.join(&name);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let tensors: Vec<(String, Tensor)> = adapter
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    let path = dir.join("adapter.safetensors");
    atomic_write(&path, &serialize_safetensors(&tensors, &path)?)?;
    let path = dir.join("optimizer.safetensors");
    atomic_write(
        &path,
        &serialize_safetensors(&optimizer.state_tensors()?, &path)?,
    )?;
    atomic_write_json(&dir.join("state.json"), state)?;
    atomic_write_json(
        &run_dir.join(LATEST),
        &Latest {
            dir: name.clone(),
            step: state.step,
        },
    )?;
    // Older checkpoints are no longer needed once `latest` points past them.
    if let Ok(entries) = std::fs::read_dir(run_dir) {
        for entry in entries.flatten() {
            let n = entry.file_name().to_string_lossy().into_owned();
            if n.starts_with("checkpoint-") && n != name {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(dir)
}

/// The latest checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let path = run_dir.join(LATEST);
    if !path.is_file() {
        return Ok(None);
    }
    let latest: Latest = read_json(&path)?;
    Ok(Some(run_dir.join(latest.dir)))
}

/// Restores adapter values and optimizer state; returns the saved state.
pub fn restore(
    dir: &Path,
    adapter: &LoraAdapter,
    optimizer: &mut AdamW,
) -> Result<CheckpointState> {
    let state: CheckpointState = read_json(&dir.join("state.json"))?;
    let load = |file: &str| {
        let path = dir.join(file);
        candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| Error::invalid_file(&path, format!("unreadable checkpoint: {e}")))
    };
    let weights = load("adapter.safetensors")?;
    for (key, var) in adapter.named_vars() {
        let t = weights.get(&key).ok_or_else(|| Error::MissingTensor {
            name: key.clone(),
            source_name: dir.display().to_string(),
        })?;
        if t.dims() != var.dims() {
            return Err(Error::ShapeMismatch {
                name: key,
                expected: var.dims().to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    optimizer.load_state(&load("optimizer.safetensors")?, state.step)?;
    Ok(state)
}
