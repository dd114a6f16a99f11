//! Turning `--model` into files: a GGUF file, a Hugging Face directory, or a Hub id resolved
//! through hf-hub (honouring `HF_HOME` and `HF_HUB_OFFLINE`), defaulting to the fetched model.

use std::path::{Path, PathBuf};

use super::load::ModelLocation;
use crate::{Error, Result};

/// The model `scripts/fetch-model.sh` places under `models/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The same model on the Hugging Face Hub.
pub const DEFAULT_HUB_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// The default model path: `$PEFT_WIT_MODELS/<file>` or `models/<file>`.
pub fn default_model_path() -> PathBuf {
    let dir = std::env::var_os("PEFT_WIT_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"));
    dir.join(DEFAULT_MODEL_FILE)
}

/// Resolves `--model` (or its absence) to files on disk.
pub fn resolve_model(spec: Option<&str>) -> Result<ModelLocation> {
    let Some(spec) = spec else {
        let path = default_model_path();
        if path.is_file() {
            return Ok(ModelLocation::Gguf(path));
        }
        return Err(Error::ModelNotFound(path.display().to_string()));
    };
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(ModelLocation::Gguf(path.to_path_buf()));
    }
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(ModelLocation::HfDir(path.to_path_buf()));
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        return match ggufs.as_slice() {
            [one] => Ok(ModelLocation::Gguf(one.clone())),
            [] => Err(Error::invalid_file(
                path,
                "no config.json and no .gguf file",
            )),
            _ => Err(Error::invalid_file(path, "several .gguf files: name one")),
        };
    }
    if is_hub_id(spec) {
        return resolve_hub(spec).map(ModelLocation::HfDir);
    }
    Err(Error::ModelNotFound(spec.to_string()))
}

fn is_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(owner) && ok(name)
}

/// Files a Hub model needs; the optional ones may be absent.
const REQUIRED: [&str; 1] = ["config.json"];
const OPTIONAL: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "model.safetensors",
];

/// Whether `HF_HUB_OFFLINE` asks for the local cache only.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
        .unwrap_or(false)
}

/// The snapshot directory of `repo_id`, from the local cache (offline) or downloaded.
pub fn resolve_hub(repo_id: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    if offline() {
        return resolve_from_cache(&cache, repo_id);
    }
    match download(repo_id) {
        Ok(dir) => Ok(dir),
        // No network: the cache may still hold the files.
        Err(download_err) => resolve_from_cache(&cache, repo_id).map_err(|_| download_err),
    }
}

/// Looks a repo up in an hf-hub cache (`<cache>/models--owner--name/snapshots/<rev>`).
pub fn resolve_from_cache(cache: &hf_hub::Cache, repo_id: &str) -> Result<PathBuf> {
    let repo = cache.model(repo_id.to_string());
    let config = repo.get("config.json").ok_or_else(|| {
        Error::Hub(format!(
            "`{repo_id}` is not in the local cache {} (HF_HUB_OFFLINE is set or the Hub is unreachable)",
            cache.path().display()
        ))
    })?;
    let dir = config
        .parent()
        .ok_or_else(|| Error::Hub(format!("bad cache layout for {repo_id}")))?
        .to_path_buf();
    if repo.get("model.safetensors").is_none() && repo.get("model.safetensors.index.json").is_none()
    {
        return Err(Error::Hub(format!(
            "`{repo_id}` is cached without model.safetensors (or its index) in {}",
            dir.display()
        )));
    }
    Ok(dir)
}

fn download(repo_id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| Error::Hub(e.to_string()))?;
    let repo = api.model(repo_id.to_string());
    let hub = |e: hf_hub::api::sync::ApiError| Error::Hub(format!("{repo_id}: {e}"));
    let mut dir = None;
    for file in REQUIRED {
        let path = repo.get(file).map_err(hub)?;
        dir = path.parent().map(Path::to_path_buf);
    }
    let mut have_weights = false;
    for file in OPTIONAL {
        if repo.get(file).is_ok() && file == "model.safetensors" {
            have_weights = true;
        }
    }
    if !have_weights {
        let index_path = repo.get("model.safetensors.index.json").map_err(hub)?;
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let index: Index = crate::fsutil::read_json(&index_path)?;
        let mut shards: Vec<&String> = index.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        for shard in shards {
            repo.get(shard).map_err(hub)?;
        }
    }
    dir.ok_or_else(|| Error::Hub(format!("{repo_id}: no files")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised() {
        assert!(is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!is_hub_id("models/a/b"));
        assert!(!is_hub_id("plain"));
        assert!(!is_hub_id("../x"));
    }

    #[test]
    fn offline_cache_lookup_uses_the_snapshot_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = hf_hub::Cache::new(tmp.path().to_path_buf());
        let repo = tmp.path().join("models--owner--tiny");
        let snapshot = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
        // Missing files: a clear error, not a panic.
        let err = resolve_from_cache(&cache, "owner/tiny").unwrap_err();
        assert!(err.to_string().contains("not in the local cache"), "{err}");
        std::fs::write(snapshot.join("config.json"), "{}").unwrap();
        let err = resolve_from_cache(&cache, "owner/tiny").unwrap_err();
        assert!(
            err.to_string().contains("without model.safetensors"),
            "{err}"
        );
        std::fs::write(snapshot.join("model.safetensors"), "").unwrap();
        assert_eq!(resolve_from_cache(&cache, "owner/tiny").unwrap(), snapshot);
    }
}
