//! The adapter registry: one folder per adapter (`<root>/<name>/`) holding the PEFT files and
//! peft-wit's sidecar. Entries appear whole or not at all: a run stages its files under
//! `<root>/.runs/<name>/` and the finished adapter is moved into place by a rename, under a lock
//! so that several processes can train into one registry at once.

mod diff;
mod entry;
mod import;
mod load;

pub use diff::{diff, AdapterDiff, DiffTotals, LayerDiff, ModuleDiff, Presence};
pub use entry::{EntryInfo, FileInfo, RunInfo};
pub use import::import;
pub use load::load_for_base;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{atomic_write_json, read_json, LockFile};
use crate::{Error, Result};

/// peft-wit's own metadata beside the PEFT files (never inside adapter_config.json).
pub const SIDECAR_FILE: &str = "peft_wit.json";

/// A run's metric history, one JSON line per logged step (in `.runs/<name>/` while training,
/// kept beside the adapter once it is committed).
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Where the registry lives by default: `$PEFT_WIT_REGISTRY` or `adapters/`.
pub fn default_root() -> PathBuf {
    std::env::var_os("PEFT_WIT_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("adapters"))
}

/// Names are single path components of safe characters: no separators, no `..`, no hidden files.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c));
    if ok && name != "." && name != ".." && !name.contains("..") {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid adapter name `{name}`: use letters, digits and - _ . + (no path separators, no `..`, not starting with `.`)"
        )))
    }
}

/// What peft-wit records about an adapter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterMeta {
    pub format_version: u32,
    pub name: String,
    pub base: BaseInfo,
    pub loss: LossInfo,
    pub data: DataInfo,
    pub lora: crate::lora::LoraConfig,
    /// The full resolved training configuration as the trainer wrote it (absent for imported
    /// adapters). Kept as a plain value: the registry records it, it does not interpret it.
    pub train_config: Option<serde_json::Value>,
    pub seed: Option<u64>,
    /// Final evaluation metrics (`response_loss`, `response_ppl`, `wit_loss`, `exact_match`, ...).
    pub metrics: std::collections::BTreeMap<String, f64>,
    pub steps: usize,
    pub tokens_seen: u64,
    pub wall_time_s: f64,
    pub created_unix: u64,
    /// The registry adapter this one continued training from (DPO from a trained adapter);
    /// absent for adapters trained from scratch and in sidecars written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The preference-tuning settings, for adapters made by `peft-wit dpo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoInfo>,
}

/// How an adapter was preference-tuned from its parent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DpoInfo {
    /// β of the DPO loss (the KL-penalty strength relative to the parent).
    pub beta: f64,
    /// Weight of the added WIT loss on the chosen response (0: plain DPO).
    pub sft_weight: f64,
    /// Training pairs (after skipping bad ones) and held-out pairs.
    pub pairs: usize,
    #[serde(default)]
    pub eval_pairs: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaseInfo {
    pub name: String,
    pub fingerprint: Option<String>,
    pub architecture: String,
    pub base_dtype: String,
    pub num_layers: usize,
    pub hidden_size: usize,
}

/// The loss an adapter was trained under. Imported adapters do not know theirs: their weights are
/// NaN (written as JSON `null`), see [`LossInfo::unknown`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LossInfo {
    #[serde(deserialize_with = "f32_or_nan")]
    pub prompt_weight: f32,
    #[serde(deserialize_with = "f32_or_nan")]
    pub response_weight: f32,
    pub system_weight: Option<f32>,
    pub user_weight: Option<f32>,
    pub normalization: crate::loss::Normalization,
    /// How λp / λr moved during training (`linear:1->0`, ...); absent when fixed. The weights
    /// above are then the ones training ended with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_weight_schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_weight_schedule: Option<String>,
}

impl BaseInfo {
    /// What the sidecar records of the base an adapter was trained on.
    pub fn of(base: &crate::model::BaseModel) -> Self {
        let config = &base.decoder.config;
        Self {
            name: base.name.clone(),
            fingerprint: Some(base.fingerprint.clone()),
            architecture: config.architecture.name().into(),
            base_dtype: base.base_dtype.name().into(),
            num_layers: config.num_hidden_layers,
            hidden_size: config.hidden_size,
        }
    }
}

impl LossInfo {
    /// For adapters trained elsewhere: the weights are unknown.
    pub fn unknown() -> Self {
        Self {
            prompt_weight: f32::NAN,
            response_weight: f32::NAN,
            system_weight: None,
            user_weight: None,
            normalization: crate::loss::Normalization::default(),
            prompt_weight_schedule: None,
            response_weight_schedule: None,
        }
    }

    /// Whether the loss weights were recorded (false for imported adapters).
    pub fn is_known(&self) -> bool {
        self.prompt_weight.is_finite() && self.response_weight.is_finite()
    }
}

/// serde_json writes NaN as `null`; read it back as NaN so unknown weights round-trip.
fn f32_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataInfo {
    pub fingerprint: Option<String>,
    pub source: String,
    pub template: String,
    pub train_examples: usize,
    pub eval_examples: usize,
}

impl DataInfo {
    /// For an entry not trained on data here (imported, combined): `source` says where it came
    /// from.
    pub fn untrained(source: String, template: String) -> Self {
        Self {
            fingerprint: None,
            source,
            template,
            train_examples: 0,
            eval_examples: 0,
        }
    }
}

impl AdapterMeta {
    /// The sidecar of an entry that no training run here produced (imported from PEFT, combined
    /// from others): no training config, seed, metrics or steps; created now.
    pub fn untrained(
        name: String,
        base: BaseInfo,
        loss: LossInfo,
        data: DataInfo,
        lora: crate::lora::LoraConfig,
    ) -> Self {
        Self {
            format_version: 1,
            name,
            base,
            loss,
            data,
            lora,
            train_config: None,
            seed: None,
            metrics: Default::default(),
            steps: 0,
            tokens_seen: 0,
            wall_time_s: 0.0,
            created_unix: crate::fsutil::lock::unix_now(),
            parent: None,
            dpo: None,
        }
    }

    pub fn read(dir: &Path) -> Result<Self> {
        read_json(&dir.join(SIDECAR_FILE))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        atomic_write_json(&dir.join(SIDECAR_FILE), self)
    }
}

/// An open registry folder.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

/// Held while the registry's entries change; released on drop. An exclusively created lock
/// file, so processes on different hosts sharing the registry exclude each other too.
pub struct RegistryLock {
    _file: LockFile,
}

/// How long a change to the registry waits for another one to finish.
const REGISTRY_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl Registry {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join(".runs")).map_err(|e| Error::io(&root, e))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of a finished adapter.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The staging folder of a run in progress (checkpoints, metrics).
    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.root.join(".runs").join(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.path(name).join(SIDECAR_FILE).is_file()
            || self
                .path(name)
                .join(crate::lora::peft::CONFIG_FILE)
                .is_file()
    }

    /// An exclusive lock on the registry (waits until other processes release it).
    pub fn lock(&self) -> Result<RegistryLock> {
        let path = self.root.join(".lock");
        let file = LockFile::acquire(&path, "changing the registry", REGISTRY_LOCK_TIMEOUT)?;
        Ok(RegistryLock { _file: file })
    }

    /// Moves a fully written staging folder into place as `name`. An existing entry is replaced
    /// only with `force`; the old one is moved aside first so a crash never leaves neither.
    pub fn commit(&self, name: &str, staged: &Path, force: bool) -> Result<PathBuf> {
        validate_name(name)?;
        let _lock = self.lock()?;
        let dest = self.path(name);
        if dest.exists() {
            if !force {
                return Err(Error::AdapterExists {
                    name: name.to_string(),
                    registry: self.root.to_path_buf(),
                });
            }
            let trash = self
                .root
                .join(".runs")
                .join(format!(".{name}.replaced.{}", std::process::id()));
            std::fs::rename(&dest, &trash).map_err(|e| Error::io(&dest, e))?;
            std::fs::rename(staged, &dest).map_err(|e| Error::io(&dest, e))?;
            std::fs::remove_dir_all(&trash).map_err(|e| Error::io(&trash, e))?;
        } else {
            std::fs::rename(staged, &dest).map_err(|e| Error::io(&dest, e))?;
        }
        Ok(dest)
    }

    /// Names of the adapters: entries holding an adapter config (a damaged entry is listed by
    /// [`Registry::names`] but is not an adapter), sorted.
    pub fn adapter_names(&self) -> Result<Vec<String>> {
        Ok(self
            .names()?
            .into_iter()
            .filter(|n| self.path(n).join(crate::lora::peft::CONFIG_FILE).is_file())
            .collect())
    }

    /// Names of every entry folder, finished or damaged (hidden folders are bookkeeping), sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(|e| Error::io(&self.root, e))? {
            let entry = entry.map_err(|e| Error::io(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    /// Removes an entry: under the lock it is renamed into `.runs/` (so it vanishes from the
    /// registry at once and whole), then deleted.
    pub fn remove(&self, name: &str) -> Result<()> {
        self.check_existing_name(name)?;
        let _lock = self.lock()?;
        let dest = self.path(name);
        if !dest.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "no adapter `{name}` in {}",
                self.root.display()
            )));
        }
        let trash = self.trash_path(name);
        std::fs::rename(&dest, &trash).map_err(|e| Error::io(&dest, e))?;
        std::fs::remove_dir_all(&trash).map_err(|e| Error::io(&trash, e))
    }

    /// A valid name, or the name of a folder already in the registry (hand-made folders with odd
    /// names are listed as damaged, so they must be removable too).
    pub(crate) fn check_existing_name(&self, name: &str) -> Result<()> {
        match validate_name(name) {
            Ok(()) => Ok(()),
            Err(e) => {
                if self.names()?.iter().any(|n| n == name) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// A fresh hidden folder name under `.runs/` (hidden names are never listed as runs).
    pub(crate) fn trash_path(&self, name: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        self.root
            .join(".runs")
            .join(format!(".{name}.trash.{}.{nanos}", std::process::id()))
    }

    /// Resolves `--adapter`: a registry name, or a path to a PEFT directory.
    pub fn resolve(&self, spec: &str) -> Result<PathBuf> {
        let as_path = Path::new(spec);
        if as_path.join(crate::lora::peft::CONFIG_FILE).is_file() {
            return Ok(as_path.to_path_buf());
        }
        if validate_name(spec).is_ok() && self.path(spec).is_dir() {
            return Ok(self.path(spec));
        }
        Err(Error::InvalidArgument(format!(
            "adapter `{spec}` is neither a name in the registry {} nor a PEFT adapter directory",
            self.root.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for good in ["standard", "wit-p0.2-r0.8", "a_b+c"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "..", "a/b", "../x", ".hidden", "a\\b", "a b", "x..y"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn commit_refuses_overwrite_without_force() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::open(tmp.path()).unwrap();
        for round in 0..2 {
            let staged = reg.run_dir("x").join("final");
            std::fs::create_dir_all(&staged).unwrap();
            std::fs::write(staged.join("f"), format!("{round}")).unwrap();
            if round == 1 {
                let err = reg.commit("x", &staged, false).unwrap_err();
                assert!(err.to_string().contains("--force"), "{err}");
            }
            reg.commit("x", &staged, true).unwrap();
            assert_eq!(
                std::fs::read_to_string(reg.path("x").join("f")).unwrap(),
                format!("{round}")
            );
        }
        assert_eq!(reg.names().unwrap(), vec!["x".to_string()]);
    }
}
