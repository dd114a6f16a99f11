//! Inspecting entries without loading their tensors: what `adapters list` / `show` print. A
//! damaged entry is described by its problems instead of failing the whole listing.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{AdapterMeta, Registry, SIDECAR_FILE};
use crate::fsutil::read_json;
use crate::lora::peft::{read_peft_config, PeftAdapterConfig, CONFIG_FILE, WEIGHTS_FILE};
use crate::{Error, Result};

/// One finished entry as found on disk.
#[derive(Debug, Clone, Serialize)]
pub struct EntryInfo {
    pub name: String,
    pub path: PathBuf,
    /// `None` when the sidecar is missing or unreadable (see `problems`).
    pub meta: Option<AdapterMeta>,
    pub peft: Option<PeftAdapterConfig>,
    pub files: Vec<FileInfo>,
    pub size_bytes: u64,
    /// Empty for a healthy entry.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileInfo {
    pub name: String,
    pub size_bytes: u64,
}

/// A run staged in `.runs/` that has not been committed (training now, or interrupted).
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub name: String,
    /// The last checkpointed step (`latest.json`), else the last step in `metrics.jsonl`.
    pub step: Option<usize>,
}

impl EntryInfo {
    pub fn is_healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Registry {
    /// Every finished entry, healthy or not, sorted by name.
    pub fn entries(&self) -> Result<Vec<EntryInfo>> {
        // No name validation here: a hand-made folder with an odd name is listed, not fatal.
        Ok(self.names()?.iter().map(|n| self.inspect(n)).collect())
    }

    /// One entry; an error only when there is no such folder (damage is reported in `problems`).
    pub fn entry(&self, name: &str) -> Result<EntryInfo> {
        self.check_existing_name(name)?;
        if !self.path(name).is_dir() {
            return Err(Error::InvalidArgument(format!(
                "no adapter `{name}` in {}",
                self.root().display()
            )));
        }
        Ok(self.inspect(name))
    }

    fn inspect(&self, name: &str) -> EntryInfo {
        let path = self.path(name);
        let mut problems = Vec::new();
        let meta = match AdapterMeta::read(&path) {
            Ok(m) => Some(m),
            Err(Error::Io { error: source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                problems.push(format!("no {SIDECAR_FILE}"));
                None
            }
            Err(e) => {
                problems.push(format!("unreadable {SIDECAR_FILE}: {}", short(&e)));
                None
            }
        };
        let peft = if !path.join(CONFIG_FILE).is_file() {
            problems.push(format!("no {CONFIG_FILE}"));
            None
        } else {
            match read_peft_config(&path) {
                Ok(c) => Some(c),
                Err(e) => {
                    problems.push(format!("unreadable {CONFIG_FILE}: {}", short(&e)));
                    None
                }
            }
        };
        if let Some(p) = check_weights(&path.join(WEIGHTS_FILE)) {
            problems.push(p);
        }
        let files = list_files(&path).unwrap_or_else(|e| {
            problems.push(format!("cannot list files: {}", short(&e)));
            Vec::new()
        });
        let size_bytes = files.iter().map(|f| f.size_bytes).sum();
        EntryInfo {
            name: name.to_string(),
            path,
            meta,
            peft,
            files,
            size_bytes,
            problems,
        }
    }

    /// Runs staged in `.runs/` (hidden folders there are trash or imports, not runs).
    pub fn runs(&self) -> Result<Vec<RunInfo>> {
        let dir = self.root().join(".runs");
        let mut runs = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(runs),
            Err(e) => return Err(Error::io(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            let step = latest_step(&entry.path()).or_else(|| last_metrics_step(&entry.path()));
            runs.push(RunInfo { name, step });
        }
        runs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(runs)
    }
}

/// The error's message without the (already known) path prefix, for one-line problem reports.
fn short(e: &Error) -> String {
    match e {
        Error::Json { error: source, .. } => source.to_string(),
        Error::Io { error: source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Reads only the safetensors header and checks the file is as long as it says: catches missing
/// and truncated weights without loading them.
fn check_weights(path: &Path) -> Option<String> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some(format!("missing weights ({WEIGHTS_FILE})"))
        }
        Err(e) => return Some(format!("unreadable {WEIGHTS_FILE}: {e}")),
    };
    let bad = |why: &str| Some(format!("damaged {WEIGHTS_FILE}: {why}"));
    let len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return Some(format!("unreadable {WEIGHTS_FILE}: {e}")),
    };
    let mut n = [0u8; 8];
    if file.read_exact(&mut n).is_err() {
        return bad("shorter than its header");
    }
    let header_len = u64::from_le_bytes(n);
    if header_len > len.saturating_sub(8) || header_len > 100_000_000 {
        return bad("header length exceeds the file");
    }
    let mut header = vec![0u8; header_len as usize];
    if file.read_exact(&mut header).is_err() {
        return bad("truncated header");
    }
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(&header)
    else {
        return bad("header is not a JSON object");
    };
    let data_end = map
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    if map.keys().all(|k| k == "__metadata__") {
        return bad("no tensors");
    }
    if 8 + header_len + data_end != len {
        return bad(&format!(
            "{} bytes, the header describes {}",
            len,
            8 + header_len + data_end
        ));
    }
    None
}

fn list_files(dir: &Path) -> Result<Vec<FileInfo>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let meta = entry.metadata().map_err(|e| Error::io(entry.path(), e))?;
        if meta.is_file() {
            files.push(FileInfo {
                name: entry.file_name().to_string_lossy().into_owned(),
                size_bytes: meta.len(),
            });
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

fn latest_step(run: &Path) -> Option<usize> {
    let v: serde_json::Value = read_json(&run.join("latest.json")).ok()?;
    v.get("step")?.as_u64().map(|s| s as usize)
}

fn last_metrics_step(run: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(run.join(super::METRICS_FILE)).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("step")?.as_u64())
        .map(|s| s as usize)
}
