//! Crash-safe file writes: write to a temp file beside the target, fsync, rename. A killed
//! process leaves either the old file or the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub mod lock;

pub use lock::{format_unix, hostname, strftime_utc, LockFile, LockOwner};

/// Atomically replaces `path` with `bytes`.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = temp_path(path);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(parent) = parent {
            // Persist the rename itself; not all platforms allow opening a directory.
            if let Ok(dir) = std::fs::File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// A JSON Lines file opened for appending (a run's `metrics.jsonl`): one object per line, each
/// written with a single `write` so a crash loses at most the line being written.
pub struct JsonLines {
    file: std::fs::File,
    path: PathBuf,
}

impl JsonLines {
    pub fn open_append(path: &Path) -> Result<Self> {
        let file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn append<T: serde::Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        let mut text = serde_json::to_string(value).map_err(|error| Error::Json {
            path: self.path.clone(),
            error,
        })?;
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Atomically writes `value` as pretty JSON.
pub fn atomic_write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|error| Error::Json {
        path: path.to_path_buf(),
        error,
    })?;
    text.push('\n');
    atomic_write(path, text.as_bytes())
}

/// Reads and parses a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|error| Error::Json {
        path: path.to_path_buf(),
        error,
    })
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Host, pid and a per-process serial: writers on other hosts of a shared filesystem, or
    // other threads, never share a temp file.
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(
        ".{name}.{}.{}.{serial}.tmp",
        lock::hostname(),
        std::process::id()
    ))
}
