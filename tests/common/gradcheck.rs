//! Finite-difference checks of the gradients of LoRA factors, shared by the trainer's and DPO's
//! gradient tests.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use peft_wit::lora::{LoraAdapter, LoraConfig};
use peft_wit::model::ModelConfig;

/// A rank-2 adapter (α = 4, no dropout) whose B factors are `b_scale · sin(0.73·i + 1.1·k)` at
/// entry `i` of the `k`-th variable: non-zero, so every A gets a gradient, and deterministic
/// (candle's CPU RNG cannot be seeded), so every run checks the same point.
pub fn sine_adapter(
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
    b_scale: f64,
) -> LoraAdapter {
    let lora = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        lora_dropout: 0.0,
        ..Default::default()
    };
    let adapter = LoraAdapter::init(&lora, config, 3, dtype, device).unwrap();
    for (k, (key, var)) in adapter.named_vars().into_iter().enumerate() {
        if key.contains("lora_B") {
            let values: Vec<f64> = (0..var.elem_count())
                .map(|i| b_scale * ((i as f64) * 0.73 + k as f64 * 1.1).sin())
                .collect();
            let t = Tensor::from_vec(values, var.dims(), device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            var.set(&t).unwrap();
        }
    }
    adapter
}

/// Compares autograd (`grads`) with central differences (step 1e-6) of `value_of` on the entries
/// `entries(len)` of every factor of `adapter` (f64) whose key `select` accepts, restoring each
/// entry afterwards. Each relative error must stay under 1e-5; it has an absolute floor of 1e-4
/// for near-zero entries, where the central difference's rounding error (~1e-10 at step 1e-6)
/// dominates. Returns how many entries were checked and the worst relative error.
pub fn check_lora_gradients(
    adapter: &LoraAdapter,
    grads: &GradStore,
    select: impl Fn(&str) -> bool,
    entries: impl Fn(usize) -> [usize; 3],
    value_of: impl Fn(&LoraAdapter) -> f64,
) -> (usize, f64) {
    let eps = 1e-6;
    let (mut checked, mut worst) = (0, 0f64);
    for (key, var) in adapter.named_vars() {
        if !select(&key) {
            continue;
        }
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {key}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let set = |values: Vec<f64>| {
            var.set(&Tensor::from_vec(values, var.dims(), var.device()).unwrap())
                .unwrap()
        };
        for idx in entries(base.len()) {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                set(v);
                value_of(adapter)
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            set(base.clone());
            let err = (numeric - g[idx]).abs() / (numeric.abs() + g[idx].abs()).max(1e-4);
            worst = worst.max(err);
            assert!(
                err < 1e-5,
                "{key}[{idx}]: autograd {} vs finite difference {numeric}",
                g[idx]
            );
            checked += 1;
        }
    }
    (checked, worst)
}
