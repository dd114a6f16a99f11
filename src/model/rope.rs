//! Rotary position embedding tables (HF "rotate_half" layout), with llama3 frequency scaling.

use candle_core::{Device, Tensor};

use super::config::{Llama3RopeScaling, ModelConfig};
use crate::Result;

/// `cos`/`sin` tables of shape `[max_positions, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    pub fn new(config: &ModelConfig, max_positions: usize, device: &Device) -> Result<Self> {
        let inv_freq = inverse_frequencies(config);
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in &inv_freq {
                // f32 products, as transformers computes them, so long positions round the same way.
                let angle = (pos as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
        })
    }

    /// The rows for positions `offset..offset + len`.
    pub fn slice(&self, offset: usize, len: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.narrow(0, offset, len)?,
            self.sin.narrow(0, offset, len)?,
        ))
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }
}

/// `1 / theta^(2i/d)` in f32, as transformers computes it, then llama3 scaling if configured.
fn inverse_frequencies(config: &ModelConfig) -> Vec<f32> {
    let d = config.head_dim;
    let base = config.rope_theta as f32;
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
        .collect();
    match &config.rope_scaling {
        None => inv,
        Some(s) => inv.into_iter().map(|f| llama3_scale(f, s)).collect(),
    }
}

/// transformers' `_compute_llama3_parameters`.
fn llama3_scale(freq: f32, s: &Llama3RopeScaling) -> f32 {
    let old_len = s.original_max_position_embeddings as f32;
    let low_wavelen = old_len / s.low_freq_factor as f32;
    let high_wavelen = old_len / s.high_freq_factor as f32;
    let factor = s.factor as f32;
    let wavelen = 2.0 * std::f32::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / factor
    } else {
        let smooth = (old_len / wavelen - s.low_freq_factor as f32)
            / (s.high_freq_factor as f32 - s.low_freq_factor as f32);
        (1.0 - smooth) * freq / factor + smooth * freq
    }
}
