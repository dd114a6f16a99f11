//! New adapters from weighted combinations of existing ones (`peft-wit merge-adapters`).
//!
//! - `cat`: ranks concatenated, `A = [A₁; A₂]`, `B = [w₁s₁B₁, w₂s₂B₂]` with scale 1. Exact:
//!   `B·A = Σ wᵢ sᵢ Bᵢ Aᵢ`.
//! - `linear`: PEFT's `add_weighted_adapter(combination_type="linear")`: same rank required,
//!   `A = Σ √|wᵢ| Aᵢ`, `B = Σ sign(wᵢ) √|wᵢ| sᵢ Bᵢ`. Approximate: the product has cross terms
//!   `Bᵢ Aⱼ`, so it only equals the weighted sum when the adapters share their subspaces.
//! - `svd`: the exact weighted ΔW re-factored to rank `r` by a truncated SVD (best rank-r
//!   approximation in the Frobenius norm).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor, Var};

use super::svd::truncate_product;
use crate::lora::config::{LoraConfig, LoraInit, TargetModules};
use crate::lora::peft::save_peft;
use crate::lora::LoraAdapter;
use crate::lora::LoraPair;
use crate::model::config::{ModelConfig, PROJECTIONS};
use crate::registry::{AdapterMeta, BaseInfo, DataInfo, LossInfo, Registry};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CombineMethod {
    Linear,
    Cat,
    Svd,
}

impl FromStr for CombineMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "linear" => Ok(Self::Linear),
            "cat" => Ok(Self::Cat),
            "svd" => Ok(Self::Svd),
            other => Err(Error::InvalidArgument(format!(
                "unknown combination method `{other}` (linear, cat, svd)"
            ))),
        }
    }
}

impl CombineMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Cat => "cat",
            Self::Svd => "svd",
        }
    }
}

/// One input of a combination.
#[derive(Debug, Clone)]
pub struct WeightedAdapter<'a> {
    pub adapter: &'a LoraAdapter,
    pub weight: f64,
}

/// Parses `a:0.5,b:0.5` (a weight-less entry weighs 1). The last `:` separates the weight so
/// that paths may contain colons.
pub fn parse_weighted_specs(spec: &str) -> Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = match part.rsplit_once(':') {
            Some((name, w)) if w.trim().parse::<f64>().is_ok() => {
                (name.trim(), w.trim().parse::<f64>().unwrap_or(1.0))
            }
            _ => (part, 1.0),
        };
        if !weight.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "weight of `{name}` is not finite"
            )));
        }
        out.push((name.to_string(), weight));
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument(
            "no adapters given (expected e.g. a:0.5,b:0.5)".into(),
        ));
    }
    Ok(out)
}

/// Combines `inputs` into one adapter with scale 1 (`lora_alpha = r`). `rank` is required
/// for `svd` only (default: the largest input rank).
pub fn combine_adapters(
    inputs: &[WeightedAdapter<'_>],
    method: CombineMethod,
    rank: Option<usize>,
) -> Result<LoraAdapter> {
    let first = inputs
        .first()
        .ok_or_else(|| Error::InvalidArgument("no adapters to combine".into()))?;
    let layers = first.adapter.num_layers();
    if inputs.iter().any(|i| i.adapter.num_layers() != layers) {
        return Err(Error::AdapterMismatch {
            path: Default::default(),
            message: "the adapters were made for models with different layer counts".into(),
        });
    }
    let ranks: Vec<usize> = inputs.iter().map(|i| i.adapter.config.r).collect();
    let new_rank = match method {
        CombineMethod::Cat => ranks.iter().sum(),
        CombineMethod::Linear => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(Error::InvalidArgument(format!(
                    "linear combination needs equal ranks, got {ranks:?} (use --method cat or svd)"
                )));
            }
            ranks[0]
        }
        CombineMethod::Svd => rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1)),
    };
    if new_rank == 0 {
        return Err(Error::InvalidArgument(
            "the combined rank must be positive".into(),
        ));
    }
    // The union of adapted layers and projections: PEFT needs one rank everywhere, so modules an
    // input lacks contribute zeros.
    let used_layers: Vec<usize> = (0..layers)
        .filter(|&l| {
            inputs
                .iter()
                .any(|i| (0..PROJECTIONS.len()).any(|p| i.adapter.pair(l, p).is_some()))
        })
        .collect();
    let used_projs: Vec<usize> = (0..PROJECTIONS.len())
        .filter(|&p| {
            inputs
                .iter()
                .any(|i| (0..layers).any(|l| i.adapter.pair(l, p).is_some()))
        })
        .collect();
    let mut rows: Vec<Vec<Option<LoraPair>>> =
        (0..layers).map(|_| vec![None; PROJECTIONS.len()]).collect();
    for &l in &used_layers {
        for &p in &used_projs {
            rows[l][p] = Some(combine_pair(inputs, l, p, method, new_rank)?);
        }
    }
    let config = LoraConfig {
        r: new_rank,
        lora_alpha: new_rank as f64,
        lora_dropout: first.adapter.config.lora_dropout,
        target_modules: TargetModules::Names(
            used_projs
                .iter()
                .map(|&p| PROJECTIONS[p].to_string())
                .collect(),
        ),
        use_rslora: false,
        layers_to_transform: (used_layers.len() != layers).then_some(used_layers),
        init: LoraInit::Kaiming,
    };
    Ok(LoraAdapter::from_layers(config, rows))
}

/// `(in, out)` of projection `p` as seen by any input that adapts it.
fn pair_dims(inputs: &[WeightedAdapter<'_>], l: usize, p: usize) -> Result<(usize, usize)> {
    for i in inputs {
        if let Some(pair) = i.adapter.pair(l, p) {
            return Ok((pair.a.as_tensor().dim(1)?, pair.b.as_tensor().dim(0)?));
        }
    }
    // Another layer's pair of the same projection has the same shape.
    for i in inputs {
        for layer in 0..i.adapter.num_layers() {
            if let Some(pair) = i.adapter.pair(layer, p) {
                return Ok((pair.a.as_tensor().dim(1)?, pair.b.as_tensor().dim(0)?));
            }
        }
    }
    Err(Error::InvalidArgument(format!(
        "no adapter has {}",
        PROJECTIONS[p]
    )))
}

/// Each input's `(A, wᵢ·sᵢ·B)` in f32 on the CPU (zeros where it has no pair).
fn factors(
    inputs: &[WeightedAdapter<'_>],
    l: usize,
    p: usize,
) -> Result<Vec<(Tensor, Tensor, f64)>> {
    let (inp, out) = pair_dims(inputs, l, p)?;
    let cpu = Device::Cpu;
    inputs
        .iter()
        .map(|i| {
            let r = i.adapter.config.r;
            Ok(match i.adapter.pair(l, p) {
                Some(pair) => {
                    let a = pair.a.as_tensor().to_device(&cpu)?.to_dtype(DType::F32)?;
                    let b = pair.b.as_tensor().to_device(&cpu)?.to_dtype(DType::F32)?;
                    if a.dims() != [r, inp] || b.dims() != [out, r] {
                        return Err(Error::AdapterMismatch {
                            path: Default::default(),
                            message: format!(
                                "layer {l} {}: shapes differ between the adapters (made for different bases?)",
                                PROJECTIONS[p]
                            ),
                        });
                    }
                    (a, b, pair.scale)
                }
                None => (
                    Tensor::zeros((r, inp), DType::F32, &cpu)?,
                    Tensor::zeros((out, r), DType::F32, &cpu)?,
                    0.0,
                ),
            })
        })
        .collect()
}

fn combine_pair(
    inputs: &[WeightedAdapter<'_>],
    l: usize,
    p: usize,
    method: CombineMethod,
    rank: usize,
) -> Result<LoraPair> {
    let parts = factors(inputs, l, p)?;
    let (a, b) = match method {
        CombineMethod::Cat => {
            let a: Vec<Tensor> = parts.iter().map(|(a, _, _)| a.clone()).collect();
            let b: Vec<Tensor> = parts
                .iter()
                .zip(inputs)
                .map(|((_, b, s), i)| Ok((b * (i.weight * s))?))
                .collect::<Result<_>>()?;
            (Tensor::cat(&a, 0)?, Tensor::cat(&b, 1)?)
        }
        CombineMethod::Linear => {
            let mut a_sum = parts[0].0.zeros_like()?;
            let mut b_sum = parts[0].1.zeros_like()?;
            for ((a, b, s), i) in parts.iter().zip(inputs) {
                let root = i.weight.abs().sqrt();
                a_sum = (a_sum + (a * root)?)?;
                b_sum = (b_sum + (b * (i.weight.signum() * root * s))?)?;
            }
            (a_sum, b_sum)
        }
        CombineMethod::Svd => {
            let a_cat = Tensor::cat(
                &parts.iter().map(|(a, _, _)| a.clone()).collect::<Vec<_>>(),
                0,
            )?;
            let b_cat = Tensor::cat(
                &parts
                    .iter()
                    .zip(inputs)
                    .map(|((_, b, s), i)| Ok((b * (i.weight * s))?))
                    .collect::<Result<Vec<_>>>()?,
                1,
            )?;
            let (k, inp) = a_cat.dims2()?;
            let out = b_cat.dim(0)?;
            let a64: Vec<f64> = a_cat.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            let b64: Vec<f64> = b_cat.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            let (nb, na, _) = truncate_product(&b64, &a64, out, k, inp, rank);
            (
                Tensor::from_vec(na, (rank, inp), &Device::Cpu)?.to_dtype(DType::F32)?,
                Tensor::from_vec(nb, (out, rank), &Device::Cpu)?.to_dtype(DType::F32)?,
            )
        }
    };
    Ok(LoraPair {
        a: Var::from_tensor(&a)?,
        b: Var::from_tensor(&b)?,
        scale: 1.0,
    })
}

/// One input of a combination as the new adapter's sidecar records it: the spec it was named
/// by, its combination weight, and its sidecar (None for a bare PEFT directory).
pub type CombineSource = (String, f64, Option<AdapterMeta>);

/// A combined adapter to store, with what the sidecar says about it.
#[derive(Clone, Copy)]
pub struct CombineRequest<'a> {
    /// Registry name of the new adapter.
    pub name: &'a str,
    pub adapter: &'a LoraAdapter,
    /// The base model the inputs were loaded against (architecture and sizes for the sidecar).
    pub model: &'a ModelConfig,
    /// The base's name as recorded in the PEFT config and the sidecar.
    pub base_name: &'a str,
    /// The inputs, in order; their sidecars must agree on the base model.
    pub sources: &'a [CombineSource],
    pub method: CombineMethod,
    /// Replace an adapter of that name.
    pub force: bool,
}

/// Writes a combined adapter into the registry as `req.name` (PEFT files + sidecar), staged
/// under `.runs/` and moved into place by [`Registry::commit`].
pub fn commit_combined(registry: &Registry, req: &CombineRequest<'_>) -> Result<PathBuf> {
    let name = req.name;
    crate::registry::validate_name(name)?;
    let meta = combined_meta(req)?;
    let staged = registry
        .run_dir(name)
        .join(format!("merge-{}", std::process::id()));
    super::remove_any(&staged)?;
    let write = |dir: &Path| -> Result<()> {
        save_peft(req.adapter, dir, req.base_name)?;
        meta.write(dir)
    };
    if let Err(e) = write(&staged) {
        let _ = super::remove_any(&staged);
        return Err(e);
    }
    registry.commit(name, &staged, req.force)
}

/// A sidecar for the combination: the base of the inputs (which must agree), the inputs' loss
/// weights averaged by combination weight, and the recipe as the data source.
fn combined_meta(req: &CombineRequest<'_>) -> Result<AdapterMeta> {
    let CombineRequest {
        name,
        adapter,
        model,
        base_name,
        sources,
        method,
        force: _,
    } = *req;
    let recipe = format!(
        "merge-adapters {}: {}",
        method.name(),
        sources
            .iter()
            .map(|(n, w, _)| format!("{n}:{w}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let metas: Vec<(&AdapterMeta, f64)> = sources
        .iter()
        .filter_map(|(_, w, m)| m.as_ref().map(|m| (m, *w)))
        .collect();
    let fingerprints: Vec<&String> = metas
        .iter()
        .filter_map(|(m, _)| m.base.fingerprint.as_ref())
        .collect();
    if fingerprints.windows(2).any(|w| w[0] != w[1]) {
        return Err(Error::AdapterMismatch {
            path: Default::default(),
            message: "the adapters were trained on different base models (fingerprints differ)"
                .into(),
        });
    }
    let total: f64 = metas.iter().map(|(_, w)| w.abs()).sum();
    let avg = |f: &dyn Fn(&AdapterMeta) -> f32, default: f32| -> f32 {
        if total > 0.0 {
            (metas
                .iter()
                .map(|(m, w)| f(m) as f64 * w.abs())
                .sum::<f64>()
                / total) as f32
        } else {
            default
        }
    };
    let first = metas.first().map(|(m, _)| *m);
    Ok(AdapterMeta::untrained(
        name.to_string(),
        BaseInfo {
            name: base_name.to_string(),
            fingerprint: fingerprints.first().map(|s| s.to_string()),
            architecture: model.architecture.name().into(),
            base_dtype: first
                .map(|m| m.base.base_dtype.clone())
                .unwrap_or_else(|| "f32".into()),
            num_layers: model.num_hidden_layers,
            hidden_size: model.hidden_size,
        },
        LossInfo {
            prompt_weight: avg(&|m| m.loss.prompt_weight, 0.0),
            response_weight: avg(&|m| m.loss.response_weight, 1.0),
            system_weight: None,
            user_weight: None,
            normalization: first.map(|m| m.loss.normalization).unwrap_or_default(),
            prompt_weight_schedule: None,
            response_weight_schedule: None,
        },
        DataInfo::untrained(
            recipe,
            first.map(|m| m.data.template.clone()).unwrap_or_default(),
        ),
        adapter.config.clone(),
    ))
}
