//! Small random models built in code, for tests, gradient checks and benchmarks that must not
//! depend on downloaded weights.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::{Architecture, ModelConfig, PROJECTIONS};
use super::decoder::{Block, Decoder, Projection};
use super::frozen::FrozenWeight;
use crate::Result;

/// A tiny llama-style config (`qkv_bias` adds qwen2-style biases).
pub fn tiny_config(qkv_bias: bool) -> ModelConfig {
    ModelConfig {
        architecture: if qkv_bias {
            Architecture::Qwen2
        } else {
            Architecture::Llama
        },
        vocab_size: 48,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-6,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        qkv_bias,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
    }
}

fn uniform(rng: &mut StdRng, shape: (usize, usize), scale: f32, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// A random decoder; projections are kept as `quantize` blocks when given (in-features must be
/// a multiple of the block size), otherwise dense in `dtype` (also the compute dtype).
pub fn random_decoder(
    config: &ModelConfig,
    seed: u64,
    dtype: DType,
    quantize: Option<GgmlDType>,
    device: &Device,
) -> Result<Decoder> {
    let mut rng = StdRng::seed_from_u64(seed);
    let h = config.hidden_size;
    let embed = uniform(&mut rng, (config.vocab_size, h), 1.0, device)?.to_dtype(dtype)?;
    let norm_weight = |rng: &mut StdRng| -> Result<Tensor> {
        let v: Vec<f32> = (0..h)
            .map(|_| 1.0 + rng.random_range(-0.2f32..0.2))
            .collect();
        Ok(Tensor::from_vec(v, h, device)?.to_dtype(dtype)?)
    };
    let mut blocks = Vec::new();
    for _ in 0..config.num_hidden_layers {
        let mut projections = Vec::new();
        for proj in PROJECTIONS {
            let (inp, out) = config.projection_shape(proj).unwrap_or((h, h));
            let w = uniform(&mut rng, (out, inp), 1.5 / (inp as f32).sqrt(), device)?;
            let weight = match quantize {
                Some(q) => FrozenWeight::Quantized(Arc::new(QTensor::quantize(&w, q)?)),
                None => FrozenWeight::dense(w.to_dtype(dtype)?),
            };
            let bias = if config.qkv_bias && ["q_proj", "k_proj", "v_proj"].contains(&proj) {
                Some(
                    uniform(&mut rng, (1, out), 0.5, device)?
                        .squeeze(0)?
                        .to_dtype(dtype)?,
                )
            } else {
                None
            };
            projections.push(Projection { weight, bias });
        }
        blocks.push(Block {
            input_layernorm: norm_weight(&mut rng)?,
            post_attention_layernorm: norm_weight(&mut rng)?,
            projections,
        });
    }
    let norm = norm_weight(&mut rng)?;
    let lm_head = FrozenWeight::dense(
        uniform(&mut rng, (config.vocab_size, h), 1.0, device)?.to_dtype(dtype)?,
    );
    Decoder::new(config.clone(), embed, blocks, norm, lm_head, dtype, device)
}
