//! Fused vs composed forward and forward+backward times for the ops in `peft_wit::ops`.
//! Run: `cargo bench --bench ops` (medians of 11 interleaved runs after 2 warm-ups).
//! `OPS_BENCH=<substring>` runs only matching rows; `OPS_TUNE_MALLOC=1` applies
//! `ops::tune_glibc_malloc()` first.

use candle_core::{DType, Device, Result, Tensor, Var};
use peft_wit::ops::{self, composed};
use std::time::Instant;

type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

fn median(mut ts: Vec<f64>) -> f64 {
    ts.sort_by(|a, b| a.total_cmp(b));
    let n = ts.len();
    (ts[(n - 1) / 2] + ts[n / 2]) / 2.0
}

fn ms(f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Medians (ms) of interleaved runs, so load from other processes hits all variants alike.
fn medians(fs: &mut [&mut dyn FnMut() -> Result<()>]) -> Result<Vec<f64>> {
    const RUNS: usize = 11;
    let mut ts = vec![Vec::new(); fs.len()];
    for run in 0..RUNS + 2 {
        for (f, t) in fs.iter_mut().zip(ts.iter_mut()) {
            let v = ms(*f)?;
            if run >= 2 {
                t.push(v); // the first two runs are warm-up
            }
        }
    }
    Ok(ts.into_iter().map(median).collect())
}

fn loss_of(y: Tensor, r: &Tensor) -> Result<Tensor> {
    if y.rank() == 0 {
        Ok(y)
    } else {
        (y * r)?.sum_all()
    }
}

/// Fused vs composed: forward, backward() of a prebuilt graph, and the harness: the same loss
/// Σ y·r on y = first input, i.e. what backward() costs besides the op (the mul's backward,
/// candle's gradient accumulation, allocations). Op-only backward = backward() − harness.
fn row(name: &str, shape: &str, inputs: &[Var], r: &Tensor, fused: OpFn, comp: OpFn) -> Result<()> {
    // OPS_BENCH=name restricts the run to the ops whose name contains it (for profiling).
    if let Ok(only) = std::env::var("OPS_BENCH") {
        if !name.contains(only.as_str()) {
            return Ok(());
        }
    }
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let f = medians(&mut [&mut || fused(&ts).map(|_| ()), &mut || {
        comp(&ts).map(|_| ())
    }])?;
    let (lf, lc) = (loss_of(fused(&ts)?, r)?, loss_of(comp(&ts)?, r)?);
    let scalar = r.rank() == 0;
    // Scalar ops (the loss) need no harness: backward() starts at them.
    let lh = if scalar {
        None
    } else {
        Some(loss_of(ts[0].clone(), r)?)
    };
    let b = medians(&mut [
        &mut || lf.backward().map(|_| ()),
        &mut || lc.backward().map(|_| ()),
        &mut || match &lh {
            Some(l) => l.backward().map(|_| ()),
            None => Ok(()),
        },
    ])?;
    let (ff, cf, fb, cb, h) = (f[0], f[1], b[0], b[1], if scalar { 0.0 } else { b[2] });
    let (fo, co) = ((fb - h).max(0.01), (cb - h).max(0.01));
    println!(
        "| {name} | {shape} | {ff:.2} | {cf:.2} | {:.1}× | {fb:.2} | {cb:.2} | {h:.2} | {fo:.2} | {co:.2} | {:.1}× | {:.1}× |",
        cf / ff,
        co / fo,
        (cf + co) / (ff + fo),
    );
    Ok(())
}

fn randn(dims: &[usize], scale: f64) -> Result<Tensor> {
    Tensor::randn(0f32, scale as f32, dims, &Device::Cpu)
}

/// The additive causal mask of `t` positions, `[t, t]` (query, key): 0 where the key is at or
/// before the query, -∞ after it.
fn causal_mask(t: usize) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t * t)
        .map(|k| {
            if k % t > k / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(mask, (t, t), &Device::Cpu)
}

fn main() -> Result<()> {
    // OPS_TUNE_MALLOC=1 measures with `ops::tune_glibc_malloc()` applied.
    let tuned =
        std::env::var("OPS_TUNE_MALLOC").is_ok_and(|v| v == "1") && ops::tune_glibc_malloc();
    println!(
        "threads: {}, glibc malloc tuned: {tuned}",
        rayon::current_num_threads()
    );
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

    let mask = causal_mask(t)?;
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

    // Attention as in SmolLM2-135M: 9 query heads, 3 kv heads, head dim 64; batch 1 right-padded.
    let q = Var::from_tensor(&randn(&[4, 9, t, d], 1.0)?)?;
    let k = Var::from_tensor(&randn(&[4, 3, t, d], 1.0)?)?;
    let v = Var::from_tensor(&randn(&[4, 3, t, d], 1.0)?)?;
    let kp = Tensor::new(
        (0..4 * t as u32)
            .map(|i| u32::from(i < t as u32 || i % (t as u32) < 200))
            .collect::<Vec<_>>(),
        &Device::Cpu,
    )?
    .reshape((4, t))?;
    let r = randn(&[4, 9, t, d], 1.0)?;
    let scale = 1.0 / (d as f64).sqrt();
    row(
        "causal_attention",
        "q [4, 9, 256, 64], kv [4, 3, 256, 64]",
        &[q.clone(), k.clone(), v.clone()],
        &r,
        &|x| ops::causal_attention(&x[0], &x[1], &x[2], Some(&kp), scale),
        &|x| composed::causal_attention(&x[0], &x[1], &x[2], Some(&kp), scale),
    )?;
    // The alternative without the fused attention: candle matmuls + the fused softmax.
    let mask = {
        let causal = causal_mask(t)?.reshape((1, 1, t, t))?;
        let pad = kp.to_dtype(DType::F32)?.reshape((4, 1, 1, t))?;
        let pad = ((pad - 1.0)? * 1e30)?; // 0 for real keys, -1e30 for padding
        causal.broadcast_add(&pad)?
    };
    row(
        "attention: matmul + fused softmax",
        "same",
        &[q, k, v],
        &r,
        &|x| ops::causal_attention(&x[0], &x[1], &x[2], Some(&kp), scale),
        &|x| {
            let rep = |t: &Tensor| -> Result<Tensor> {
                Tensor::cat(&[t, t, t], 2)?.reshape((4, 9, 256, 64))
            };
            let s = (x[0].matmul(&rep(&x[1])?.t()?)? * scale)?.broadcast_add(&mask)?;
            ops::softmax_last_dim(&s)?.matmul(&rep(&x[2])?)
        },
    )?;

    // Rope + attention on the token-major projections ([B, T, H, D]) as the decoder needs
    // them, vs the old sequence: transpose + copy to [B, H, T, D], fused rope on q and k, fused
    // causal_attention, transpose back + copy (the copy the decoder's reshape makes).
    let q = Var::from_tensor(&randn(&[4, t, 9, d], 1.0)?)?;
    let k = Var::from_tensor(&randn(&[4, t, 3, d], 1.0)?)?;
    let v = Var::from_tensor(&randn(&[4, t, 3, d], 1.0)?)?;
    let r = randn(&[4, t, 9, d], 1.0)?;
    row(
        "rope_causal_attention vs transposes + rope + causal_attention",
        "q [4, 256, 9, 64], kv [4, 256, 3, 64]",
        &[q, k, v],
        &r,
        &|x| ops::rope_causal_attention(&x[0], &x[1], &x[2], &cos, &sin, Some(&kp), scale),
        &|x| {
            let heads = |x: &Tensor| x.transpose(1, 2)?.contiguous();
            let q = ops::rope(&heads(&x[0])?, &cos, &sin)?;
            let k = ops::rope(&heads(&x[1])?, &cos, &sin)?;
            ops::causal_attention(&q, &k, &heads(&x[2])?, Some(&kp), scale)?
                .transpose(1, 2)?
                .contiguous()
        },
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
    // lm_head + loss: hidden [1024, 576] (trainable path) against a frozen [49152, 576] weight.
    let hidden = Var::from_tensor(&randn(&[n, 576], 1.0)?)?;
    let lm_head = randn(&[v, 576], 0.05)?;
    row(
        "weighted_nll_linear vs matmul + fused weighted_nll",
        "h [1024, 576], W [49152, 576]",
        &[hidden],
        &unit,
        &|x| ops::weighted_nll_linear(&x[0], &lm_head, &targets, &weights, None),
        &|x| ops::weighted_nll(&x[0].matmul(&lm_head.t()?)?, &targets, &weights),
    )?;
    Ok(())
}
