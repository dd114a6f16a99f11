//! Finite-difference gradient checks (f64) of the whole training path on tiny random models
//! built in code: embedding, rms norm, rotary embedding, attention softmax with causal and
//! padding masks, SiLU-gated MLP, q/k/v biases, the frozen dense and quantized matmuls, LoRA,
//! and the weighted loss.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use peft_wit::data::Batch;
use peft_wit::lora::{LoraAdapter, LoraConfig};
use peft_wit::loss::{wit_loss, Normalization};
use peft_wit::model::decoder::ForwardContext;
use peft_wit::model::random::{random_decoder, tiny_config};

fn batch() -> Batch {
    // Two rows, the second right-padded; prompt weight 0.3, response weight 0.9.
    let ids = vec![1, 5, 9, 13, 17, 21, 25, 2, 1, 7, 11, 19, 23, 2, 2, 2];
    let lens = [8usize, 6];
    let prompt = [4usize, 3];
    let mut weights = vec![0f32; 16];
    for b in 0..2 {
        for t in 1..lens[b] {
            weights[b * 8 + t] = if t < prompt[b] { 0.3 } else { 0.9 };
        }
    }
    Batch {
        ids,
        weights,
        seq_lens: lens.to_vec(),
        batch: 2,
        seq_len: 8,
    }
}

/// Central differences on a few entries of several LoRA factors vs autograd.
fn check(config: peft_wit::model::ModelConfig, quantize: Option<GgmlDType>) {
    let device = Device::Cpu;
    let qkv_bias = config.qkv_bias;
    let decoder = random_decoder(&config, 7, DType::F64, quantize, &device).unwrap();
    let lora = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        lora_dropout: 0.0,
        ..Default::default()
    };
    let adapter = LoraAdapter::init(&lora, &config, 3, DType::F64, &device).unwrap();
    // Non-zero B so every A gets a gradient; deterministic values (candle's CPU RNG can't be
    // seeded), so every run checks the same point.
    for (k, (key, var)) in adapter.named_vars().into_iter().enumerate() {
        if key.contains("lora_B") {
            let n = var.elem_count();
            let values: Vec<f64> = (0..n)
                .map(|i| 0.3 * ((i as f64) * 0.73 + k as f64 * 1.1).sin())
                .collect();
            var.set(&Tensor::from_vec(values, var.dims(), &device).unwrap())
                .unwrap();
        }
    }
    let batch = batch();
    let loss_of = |adapter: &LoraAdapter| -> f64 {
        let mut ctx = ForwardContext {
            adapter: Some(adapter),
            ..Default::default()
        };
        let (loss, _) = wit_loss(&decoder, &batch, Normalization::TokenCount, &mut ctx).unwrap();
        loss.to_scalar::<f64>().unwrap()
    };
    let mut ctx = ForwardContext {
        adapter: Some(&adapter),
        ..Default::default()
    };
    let (loss, _) = wit_loss(&decoder, &batch, Normalization::TokenCount, &mut ctx).unwrap();
    let grads = loss.backward().unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    let mut worst = 0f64;
    // Layer 0 factors see every op of both blocks on their way to the loss.
    for (key, var) in adapter.named_vars() {
        if !(key.contains("layers.0.") || key.contains("layers.1.mlp.down_proj")) {
            continue;
        }
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no grad for {key}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for idx in [0, base.len() / 2, base.len() - 1] {
            let mut plus = base.clone();
            plus[idx] += eps;
            var.set(&Tensor::from_vec(plus, var.dims(), &device).unwrap())
                .unwrap();
            let lp = loss_of(&adapter);
            let mut minus = base.clone();
            minus[idx] -= eps;
            var.set(&Tensor::from_vec(minus, var.dims(), &device).unwrap())
                .unwrap();
            let lm = loss_of(&adapter);
            var.set(&Tensor::from_vec(base.clone(), var.dims(), &device).unwrap())
                .unwrap();
            let numeric = (lp - lm) / (2.0 * eps);
            // Relative error, with an absolute floor for near-zero entries where the central
            // difference's rounding error (~1e-10 at eps 1e-6) dominates.
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
    eprintln!("bias={qkv_bias} quantize={quantize:?}: {checked} entries, worst relative error {worst:.2e}");
    assert!(checked >= 24);
}

#[test]
fn gradients_match_finite_differences_dense() {
    check(tiny_config(false), None);
}

#[test]
fn gradients_match_finite_differences_with_qkv_bias() {
    check(tiny_config(true), None);
}

#[test]
fn gradients_match_finite_differences_quantized_q8_0() {
    check(tiny_config(false), Some(GgmlDType::Q8_0));
}

#[test]
fn gradients_match_finite_differences_quantized_q4_k() {
    // Q4_K blocks hold 256 values: in-features must be a multiple of 256.
    let mut config = tiny_config(false);
    config.hidden_size = 256;
    config.intermediate_size = 256;
    config.head_dim = 64;
    check(config, Some(GgmlDType::Q4K));
}
