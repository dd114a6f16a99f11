//! Throughput and memory benchmarks of the training step, forward-only evaluation and
//! generation, on the same workload the PyTorch + PEFT script in `benches/` runs.

pub mod peak;

use std::time::Instant;

use candle_core::DType;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::data::Batch;
use crate::generate::{generate, GenerationConfig};
use crate::lora::{LoraAdapter, LoraConfig};
use crate::loss::{position_nll, weighted_nll_sum};
use crate::model::config::PROJECTIONS;
use crate::model::decoder::ForwardContext;
use crate::model::BaseModel;
use crate::train::optim::{AdamW, AdamWParams};
use crate::Result;

/// The workload.
#[derive(Debug, Clone, Serialize)]
pub struct BenchSpec {
    pub batch_size: usize,
    pub seq_len: usize,
    pub rank: usize,
    pub steps: usize,
    pub warmup: usize,
    pub generate_tokens: usize,
}

/// What was measured (tokens/s are medians of the timed repetitions).
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub model: String,
    /// Where the step ran (`cpu`, `cuda:0`, ...).
    pub device: String,
    pub base_dtype: String,
    pub spec: BenchSpec,
    pub train_tokens_per_s: f64,
    pub train_step_s: Vec<f64>,
    /// Median seconds of the step's phases: forward (with the loss), backward, optimizer.
    pub train_phase_s: TrainPhases,
    pub eval_tokens_per_s: f64,
    /// `None` when generation was skipped.
    pub generate_tokens_per_s: Option<f64>,
    /// Peak resident set size of the process so far (VmHWM), in MB.
    pub peak_rss_mb: Option<f64>,
    pub threads: usize,
    /// The machine's peak on these threads, probed before the steps.
    pub peak: peak::Peak,
    /// Useful FLOPs of one training token (see [`peak::train_flops_per_token`]).
    pub train_flops_per_token: f64,
    /// Useful FLOPs of one evaluation token (see [`peak::eval_flops_per_token`]): with the
    /// base frozen (no weight gradients) a training token costs only ~2.1× as much, which
    /// bounds how much faster evaluation can be at the same efficiency.
    pub eval_flops_per_token: f64,
    /// The training step's share of the peak of its dtype (bf16 for a bf16 base: AMX tiles
    /// where present, else AVX-512 BF16; f32 otherwise); `None` where that peak could not be probed.
    pub train_share_of_peak: Option<f64>,
    /// The same for forward-only evaluation.
    pub eval_share_of_peak: Option<f64>,
}

/// Where a training step's time goes (medians over the timed steps, seconds).
#[derive(Debug, Clone, Serialize)]
pub struct TrainPhases {
    /// Forward pass and loss (the fused output projection also prepares its input gradient).
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
}

/// Peak RSS from `/proc/self/status` (Linux), in MB.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

/// Random ids with every position after the first weighted 1 (the loss of `labels = input_ids`).
fn random_batch(vocab: usize, spec: &BenchSpec, seed: u64) -> Batch {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = spec.batch_size * spec.seq_len;
    let ids: Vec<u32> = (0..n).map(|_| rng.random_range(3..vocab as u32)).collect();
    let weights: Vec<f32> = (0..n)
        .map(|i| if i % spec.seq_len == 0 { 0.0 } else { 1.0 })
        .collect();
    Batch {
        ids,
        weights,
        seq_lens: vec![spec.seq_len; spec.batch_size],
        batch: spec.batch_size,
        seq_len: spec.seq_len,
    }
}

/// Runs the training-step, eval and generation benchmarks.
pub fn run(
    base: &BaseModel,
    spec: &BenchSpec,
    mut on_step: impl FnMut(&str, f64),
) -> Result<BenchResult> {
    let decoder = &base.decoder;
    let lora = LoraConfig {
        r: spec.rank,
        lora_alpha: 2.0 * spec.rank as f64,
        lora_dropout: 0.0,
        ..Default::default()
    };
    let adapter = LoraAdapter::init(&lora, &decoder.config, 0, DType::F32, decoder.device())?;
    let device = decoder.device().clone();
    // The CPU probe says nothing about an accelerator's peak: no share is printed there.
    let machine = if device.is_cpu() {
        peak::probe()
    } else {
        peak::Peak::unprobed()
    };
    // An accelerator runs the queued kernels after the call returns: wait for them before
    // reading a clock (a no-op on the CPU).
    let elapsed = |started: &Instant| -> Result<f64> {
        device.synchronize()?;
        Ok(started.elapsed().as_secs_f64())
    };
    let mut optimizer = AdamW::new(adapter.named_vars(), AdamWParams::default())?;
    let tokens = (spec.batch_size * spec.seq_len) as f64;
    let mut step_times = Vec::new();
    let mut phase_times: Vec<[f64; 3]> = Vec::new();
    for step in 0..spec.warmup + spec.steps {
        let batch = random_batch(decoder.config.vocab_size, spec, step as u64);
        let started = Instant::now();
        let mut ctx = ForwardContext {
            adapter: Some(&adapter),
            ..Default::default()
        };
        let (sum, count) = weighted_nll_sum(decoder, &batch, &mut ctx)?;
        let loss = (sum / count as f64)?;
        let t_fwd = elapsed(&started)?;
        let grads = loss.backward()?;
        let t_bwd = elapsed(&started)?;
        let g: Vec<_> = optimizer
            .vars()
            .iter()
            .map(|(_, v)| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .map(Ok)
                    .unwrap_or_else(|| v.as_tensor().zeros_like())
            })
            .collect::<candle_core::Result<_>>()?;
        drop(grads);
        optimizer.step(&g, 1e-4)?;
        let secs = elapsed(&started)?;
        on_step(
            if step < spec.warmup {
                "warmup"
            } else {
                "train"
            },
            tokens / secs,
        );
        if step >= spec.warmup {
            step_times.push(secs);
            phase_times.push([t_fwd, t_bwd - t_fwd, secs - t_bwd]);
        }
    }
    let mut eval_rates = Vec::new();
    for rep in 0..spec.steps.clamp(1, 3) {
        let batch = random_batch(decoder.config.vocab_size, spec, 1000 + rep as u64);
        let started = Instant::now();
        let mut ctx = ForwardContext {
            adapter: Some(&adapter),
            ..Default::default()
        };
        position_nll(decoder, &batch, &mut ctx)?;
        let rate = tokens / elapsed(&started)?;
        on_step("eval", rate);
        eval_rates.push(rate);
    }
    let generate_tokens_per_s = if spec.generate_tokens > 0 {
        let prompt: Vec<u32> =
            random_batch(decoder.config.vocab_size, spec, 7).ids[..32.min(spec.seq_len)].to_vec();
        let config = GenerationConfig {
            max_new_tokens: spec.generate_tokens,
            ..Default::default()
        };
        let started = Instant::now();
        let out = generate(decoder, Some(&adapter), &prompt, &config, |_| {})?;
        let rate = out.len() as f64 / started.elapsed().as_secs_f64();
        on_step("generate", rate);
        Some(rate)
    } else {
        None
    };
    let config = &decoder.config;
    let adapted: Vec<&str> = PROJECTIONS.to_vec();
    let train_flops = peak::train_flops_per_token(config, spec.rank, &adapted, spec.seq_len);
    let eval_flops = peak::eval_flops_per_token(config, spec.rank, &adapted, spec.seq_len);
    let peak_gflops = if base.base_dtype == crate::model::BaseDType::Bf16 {
        // The instruction set the bf16 weight products run on.
        machine.amx_bf16_gflops.or(machine.bf16_gflops)
    } else {
        machine.f32_gflops
    };
    let train_tokens_per_s = tokens / median(&step_times);
    let eval_tokens_per_s = median(&eval_rates);
    let share = |rate: f64, flops: f64| peak_gflops.map(|p| rate * flops / 1e9 / p);
    Ok(BenchResult {
        model: base.name.clone(),
        device: crate::device::DeviceSpec::of(&device).to_string(),
        base_dtype: base.base_dtype.name().into(),
        spec: spec.clone(),
        train_tokens_per_s,
        train_step_s: step_times,
        train_phase_s: TrainPhases {
            forward: median(&phase_times.iter().map(|p| p[0]).collect::<Vec<_>>()),
            backward: median(&phase_times.iter().map(|p| p[1]).collect::<Vec<_>>()),
            optimizer: median(&phase_times.iter().map(|p| p[2]).collect::<Vec<_>>()),
        },
        eval_tokens_per_s,
        generate_tokens_per_s,
        peak_rss_mb: peak_rss_mb(),
        threads: rayon::current_num_threads(),
        peak: machine,
        train_flops_per_token: train_flops,
        eval_flops_per_token: eval_flops,
        train_share_of_peak: share(train_tokens_per_s, train_flops),
        eval_share_of_peak: share(eval_tokens_per_s, eval_flops),
    })
}
