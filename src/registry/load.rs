//! Loading an adapter for a particular loaded base: PEFT shape checks plus, when peft-wit's
//! sidecar is present, the base fingerprint it was trained on.

use std::path::Path;

use candle_core::DType;

use super::{AdapterMeta, SIDECAR_FILE};
use crate::lora::peft::load_peft;
use crate::lora::LoraAdapter;
use crate::model::BaseModel;
use crate::{Error, Result};

/// Loads the PEFT adapter in `dir` for `base`. An adapter whose sidecar names another base
/// fingerprint is refused unless `allow_other_base` (the same model in another file format has
/// another fingerprint, so the override exists).
pub fn load_for_base(dir: &Path, base: &BaseModel, allow_other_base: bool) -> Result<LoraAdapter> {
    if dir.join(SIDECAR_FILE).is_file() {
        let meta = AdapterMeta::read(dir)?;
        if let Some(fp) = &meta.base.fingerprint {
            if fp != &base.fingerprint && !allow_other_base {
                return Err(Error::AdapterMismatch {
                    path: dir.to_path_buf(),
                    message: format!(
                        "trained on base `{}` (fingerprint {fp}), but the loaded base is `{}` (fingerprint {}); pass --allow-other-base if it is the same model in another format",
                        meta.base.name, base.name, base.fingerprint
                    ),
                }
                );
            }
        }
    }
    load_peft(dir, &base.decoder.config, DType::F32, base.decoder.device())
}
