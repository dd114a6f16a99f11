//! A set of trainable LoRA pairs for one base model, addressed by (layer, projection).
//!
//! The adapter lives apart from the base model, so one loaded base serves any number of adapters
//! (sweeps train one per loss setting; `eval` switches between them without reloading).

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::{LoraConfig, LoraInit};
use crate::model::config::{module_path, ModelConfig, PROJECTIONS};
use crate::model::linear::LoraPair;
use crate::model::LowRankBranches;
use crate::{Error, Result};

/// The PEFT key of a LoRA factor: `base_model.model.<module path>.lora_{A,B}.weight`.
pub fn peft_key(layer: usize, projection: &str, factor: char) -> String {
    format!(
        "base_model.model.{}.lora_{factor}.weight",
        module_path(layer, projection)
    )
}

/// All LoRA pairs of one adapter.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    /// `[layer][projection index in PROJECTIONS]`.
    layers: Vec<Vec<Option<LoraPair>>>,
}

impl LoraAdapter {
    /// A fresh adapter (B = 0, so it starts as the identity), initialised from `seed`.
    pub fn init(
        config: &LoraConfig,
        model: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for layer in 0..model.num_hidden_layers {
            let selected = if config.includes_layer(layer) {
                config.target_modules.select(layer)?
            } else {
                Vec::new()
            };
            let mut row = Vec::with_capacity(PROJECTIONS.len());
            for proj in PROJECTIONS {
                if !selected.contains(&proj) {
                    row.push(None);
                    continue;
                }
                let (inp, out) = model
                    .projection_shape(proj)
                    .ok_or_else(|| Error::InvalidArgument(format!("unknown module {proj}")))?;
                let a = init_a(config, inp, &mut rng);
                let a = Tensor::from_vec(a, (config.r, inp), device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((out, config.r), dtype, device)?;
                row.push(Some(LoraPair {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                    scale: config.scale(),
                }));
            }
            layers.push(row);
        }
        Ok(Self {
            config: config.clone(),
            layers,
        })
    }

    /// Builds an adapter from already-shaped pairs (used by the PEFT reader and merges).
    pub(crate) fn from_layers(config: LoraConfig, layers: Vec<Vec<Option<LoraPair>>>) -> Self {
        Self { config, layers }
    }

    /// The pair on `(layer, projection index)`, if that module is adapted.
    pub fn pair(&self, layer: usize, projection: usize) -> Option<&LoraPair> {
        self.layers.get(layer)?.get(projection)?.as_ref()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `(PEFT key, var)` for every factor, in PEFT's parameter order (layer, projection, A, B).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (layer, row) in self.layers.iter().enumerate() {
            for (p, pair) in row.iter().enumerate() {
                if let Some(pair) = pair {
                    out.push((peft_key(layer, PROJECTIONS[p], 'A'), pair.a.clone()));
                    out.push((peft_key(layer, PROJECTIONS[p], 'B'), pair.b.clone()));
                }
            }
        }
        out
    }

    /// Every trainable var, for the optimizer.
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// Whether every B factor is zero, so the adapter leaves the base unchanged (as PEFT's
    /// initialisation makes it).
    pub fn is_identity(&self) -> Result<bool> {
        for row in &self.layers {
            for pair in row.iter().flatten() {
                let largest = pair.b.as_tensor().abs()?.max_all()?.to_dtype(DType::F64)?;
                if largest.to_scalar::<f64>()? != 0.0 {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Projection names that carry an adapter somewhere, in PEFT order.
    pub fn target_names(&self) -> Vec<String> {
        PROJECTIONS
            .iter()
            .enumerate()
            .filter(|(p, _)| self.layers.iter().any(|row| row[*p].is_some()))
            .map(|(_, name)| name.to_string())
            .collect()
    }

    /// A deep copy whose vars are independent of this adapter's.
    pub fn detached_copy(&self) -> Result<Self> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for row in &self.layers {
            let mut new_row = Vec::with_capacity(row.len());
            for pair in row {
                new_row.push(match pair {
                    None => None,
                    Some(p) => Some(LoraPair {
                        a: Var::from_tensor(&p.a.as_tensor().copy()?)?,
                        b: Var::from_tensor(&p.b.as_tensor().copy()?)?,
                        scale: p.scale,
                    }),
                });
            }
            layers.push(new_row);
        }
        Ok(Self::from_layers(self.config.clone(), layers))
    }
}

fn init_a(config: &LoraConfig, fan_in: usize, rng: &mut StdRng) -> Vec<f32> {
    let n = config.r * fan_in;
    match config.init {
        LoraInit::Kaiming => {
            // kaiming_uniform_(a=sqrt(5)): gain = sqrt(2/(1+5)), bound = gain*sqrt(3/fan_in).
            let bound = (1.0 / fan_in as f64).sqrt() as f32;
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        }
        LoraInit::Gaussian => {
            let std = 1.0 / config.r as f64;
            (0..n).map(|_| (normal(rng) * std) as f32).collect()
        }
    }
}

/// A standard normal sample (Box–Muller), so results depend on our seeded RNG only.
pub(crate) fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

impl LowRankBranches for LoraAdapter {
    fn pair(&self, layer: usize, projection: usize) -> Option<&LoraPair> {
        LoraAdapter::pair(self, layer, projection)
    }
}
