//! What the machine can do at most, measured on the threads the benchmark runs on: a short
//! probe of independent fused multiply-adds (f32 `vfmadd231ps`) and bf16 dot products
//! (`vdpbf16ps`) on 512-bit registers and, where the CPU has them, on AMX tiles
//! (`tdpbf16ps`), and the useful FLOPs of a LoRA training step per token,
//! so `bench train` can print the step's share of the peak beside its tokens/s.

use std::time::Instant;

use serde::Serialize;

use crate::model::config::{ModelConfig, PROJECTIONS};
use crate::ops::wgemm;

/// Peak arithmetic of this machine's benchmark threads, GFLOP/s (a multiply-add counts 2).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Peak {
    /// f32 FMA on AVX-512; `None` where the CPU lacks it.
    pub f32_gflops: Option<f64>,
    /// bf16 dot products into f32 (AVX-512 BF16); `None` where the CPU lacks it.
    pub bf16_gflops: Option<f64>,
    /// bf16 tile dot products into f32 (AMX-BF16), which bf16-weight products use where they
    /// exist; `None` where the CPU lacks them or they are turned off (`PEFT_WIT_AMX=0`).
    pub amx_bf16_gflops: Option<f64>,
    pub threads: usize,
}

impl Peak {
    /// No figures: for devices the CPU probe does not describe.
    pub fn unprobed() -> Self {
        Self {
            f32_gflops: None,
            bf16_gflops: None,
            amx_bf16_gflops: None,
            threads: rayon::current_num_threads(),
        }
    }
}

/// Iterations of the probe loop per thread (12 chains × 16 lanes × 2 FLOPs each for f32, twice
/// that for bf16): about a tenth of a second on a current core.
const PROBE_ITERS: u64 = 20_000_000;
/// Rounds of the AMX probe (65,536 FLOPs each): about a tenth of a second as well.
const AMX_PROBE_ITERS: u64 = 2_000_000;

/// Measures [`Peak`] on every thread of the current rayon pool at once (the best of three).
pub fn probe() -> Peak {
    let threads = rayon::current_num_threads();
    let measure_iters = |kernel: fn(u64) -> f32, iters: u64, flops_per_iter: f64| {
        (0..3)
            .map(|_| {
                let started = Instant::now();
                let sums = rayon::broadcast(|_| kernel(iters));
                let secs = started.elapsed().as_secs_f64();
                // Keep the results alive so the loops cannot be optimised away.
                std::hint::black_box(sums);
                threads as f64 * iters as f64 * flops_per_iter / secs / 1e9
            })
            .fold(0.0, f64::max)
    };
    let measure = |kernel, flops_per_iter| measure_iters(kernel, PROBE_ITERS, flops_per_iter);
    let amx: fn(u64) -> f32 = |iters| wgemm::amx_probe(iters).unwrap_or(0.0);
    Peak {
        f32_gflops: x86::f32_kernel().map(|k| measure(k, 12.0 * 16.0 * 2.0)),
        bf16_gflops: x86::bf16_kernel().map(|k| measure(k, 12.0 * 32.0 * 2.0)),
        amx_bf16_gflops: wgemm::amx_available()
            .then(|| measure_iters(amx, AMX_PROBE_ITERS, wgemm::AMX_PROBE_FLOPS)),
        threads,
    }
}

/// The useful FLOPs of one LoRA training token (forward, input gradients, LoRA weight
/// gradients, attention), for `rank` on `adapted` projections at sequence length `seq_len`:
/// frozen linear layers `2N` forward + `2N` for the input gradient (no weight gradient), each
/// LoRA pair `6·r·(in+out)`, causal attention (QKᵀ and PV forward, four products backward)
/// `12·heads·head_dim·(T+1)/2` per layer. Recomputation (checkpointing, the fused attention's
/// backward) is not useful work and is not counted.
pub fn train_flops_per_token(
    config: &ModelConfig,
    rank: usize,
    adapted: &[&str],
    seq_len: usize,
) -> f64 {
    let frozen = 4.0 * linear_params(config);
    let lora = 6.0 * config.num_hidden_layers as f64 * lora_width(config, adapted) * rank as f64;
    frozen + lora + 3.0 * attention_forward_flops(config, seq_len)
}

/// The FLOPs of one token of forward-only evaluation (frozen layers, LoRA, attention).
pub fn eval_flops_per_token(
    config: &ModelConfig,
    rank: usize,
    adapted: &[&str],
    seq_len: usize,
) -> f64 {
    let lora = 2.0 * config.num_hidden_layers as f64 * lora_width(config, adapted) * rank as f64;
    2.0 * linear_params(config) + lora + attention_forward_flops(config, seq_len)
}

/// `(in, out)` of each projection of a decoder layer.
fn projections(c: &ModelConfig) -> impl Iterator<Item = (&'static str, usize, usize)> + '_ {
    PROJECTIONS.iter().filter_map(|&name| {
        let (i, o) = c.projection_shape(name)?;
        Some((name, i, o))
    })
}

/// Weights of every linear layer a token passes through: the decoder's projections and the
/// output head.
fn linear_params(c: &ModelConfig) -> f64 {
    let per_layer: usize = projections(c).map(|(_, i, o)| i * o).sum();
    (c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size) as f64
}

/// `Σ (in + out)` over the adapted projections of one layer.
fn lora_width(c: &ModelConfig, adapted: &[&str]) -> f64 {
    projections(c)
        .filter(|(name, _, _)| adapted.contains(name))
        .map(|(_, i, o)| (i + o) as f64)
        .sum()
}

/// QKᵀ and PV of one token against its causal context (`(T+1)/2` keys on average), all layers.
fn attention_forward_flops(c: &ModelConfig, seq_len: usize) -> f64 {
    let per_layer = 2.0 * 2.0 * c.q_dim() as f64;
    c.num_hidden_layers as f64 * per_layer * (seq_len as f64 + 1.0) / 2.0
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The f32 probe, where the CPU has AVX-512F.
    pub(super) fn f32_kernel() -> Option<fn(u64) -> f32> {
        std::arch::is_x86_feature_detected!("avx512f").then_some(f32_probe as fn(u64) -> f32)
    }

    /// The bf16 probe, where the CPU has AVX-512 BF16.
    pub(super) fn bf16_kernel() -> Option<fn(u64) -> f32> {
        (std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16"))
        .then_some(bf16_probe as fn(u64) -> f32)
    }

    fn f32_probe(iters: u64) -> f32 {
        // SAFETY: handed out by `f32_kernel` only after the CPUID check for avx512f.
        unsafe { f32_loop(iters) }
    }

    fn bf16_probe(iters: u64) -> f32 {
        // SAFETY: handed out by `bf16_kernel` only after the CPUID checks for avx512f and
        // avx512bf16.
        unsafe { bf16_loop(iters) }
    }

    /// 12 independent FMA chains: enough to cover the FMA latency on two ports.
    #[target_feature(enable = "avx512f")]
    unsafe fn f32_loop(iters: u64) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); 12];
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        acc.iter().map(|x| _mm512_reduce_add_ps(*x)).sum()
    }

    /// 12 independent `vdpbf16ps` chains (each 32 bf16 products into 16 f32 sums).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn bf16_loop(iters: u64) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); 12];
        let ones = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(1e-3));
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, ones, ones);
            }
        }
        acc.iter().map(|x| _mm512_reduce_add_ps(*x)).sum()
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub(super) fn f32_kernel() -> Option<fn(u64) -> f32> {
        None
    }
    pub(super) fn bf16_kernel() -> Option<fn(u64) -> f32> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::tiny_config;

    #[test]
    fn training_flops_count_each_part_once() {
        let c = tiny_config(false);
        let all = PROJECTIONS;
        let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        assert_ne!(q, kv, "the tiny config should use grouped-query attention");
        let n = c.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * i) + h * c.vocab_size;
        let widths = (h + q) + 2 * (h + kv) + (q + h) + 3 * (h + i);
        let (r, t) = (4, 9);
        let attention = c.num_hidden_layers * 4 * q * (t + 1) / 2;
        let expect = 4 * n + 6 * c.num_hidden_layers * widths * r + 3 * attention;
        assert_eq!(train_flops_per_token(&c, r, &all, t), expect as f64);
        let expect_eval = 2 * n + 2 * c.num_hidden_layers * widths * r + attention;
        assert_eq!(eval_flops_per_token(&c, r, &all, t), expect_eval as f64);
        // Only the adapted projections add LoRA work.
        let q_only = train_flops_per_token(&c, r, &["q_proj"], t);
        let lora_q = 6 * c.num_hidden_layers * (h + q) * r;
        assert_eq!(q_only, (4 * n + lora_q + 3 * attention) as f64);
    }

    #[test]
    fn the_probe_measures_what_the_cpu_has() {
        let peak = probe();
        assert_eq!(peak.threads, rayon::current_num_threads());
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            peak.f32_gflops.is_some(),
            std::arch::is_x86_feature_detected!("avx512f")
        );
        assert_eq!(peak.amx_bf16_gflops.is_some(), wgemm::amx_available());
        for gflops in [peak.f32_gflops, peak.bf16_gflops, peak.amx_bf16_gflops]
            .into_iter()
            .flatten()
        {
            assert!(gflops.is_finite() && gflops > 0.1, "{peak:?}");
        }
    }
}
