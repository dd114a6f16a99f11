//! Registering adapters trained elsewhere. They are read by the one PEFT reader
//! (`lora::peft::read_peft`), without a base model, so everything it refuses is refused here.

use std::path::{Path, PathBuf};

use super::{AdapterMeta, BaseInfo, DataInfo, LossInfo, Registry};
use crate::lora::peft::{hidden_size, read_peft, PeftAdapter, CONFIG_FILE, WEIGHTS_FILE};
use crate::{Error, Result};

/// Registers the PEFT adapter in `dir` as `name` (default: the folder's name). The files are
/// copied into a hidden staging folder and committed under the registry lock, so a failed import
/// leaves nothing behind.
pub fn import(
    registry: &Registry,
    dir: &Path,
    name: Option<&str>,
    force: bool,
) -> Result<(PathBuf, AdapterMeta)> {
    let name = match name {
        Some(n) => n.to_string(),
        None => dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "cannot derive a name from {}: use --name",
                    dir.display()
                ))
            })?,
    };
    super::validate_name(&name)?;
    let PeftAdapter {
        config: peft,
        adapter,
    } = read_peft(dir)?;
    if registry.contains(&name) && !force {
        return Err(Error::AdapterExists {
            name: name.to_string(),
            registry: registry.root().to_path_buf(),
        });
    }
    let source = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let meta = AdapterMeta::untrained(
        name.clone(),
        BaseInfo {
            name: peft
                .base_model_name_or_path
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "unknown".into()),
            fingerprint: None,
            architecture: "unknown".into(),
            base_dtype: "unknown".into(),
            num_layers: adapter.num_layers(),
            hidden_size: hidden_size(&adapter).unwrap_or(0),
        },
        LossInfo::unknown(),
        DataInfo::untrained(
            format!("imported from {}", source.display()),
            "unknown".into(),
        ),
        adapter.config.clone(),
    );

    let staged = registry.trash_path(&format!("import-{name}"));
    let result = (|| {
        std::fs::create_dir_all(&staged).map_err(|e| Error::io(&staged, e))?;
        for file in [CONFIG_FILE, WEIGHTS_FILE] {
            let (from, to) = (dir.join(file), staged.join(file));
            std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
        }
        meta.write(&staged)?;
        registry.commit(&name, &staged, force)
    })();
    match result {
        Ok(path) => Ok((path, meta)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staged);
            Err(e)
        }
    }
}
