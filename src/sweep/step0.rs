//! The step-0 evaluation every cell of a sweep shares: all cells start as the same untouched
//! base (B = 0) and differ there only in their loss weights, so the untouched adapter's
//! per-token losses on the held-out split are computed once per plan and weighted per cell
//! ([`TokenLosses`]). They are kept in the plan folder, so cells on other hosts, later waves
//! and a resumed local sweep read them instead of evaluating again.

use std::path::PathBuf;
use std::sync::Arc;

use crate::eval::TokenLosses;
use crate::fsutil::atomic_write_json;
use crate::lora::LoraAdapter;
use crate::model::BaseModel;
use crate::registry::Registry;
use crate::train::PreparedData;
use crate::Result;

use super::plan::{plan_dir, SweepPlan};

/// Where a plan keeps its step-0 per-token losses.
pub fn step0_path(registry: &Registry, plan: &SweepPlan) -> PathBuf {
    plan_dir(registry, &plan.name).join("step0-eval.json")
}

/// The untouched adapter's per-token losses on the plan's held-out split (`None` without one):
/// read from the plan folder when a cell wrote them before, else computed on `base` and
/// written there atomically. Cells that start at once may both compute them; they write the
/// same numbers, and the trainer uses them only where they fit its run.
pub fn shared_step0(
    registry: &Registry,
    plan: &SweepPlan,
    base: &BaseModel,
    data: &PreparedData,
) -> Result<Option<Arc<TokenLosses>>> {
    if data.eval.is_empty() {
        return Ok(None);
    }
    let path = step0_path(registry, plan);
    // A file this version cannot read (or a half-copied one) is computed again and replaced.
    if let Some(stored) = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<TokenLosses>(&bytes).ok())
        .filter(|t| t.examples == data.eval.len())
    {
        return Ok(Some(Arc::new(stored)));
    }
    let cfg = &plan.train_config;
    let decoder = &base.decoder;
    let adapter = LoraAdapter::init(
        &cfg.lora_config()?,
        &decoder.config,
        cfg.seed,
        candle_core::DType::F32,
        decoder.device(),
    )?;
    let scored = TokenLosses::compute(
        decoder,
        Some(&adapter),
        &data.eval,
        cfg.batch_size,
        base.pad_id(),
        true,
    )?;
    atomic_write_json(&path, &scored)?;
    Ok(Some(Arc::new(scored)))
}
