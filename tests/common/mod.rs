//! Shared helpers for the integration tests: reference locations, comparisons, tiny models.
#![allow(dead_code)]

pub mod gradcheck;
pub mod tiny;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use peft_wit::data::Batch;
use peft_wit::device::DeviceSpec;
use peft_wit::lora::LoraAdapter;
use peft_wit::loss::{wit_loss, Normalization};
use peft_wit::model::decoder::{Decoder, ForwardContext};

/// The device the reference-parity tests run on: `PEFT_WIT_TEST_DEVICE` (`cpu`, `cuda[:N]`,
/// `metal[:N]`; unset or empty: the CPU). `scripts/device-check.sh` sets it to `cuda` on a GPU
/// machine (the test binary must then be built with `--features cuda`). A device that cannot be
/// opened fails the test rather than falling back to the CPU.
pub fn test_device() -> Device {
    match std::env::var("PEFT_WIT_TEST_DEVICE") {
        Ok(spec) if !spec.trim().is_empty() => spec
            .parse::<DeviceSpec>()
            .and_then(DeviceSpec::open)
            .unwrap_or_else(|e| panic!("PEFT_WIT_TEST_DEVICE={spec}: {e}")),
        _ => Device::Cpu,
    }
}

/// How much looser than the CPU's a parity tolerance is on `device`. The CPU tolerances are
/// tight (about 1e-4 relative on losses) because our CPU kernels and the reference agree that
/// closely; on a GPU, cuBLAS and candle's CUDA reductions sum in another order (and f16/bf16
/// GEMMs may keep partial sums in half precision), so the same f32 comparison gets 10x the room
/// and a half-precision one 2x. Still far below what a wrong kernel produces.
pub fn gpu_slack(device: &Device, half_precision: bool) -> f64 {
    match (device.is_cpu(), half_precision) {
        (true, _) => 1.0,
        (false, false) => 10.0,
        (false, true) => 2.0,
    }
}

/// `../shared/reference` beside the checkout (CI has it too), or `PEFT_WIT_REFERENCE_DIR` where
/// a prebuilt test binary runs away from its checkout (`scripts/device-check.sh --run`).
pub fn reference_dir() -> PathBuf {
    match std::env::var_os("PEFT_WIT_REFERENCE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference"),
    }
}

/// The default model (`$PEFT_WIT_MODELS/<file>`, else the checkout's `models/<file>`), or
/// `None` (with a loud message) when it has not been fetched.
pub fn real_model() -> Option<PathBuf> {
    use peft_wit::model::resolve::{default_model_path, DEFAULT_MODEL_FILE};
    // The library's rule where the variable is set; else the checkout's folder, whatever the
    // test's working directory.
    let path = match std::env::var_os("PEFT_WIT_MODELS") {
        Some(_) => default_model_path(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(DEFAULT_MODEL_FILE),
    };
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: {} is absent; run scripts/fetch-model.sh to run the real-model tests",
            path.display()
        );
        None
    }
}

pub fn read_json(path: PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn usizes(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn rel_err(actual: f64, expected: f64) -> f64 {
    (actual - expected).abs() / expected.abs().max(1e-12)
}

/// For each LoRA factor by key: the L2 norm of its gradient and the gradient's first (up to) 4
/// entries.
pub type FactorGradNorms = HashMap<String, (f64, Vec<f32>)>;

/// Global L2 norm of the gradients of every LoRA factor, and per-key norms.
pub fn lora_grad_norms(
    adapter: &LoraAdapter,
    grads: &candle_core::backprop::GradStore,
) -> (f64, FactorGradNorms) {
    let mut total = 0f64;
    let mut per_key = HashMap::new();
    for (key, var) in adapter.named_vars() {
        let g: &Tensor = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        let flat: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let sq: f64 = flat.iter().map(|x| (*x as f64) * (*x as f64)).sum();
        total += sq;
        per_key.insert(key, (sq.sqrt(), flat[..4.min(flat.len())].to_vec()));
    }
    (total.sqrt(), per_key)
}

/// Row-major `[B * T]` WIT weights of the reference batches: 0 at t = 0 and on padding, λp on
/// prompt positions (t < prompt_len), λr on response positions.
pub fn reference_weights(
    prompt_lens: &[usize],
    seq_lens: &[usize],
    seq: usize,
    lp: f32,
    lr: f32,
) -> Vec<f32> {
    prompt_lens
        .iter()
        .zip(seq_lens)
        .flat_map(|(&pl, &sl)| {
            (0..seq).map(move |t| {
                if t == 0 || t >= sl {
                    0.0
                } else if t < pl {
                    lp
                } else {
                    lr
                }
            })
        })
        .collect()
}

/// The padded batch of a reference file (`input_ids`, `prompt_lens`, `seq_lens`): `rows` rows of
/// `seq` ids, row-major.
pub struct ReferenceBatch {
    pub ids: Vec<u32>,
    pub rows: usize,
    pub seq: usize,
    pub prompt_lens: Vec<usize>,
    pub seq_lens: Vec<usize>,
}

impl ReferenceBatch {
    pub fn from_json(v: &serde_json::Value) -> Self {
        let rows: Vec<Vec<u32>> = v["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(u32s)
            .collect();
        Self {
            rows: rows.len(),
            seq: rows[0].len(),
            ids: rows.concat(),
            prompt_lens: usizes(&v["prompt_lens"]),
            seq_lens: usizes(&v["seq_lens"]),
        }
    }

    /// The batch with the WIT weights of [`reference_weights`].
    pub fn wit_batch(&self, lp: f32, lr: f32) -> Batch {
        Batch {
            ids: self.ids.clone(),
            weights: reference_weights(&self.prompt_lens, &self.seq_lens, self.seq, lp, lr),
            seq_lens: self.seq_lens.clone(),
            batch: self.rows,
            seq_len: self.seq,
        }
    }
}

/// The token-count-normalised WIT loss of `batch` through `decoder` with `adapter`, and its
/// backward pass: the loss, the token count, and the gradient norms of [`lora_grad_norms`].
pub fn wit_loss_and_grad_norms(
    decoder: &Decoder,
    adapter: &LoraAdapter,
    batch: &Batch,
) -> (f64, usize, f64, FactorGradNorms) {
    let mut ctx = ForwardContext {
        adapter: Some(adapter),
        ..Default::default()
    };
    let (loss, count) = wit_loss(decoder, batch, Normalization::TokenCount, &mut ctx).unwrap();
    let grads = loss.backward().unwrap();
    let (global, per_key) = lora_grad_norms(adapter, &grads);
    let loss = loss
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    (loss, count, global, per_key)
}

// Tests that need an outside tool (a Python with tensorboard, a running MLflow server) skip
// loudly on a developer machine and fail under CI (`.ci/run` provides the tools).

/// The value of `var`, or `None` after a loud skip notice. Under CI (`CI` set) a missing
/// variable fails the test, so CI cannot pass without running it.
pub fn required_env(var: &str) -> Option<String> {
    if let Some(v) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
        return Some(v);
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !ci,
        "{var} is not set but CI is: CI must provide it (see .ci/run)"
    );
    // Written to the stderr handle, not eprintln!, so the test harness does not capture it.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** skipped: set {var} to run this test ***\n"
    );
    None
}

/// Logs the scalars the tracking tests read back: `train/loss` = 1/s and `train/lr` = 1e-4·s at
/// steps s = 1..=5, at wall time 1.7e9 + s seconds.
pub fn log_train_scalars(t: &mut peft_wit::tracking::Tracker) {
    for step in 1..=5u64 {
        let s = step as f64;
        t.log_scalars(
            step,
            1.7e9 + s,
            &[("train/loss", 1.0 / s), ("train/lr", 1e-4 * s)],
        );
    }
}

/// A fresh directory path (not created) under the system temp dir.
pub fn temp_path(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!("peft-wit-{name}-{}-{nanos}", std::process::id()))
}
