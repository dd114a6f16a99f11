//! Comparing two adapters in weight space from their low-rank factors, never forming
//! ΔW = s·B·A (`[out, in]`, far larger than the factors):
//!
//! <ΔW1, ΔW2>_F = s1·s2·tr((B1ᵀB2)(A2A1ᵀ)) = s1·s2·Σ (B1ᵀB2) ⊙ (A1A2ᵀ),  O(r1·r2·(in + out)).

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::lora::{LoraAdapter, LoraPair};
use crate::model::config::{module_path, PROJECTIONS};
use crate::{Error, Result};

/// Which adapters carry a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Both,
    OnlyA,
    OnlyB,
}

/// Norms and similarity of two updates (a module, a layer, or the whole adapter).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DiffTotals {
    /// ||ΔW_a||_F
    pub norm_a: f64,
    pub norm_b: f64,
    /// <ΔW_a, ΔW_b>_F
    pub inner: f64,
    /// inner / (norm_a·norm_b); `None` when either update is zero.
    pub cosine: Option<f64>,
    /// ||ΔW_a − ΔW_b||_F
    pub diff_norm: f64,
}

impl DiffTotals {
    fn from_parts(sq_a: f64, sq_b: f64, inner: f64) -> Self {
        let (norm_a, norm_b) = (sq_a.max(0.0).sqrt(), sq_b.max(0.0).sqrt());
        let cosine =
            (norm_a > 0.0 && norm_b > 0.0).then(|| (inner / (norm_a * norm_b)).clamp(-1.0, 1.0));
        // Rounding can make the expansion slightly negative for near-identical updates.
        let diff_norm = (sq_a + sq_b - 2.0 * inner).max(0.0).sqrt();
        Self {
            norm_a,
            norm_b,
            inner,
            cosine,
            diff_norm,
        }
    }

    fn sum<'a>(items: impl Iterator<Item = &'a DiffTotals>) -> Self {
        let (mut sa, mut sb, mut inner) = (0.0, 0.0, 0.0);
        for t in items {
            sa += t.norm_a * t.norm_a;
            sb += t.norm_b * t.norm_b;
            inner += t.inner;
        }
        Self::from_parts(sa, sb, inner)
    }

    /// ||ΔW_a − ΔW_b|| / (||ΔW_a|| + ||ΔW_b||): 0 for equal updates, 1 for opposite ones or a
    /// module only one adapter has; scale-free, so modules of different sizes rank together.
    pub fn relative_diff(&self) -> f64 {
        let total = self.norm_a + self.norm_b;
        if total > 0.0 {
            self.diff_norm / total
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModuleDiff {
    pub layer: usize,
    pub projection: String,
    /// `model.layers.{layer}.{block}.{projection}`
    pub module: String,
    pub presence: Presence,
    #[serde(flatten)]
    pub totals: DiffTotals,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerDiff {
    pub layer: usize,
    pub modules: usize,
    #[serde(flatten)]
    pub totals: DiffTotals,
}

/// The comparison of two adapters, per module (layer-major, PEFT order) and overall. The overall
/// numbers treat each adapter as one vector of all its ΔW, so modules only one has count fully
/// in its norm and not at all in the inner product.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdapterDiff {
    pub modules: Vec<ModuleDiff>,
    pub overall: DiffTotals,
}

impl AdapterDiff {
    /// Per-layer sums (layers with no adapted module in either adapter are left out).
    pub fn by_layer(&self) -> Vec<LayerDiff> {
        let mut out: Vec<LayerDiff> = Vec::new();
        let layers = self
            .modules
            .iter()
            .map(|m| m.layer)
            .max()
            .map_or(0, |l| l + 1);
        for layer in 0..layers {
            let mods: Vec<&ModuleDiff> = self.modules.iter().filter(|m| m.layer == layer).collect();
            if mods.is_empty() {
                continue;
            }
            out.push(LayerDiff {
                layer,
                modules: mods.len(),
                totals: DiffTotals::sum(mods.iter().map(|m| &m.totals)),
            });
        }
        out
    }

    /// The `k` modules with the largest relative difference, most different first.
    pub fn most_different(&self, k: usize) -> Vec<&ModuleDiff> {
        let mut sorted: Vec<&ModuleDiff> = self.modules.iter().collect();
        sorted.sort_by(|x, y| {
            y.totals
                .relative_diff()
                .total_cmp(&x.totals.relative_diff())
                .then(y.totals.diff_norm.total_cmp(&x.totals.diff_norm))
        });
        sorted.truncate(k);
        sorted
    }
}

/// Compares `a` and `b` module by module. Modules adapted in both must have the same
/// `[out, in]`; ranks and scales may differ.
pub fn diff(a: &LoraAdapter, b: &LoraAdapter) -> Result<AdapterDiff> {
    let mut modules = Vec::new();
    for layer in 0..a.num_layers().max(b.num_layers()) {
        for (p, projection) in PROJECTIONS.iter().enumerate() {
            let (pa, pb) = (a.pair(layer, p), b.pair(layer, p));
            let module = module_path(layer, projection);
            let (presence, totals) = match (pa, pb) {
                (None, None) => continue,
                (Some(x), None) => (
                    Presence::OnlyA,
                    DiffTotals::from_parts(inner(x, x)?, 0.0, 0.0),
                ),
                (None, Some(y)) => (
                    Presence::OnlyB,
                    DiffTotals::from_parts(0.0, inner(y, y)?, 0.0),
                ),
                (Some(x), Some(y)) => {
                    let (sx, sy) = (shape(x)?, shape(y)?);
                    if sx != sy {
                        return Err(Error::ShapeMismatch {
                            name: format!("{module} ΔW [out, in] of the second adapter"),
                            expected: sx.to_vec(),
                            actual: sy.to_vec(),
                        });
                    }
                    (
                        Presence::Both,
                        DiffTotals::from_parts(inner(x, x)?, inner(y, y)?, inner(x, y)?),
                    )
                }
            };
            modules.push(ModuleDiff {
                layer,
                projection: projection.to_string(),
                module,
                presence,
                totals,
            });
        }
    }
    let overall = DiffTotals::sum(modules.iter().map(|m| &m.totals));
    Ok(AdapterDiff { modules, overall })
}

/// `[out, in]` of ΔW = B·A.
fn shape(p: &LoraPair) -> Result<[usize; 2]> {
    Ok([p.b.dim(0)?, p.a.dim(1)?])
}

/// <s_x·B_x·A_x, s_y·B_y·A_y>_F from the factors, in f64 on the CPU.
fn inner(x: &LoraPair, y: &LoraPair) -> Result<f64> {
    let f64_cpu =
        |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?) };
    let (ax, bx) = (f64_cpu(x.a.as_tensor())?, f64_cpu(x.b.as_tensor())?);
    let (ay, by) = (f64_cpu(y.a.as_tensor())?, f64_cpu(y.b.as_tensor())?);
    let btb = bx.t()?.matmul(&by)?; // [r_x, r_y]
    let aat = ax.matmul(&ay.t()?)?; // [r_x, r_y]
    let trace = (btb * aat)?.sum_all()?.to_scalar::<f64>()?;
    Ok(x.scale * y.scale * trace)
}
