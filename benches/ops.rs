//! Fused vs composed forward and forward+backward times for the ops in `peft_wit::ops`.
//! Run: `cargo bench --bench ops` (medians of 10 runs after 2 warm-ups).

use candle_core::{DType, Device, Result, Tensor, Var};
use peft_wit::ops::{self, composed};
use std::time::Instant;

type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

fn median_ms(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    let mut ts = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok((ts[4] + ts[5]) / 2.0)
}

/// Medians in ms: (forward, backward of a prebuilt graph, backward of the harness alone).
/// The loss is Σ y·r (r random, so the incoming gradient is dense) unless y is a scalar; the
/// harness column is the same loss on y = first input, i.e. what `backward()` costs besides the
/// op (the mul's backward, candle's gradient accumulation, allocations).
fn time(inputs: &[Var], r: &Tensor, f: OpFn) -> Result<(f64, f64, f64)> {
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let fwd = median_ms(|| f(&ts).map(|_| ()))?;
    let loss_of = |y: Tensor| -> Result<Tensor> {
        if y.rank() == 0 {
            Ok(y)
        } else {
            (y * r)?.sum_all()
        }
    };
    let loss = loss_of(f(&ts)?)?;
    let bwd = median_ms(|| loss.backward().map(|_| ()))?;
    let harness = if r.rank() == 0 {
        0.0
    } else {
        let base = loss_of(ts[0].clone())?;
        median_ms(|| base.backward().map(|_| ()))?
    };
    Ok((fwd, bwd, harness))
}

fn randn(dims: &[usize], scale: f64) -> Result<Tensor> {
    Tensor::randn(0f32, scale as f32, dims, &Device::Cpu)
}

fn row(name: &str, shape: &str, inputs: &[Var], r: &Tensor, fused: OpFn, comp: OpFn) -> Result<()> {
    // OPS_BENCH=name restricts the run to the ops whose name contains it (for profiling).
    if let Ok(only) = std::env::var("OPS_BENCH") {
        if !name.contains(only.as_str()) {
            return Ok(());
        }
    }
    let (ff, fb, h) = time(inputs, r, fused)?;
    let (cf, cb, _) = time(inputs, r, comp)?;
    // Op-only backward: backward() minus the harness (clamped to stay positive in noise).
    let (fo, co) = ((fb - h).max(0.01), (cb - h).max(0.01));
    println!(
        "| {name} | {shape} | {ff:.2} | {cf:.2} | {:.1}× | {fb:.2} | {cb:.2} | {h:.2} | {fo:.2} | {co:.2} | {:.1}× | {:.1}× |",
        cf / ff,
        co / fo,
        (cf + co) / (ff + fo),
    );
    Ok(())
}

fn main() -> Result<()> {
    println!("threads: {}", rayon::current_num_threads());
    println!("| op | shape | fused fwd | composed fwd | fwd speed-up | fused backward() | composed backward() | harness backward() | fused op bwd | composed op bwd | bwd speed-up | fwd+bwd speed-up |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");

    let x = Var::from_tensor(&randn(&[1024, 576], 1.0)?)?;
    let w = (randn(&[576], 0.1)? + 1.0)?; // frozen, as in LoRA training
    let r = randn(&[1024, 576], 1.0)?;
    row(
        "rms_norm",
        "[1024, 576]",
        &[x],
        &r,
        &|t| ops::rms_norm(&t[0], &w, 1e-5),
        &|t| composed::rms_norm(&t[0], &w, 1e-5),
    )?;

    let (t, d) = (256, 64);
    let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)?.to_dtype(DType::F32)?;
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let inv = Tensor::new(inv, &Device::Cpu)?;
    let freqs = pos.unsqueeze(1)?.broadcast_mul(&inv.unsqueeze(0)?)?;
    let (cos, sin) = (freqs.cos()?, freqs.sin()?);
    let q = Var::from_tensor(&randn(&[4, 9, t, d], 1.0)?)?;
    let r = randn(&[4, 9, t, d], 1.0)?;
    row(
        "rope",
        "[4, 9, 256, 64]",
        &[q],
        &r,
        &|x| ops::rope(&x[0], &cos, &sin),
        &|x| composed::rope(&x[0], &cos, &sin),
    )?;

    let mask: Vec<f32> = (0..t * t)
        .map(|k| {
            if k % t > k / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?;
    let s = Var::from_tensor(&randn(&[4, 9, t, t], 2.0)?.broadcast_add(&mask)?)?;
    let r = randn(&[4, 9, t, t], 1.0)?;
    row(
        "softmax (causal)",
        "[4, 9, 256, 256]",
        &[s],
        &r,
        &|x| ops::softmax_last_dim(&x[0]),
        &|x| composed::softmax_last_dim(&x[0]),
    )?;

    let g = Var::from_tensor(&randn(&[1024, 1536], 2.0)?)?;
    let u = Var::from_tensor(&randn(&[1024, 1536], 1.0)?)?;
    let r = randn(&[1024, 1536], 1.0)?;
    row(
        "silu_mul",
        "[1024, 1536]",
        &[g, u],
        &r,
        &|x| ops::silu_mul(&x[0], &x[1]),
        &|x| composed::silu_mul(&x[0], &x[1]),
    )?;

    let (n, v) = (1024, 49152);
    let logits = Var::from_tensor(&randn(&[n, v], 3.0)?)?;
    let targets = Tensor::new(
        (0..n as u32)
            .map(|i| (i * 7919) % v as u32)
            .collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    let weights = Tensor::new(
        (0..n)
            .map(|i| if i % 5 == 0 { 0f32 } else { 1.0 })
            .collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    let unit = Tensor::new(1f32, &Device::Cpu)?;
    row(
        "weighted_nll",
        "[1024, 49152]",
        &[logits],
        &unit,
        &|x| ops::weighted_nll(&x[0], &targets, &weights),
        &|x| composed::weighted_nll(&x[0], &targets, &weights),
    )?;
    Ok(())
}
