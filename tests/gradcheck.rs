//! Finite-difference gradient checks (f64) of the whole training path on tiny random models
//! built in code: embedding, rms norm, rotary embedding, attention softmax with causal and
//! padding masks, SiLU-gated MLP, q/k/v biases, the frozen dense and quantized matmuls, LoRA,
//! and the weighted loss.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use common::gradcheck::{check_lora_gradients, sine_adapter};
use peft_wit::data::Batch;
use peft_wit::lora::LoraAdapter;
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
    let adapter = sine_adapter(&config, DType::F64, &device, 0.3);
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
    // Layer 0 factors see every op of both blocks on their way to the loss.
    let (checked, worst) = check_lora_gradients(
        &adapter,
        &grads,
        |key| key.contains("layers.0.") || key.contains("layers.1.mlp.down_proj"),
        |len| [0, len / 2, len - 1],
        loss_of,
    );
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
