//! Fused vs composed (forward and backward) and finite-difference checks for every op.

use super::{composed, kernel};
use candle_core::{DType, Device, Result, Tensor, Var, D};

/// Small deterministic RNG (CPU seeding is unavailable in candle).
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [-scale, scale].
    fn tensor(&mut self, dims: &[usize], scale: f64, dt: DType) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| (2.0 * self.next_f64() - 1.0) * scale)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dt)
    }
}

fn max_abs(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

/// max |a − b| / max(1, max |b|).
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    let d = max_abs(&(a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?)?;
    Ok(d / max_abs(b)?.max(1.0))
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    let e = rel_err(a, b)?;
    assert!(e <= tol, "{what}: error {e:e} > {tol:e}");
    Ok(())
}

/// Runs `f` on Vars built from `inputs`, returns (output, grads of Σ f(x)·r).
fn grads(
    inputs: &[Tensor],
    r: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let loss = y.broadcast_mul(r)?.sum_all()?;
    let g = loss.backward()?;
    let gs = ts
        .iter()
        .map(|t| {
            g.get(t)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((y, gs))
}

/// Fused vs composed: forward within `ftol`, all grads within 1e-4 (relative).
fn compare(
    name: &str,
    inputs: &[Tensor],
    r: &Tensor,
    fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ftol: f64,
) -> Result<()> {
    let (yf, gf) = grads(inputs, r, fused)?;
    let (yr, gr) = grads(inputs, r, reference)?;
    assert_close(&format!("{name} forward"), &yf, &yr, ftol)?;
    for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
        assert_close(&format!("{name} grad {i}"), a, b, 1e-4)?;
    }
    Ok(())
}

/// Central finite differences in f64 on `n` random coordinates of input `which`.
fn finite_diff(
    name: &str,
    inputs: &[Tensor],
    which: usize,
    r: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    rng: &mut Rng,
) -> Result<()> {
    let (_, g) = grads(inputs, r, f)?;
    let g = g[which].flatten_all()?.to_vec1::<f64>()?;
    let base = inputs[which].flatten_all()?.to_vec1::<f64>()?;
    let dims = inputs[which].dims().to_vec();
    let loss = |v: Vec<f64>| -> Result<f64> {
        let mut ins = inputs.to_vec();
        ins[which] = Tensor::from_vec(v, dims.as_slice(), &Device::Cpu)?;
        f(&ins)?.broadcast_mul(r)?.sum_all()?.to_scalar::<f64>()
    };
    let h = 1e-6;
    for _ in 0..12 {
        let k = (rng.next_f64() * base.len() as f64) as usize % base.len();
        let (mut p, mut m) = (base.clone(), base.clone());
        p[k] += h;
        m[k] -= h;
        let num = (loss(p)? - loss(m)?) / (2.0 * h);
        let err = (num - g[k]).abs() / g[k].abs().max(1.0);
        assert!(err < 1e-6, "{name}: fd {num} vs analytic {} at {k}", g[k]);
    }
    Ok(())
}

/// [`finite_diff`] on every input in turn.
fn finite_diff_each(
    name: &str,
    inputs: &[Tensor],
    r: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    rng: &mut Rng,
) -> Result<()> {
    for i in 0..inputs.len() {
        finite_diff(&format!("{name} input {i}"), inputs, i, r, f, rng)?;
    }
    Ok(())
}

fn scalar_one() -> Result<Tensor> {
    Tensor::new(1f64, &Device::Cpu)
}

#[test]
fn exp_f32_matches_std() {
    let mut worst = 0f64;
    let mut x = -104.0f32;
    while x < 88.0 {
        let (a, b) = (kernel::exp_f32(x) as f64, (x as f64).exp());
        if b > f32::MIN_POSITIVE as f64 {
            worst = worst.max((a - b).abs() / b);
        }
        x += 0.0137;
    }
    assert!(worst < 3e-7, "worst relative error {worst:e}");
    assert_eq!(kernel::exp_f32(f32::NEG_INFINITY), 0.0);
    assert!(kernel::exp_f32(f32::NAN).is_nan());
}

#[test]
fn rms_norm_matches_composed() -> Result<()> {
    let mut rng = Rng(1);
    let x = rng.tensor(&[2, 37, 576], 2.0, DType::F32)?;
    let w = (rng.tensor(&[576], 0.5, DType::F32)? + 1.0)?;
    let r = rng.tensor(&[2, 37, 576], 1.0, DType::F32)?;
    compare(
        "rms_norm",
        &[x, w],
        &r,
        &|t| super::rms_norm(&t[0], &t[1], 1e-5),
        &|t| composed::rms_norm(&t[0], &t[1], 1e-5),
        1e-5,
    )
}

#[test]
fn rms_norm_frozen_weight_gets_no_grad() -> Result<()> {
    let mut rng = Rng(2);
    let x = Var::from_tensor(&rng.tensor(&[5, 64], 1.0, DType::F32)?)?;
    let w = rng.tensor(&[64], 1.0, DType::F32)?;
    let g = super::rms_norm(&x, &w, 1e-6)?.sum_all()?.backward()?;
    assert!(g.get(&x).is_some() && g.get(&w).is_none());
    Ok(())
}

#[test]
fn rms_norm_finite_difference_f64() -> Result<()> {
    let mut rng = Rng(3);
    let x = rng.tensor(&[3, 7, 40], 2.0, DType::F64)?;
    let w = rng.tensor(&[40], 1.5, DType::F64)?;
    let r = rng.tensor(&[3, 7, 40], 1.0, DType::F64)?;
    let f = |t: &[Tensor]| super::rms_norm(&t[0], &t[1], 1e-6);
    let ins = [x, w];
    finite_diff("rms_norm dx", &ins, 0, &r, &f, &mut rng)?;
    finite_diff("rms_norm dw", &ins, 1, &r, &f, &mut rng)
}

/// cos/sin tables like Llama's, with more rows than T (the op uses the first T).
fn rope_tables(t: usize, d: usize, dt: DType) -> Result<(Tensor, Tensor)> {
    let half = d / 2;
    let mut c = Vec::new();
    let mut s = Vec::new();
    for p in 0..t {
        for i in 0..half {
            let th = p as f64 / 10000f64.powf(2.0 * i as f64 / d as f64);
            c.push(th.cos());
            s.push(th.sin());
        }
    }
    let c = Tensor::from_vec(c, (t, half), &Device::Cpu)?.to_dtype(dt)?;
    let s = Tensor::from_vec(s, (t, half), &Device::Cpu)?.to_dtype(dt)?;
    Ok((c, s))
}

#[test]
fn rope_matches_composed() -> Result<()> {
    let mut rng = Rng(4);
    let x = rng.tensor(&[2, 9, 37, 64], 1.0, DType::F32)?;
    let r = rng.tensor(&[2, 9, 37, 64], 1.0, DType::F32)?;
    let (c, s) = rope_tables(50, 64, DType::F32)?;
    compare(
        "rope",
        &[x],
        &r,
        &|t| super::rope(&t[0], &c, &s),
        &|t| composed::rope(&t[0], &c, &s),
        1e-5,
    )?;
    // A non-contiguous input (q after a transpose) goes through the same path.
    let xt = rng
        .tensor(&[2, 37, 9, 64], 1.0, DType::F32)?
        .transpose(1, 2)?;
    assert_close(
        "rope strided",
        &super::rope(&xt, &c, &s)?,
        &composed::rope(&xt, &c, &s)?,
        1e-6,
    )
}

#[test]
fn rope_finite_difference_f64() -> Result<()> {
    let mut rng = Rng(5);
    let x = rng.tensor(&[2, 3, 11, 16], 1.0, DType::F64)?;
    let r = rng.tensor(&[2, 3, 11, 16], 1.0, DType::F64)?;
    let (c, s) = rope_tables(11, 16, DType::F64)?;
    let f = |t: &[Tensor]| super::rope(&t[0], &c, &s);
    finite_diff("rope", &[x], 0, &r, &f, &mut rng)
}

/// Scores with a causal mask (-inf above the diagonal) like attention produces.
fn masked_scores(rng: &mut Rng, b: usize, h: usize, t: usize, dt: DType) -> Result<Tensor> {
    let x = rng.tensor(&[b, h, t, t], 4.0, dt)?;
    let mask: Vec<f64> = (0..t * t)
        .map(|k| {
            if k % t > k / t {
                f64::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?.to_dtype(dt)?;
    x.broadcast_add(&mask)
}

#[test]
fn softmax_matches_composed() -> Result<()> {
    let mut rng = Rng(6);
    let x = masked_scores(&mut rng, 2, 9, 37, DType::F32)?;
    let r = rng.tensor(&[2, 9, 37, 37], 1.0, DType::F32)?;
    compare(
        "softmax",
        std::slice::from_ref(&x),
        &r,
        &|t| super::softmax_last_dim(&t[0]),
        &|t| composed::softmax_last_dim(&t[0]),
        1e-5,
    )?;
    // Masked entries are exactly zero.
    let y = super::softmax_last_dim(&x)?;
    let masked = y.i_masked(&x)?;
    assert_eq!(masked, 0.0);
    Ok(())
}

/// Σ |y| over the entries where x is -inf.
trait MaskedSum {
    fn i_masked(&self, x: &Tensor) -> Result<f64>;
}

impl MaskedSum for Tensor {
    fn i_masked(&self, x: &Tensor) -> Result<f64> {
        let ys = self.flatten_all()?.to_vec1::<f32>()?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        Ok(ys
            .iter()
            .zip(&xs)
            .filter(|(_, x)| x.is_infinite())
            .map(|(y, _)| y.abs() as f64)
            .sum())
    }
}

#[test]
fn softmax_finite_difference_f64() -> Result<()> {
    let mut rng = Rng(7);
    let x = rng.tensor(&[3, 5, 13], 3.0, DType::F64)?;
    let r = rng.tensor(&[3, 5, 13], 1.0, DType::F64)?;
    let f = |t: &[Tensor]| super::softmax_last_dim(&t[0]);
    finite_diff("softmax", &[x], 0, &r, &f, &mut rng)
}

#[test]
fn silu_mul_matches_composed() -> Result<()> {
    let mut rng = Rng(8);
    // Enough elements for several rayon chunks, and gates far into both tails.
    let g = rng.tensor(&[37, 1536], 12.0, DType::F32)?;
    let u = rng.tensor(&[37, 1536], 2.0, DType::F32)?;
    let r = rng.tensor(&[37, 1536], 1.0, DType::F32)?;
    compare(
        "silu_mul",
        &[g, u],
        &r,
        &|t| super::silu_mul(&t[0], &t[1]),
        &|t| composed::silu_mul(&t[0], &t[1]),
        1e-5,
    )
}

#[test]
fn silu_mul_finite_difference_f64() -> Result<()> {
    let mut rng = Rng(9);
    let g = rng.tensor(&[7, 30], 5.0, DType::F64)?;
    let u = rng.tensor(&[7, 30], 2.0, DType::F64)?;
    let r = rng.tensor(&[7, 30], 1.0, DType::F64)?;
    let f = |t: &[Tensor]| super::silu_mul(&t[0], &t[1]);
    let ins = [g, u];
    finite_diff("silu_mul d gate", &ins, 0, &r, &f, &mut rng)?;
    finite_diff("silu_mul d up", &ins, 1, &r, &f, &mut rng)
}

fn nll_inputs(rng: &mut Rng, n: usize, v: usize, dt: DType) -> Result<(Tensor, Tensor, Tensor)> {
    let logits = rng.tensor(&[n, v], 8.0, dt)?;
    let t: Vec<u32> = (0..n)
        .map(|_| (rng.next_f64() * v as f64) as u32 % v as u32)
        .collect();
    let w: Vec<f64> = (0..n)
        .map(|i| {
            if i % 4 == 1 {
                0.0
            } else {
                rng.next_f64() * 2.0
            }
        })
        .collect();
    Ok((
        logits,
        Tensor::from_vec(t, n, &Device::Cpu)?,
        Tensor::from_vec(w, n, &Device::Cpu)?.to_dtype(dt)?,
    ))
}

#[test]
fn weighted_nll_matches_composed() -> Result<()> {
    let mut rng = Rng(10);
    let (l, t, w) = nll_inputs(&mut rng, 50, 384, DType::F32)?;
    let r = Tensor::new(1.7f32, &Device::Cpu)?;
    compare(
        "weighted_nll",
        &[l],
        &r,
        &|x| super::weighted_nll(&x[0], &t, &w),
        &|x| composed::weighted_nll(&x[0], &t, &w),
        1e-5,
    )?;
    // Zero-weight rows get an exactly-zero gradient.
    let lv = Var::from_tensor(&rng.tensor(&[8, 16], 1.0, DType::F32)?)?;
    let t8 = Tensor::new(&[1u32, 2, 3, 4, 5, 6, 7, 0], &Device::Cpu)?;
    let w8 = Tensor::new(&[0f32, 1., 0., 1., 0., 1., 0., 1.], &Device::Cpu)?;
    let g = super::weighted_nll(&lv, &t8, &w8)?.backward()?;
    let g = g.get(&lv).expect("grad").sum(D::Minus1)?.to_vec1::<f32>()?;
    assert!(g.iter().all(|s| s.abs() < 1e-6));
    Ok(())
}

#[test]
fn weighted_nll_finite_difference_f64() -> Result<()> {
    let mut rng = Rng(11);
    let (l, t, w) = nll_inputs(&mut rng, 9, 37, DType::F64)?;
    let f = |x: &[Tensor]| super::weighted_nll(&x[0], &t, &w);
    finite_diff("weighted_nll", &[l], 0, &scalar_one()?, &f, &mut rng)
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 8), DType::F32, &dev)?;
    assert!(super::rms_norm(&x, &Tensor::zeros(7, DType::F32, &dev)?, 1e-6).is_err());
    let (c, s) = rope_tables(4, 8, DType::F32)?;
    let q = Tensor::zeros((1, 2, 5, 8), DType::F32, &dev)?;
    assert!(super::rope(&q, &c, &s).is_err(), "T larger than the table");
    assert!(super::silu_mul(&x, &Tensor::zeros((8, 2), DType::F32, &dev)?).is_err());
    let t = Tensor::new(&[0u32, 8], &dev)?;
    let w = Tensor::ones(2, DType::F32, &dev)?;
    assert!(
        super::weighted_nll(&x, &t, &w).is_err(),
        "target out of range"
    );
    assert!(super::weighted_nll(&x, &t.narrow(0, 0, 1)?, &w).is_err());
    Ok(())
}

#[test]
fn composed_path_for_other_dtypes() -> Result<()> {
    // bf16 is not fused on CPU: it must still run (and differentiate) via the composed path.
    let mut rng = Rng(12);
    let x = rng.tensor(&[4, 32], 1.0, DType::BF16)?;
    let w = Tensor::ones(32, DType::BF16, &Device::Cpu)?;
    let y = super::rms_norm(&x, &w, 1e-6)?;
    assert_eq!(y.dtype(), DType::BF16);
    let f = super::softmax_last_dim(&x)?;
    assert_eq!(f.dims(), &[4, 32]);
    Ok(())
}

/// q [B, H, T, D], k/v [B, Hkv, T, D] and a right-padded key mask (batch 1 has 5 pads).
fn attention_inputs(
    rng: &mut Rng,
    dt: DType,
    h: usize,
    hkv: usize,
    t: usize,
    d: usize,
) -> Result<[Tensor; 4]> {
    let q = rng.tensor(&[2, h, t, d], 1.5, dt)?;
    let k = rng.tensor(&[2, hkv, t, d], 1.5, dt)?;
    let v = rng.tensor(&[2, hkv, t, d], 1.0, dt)?;
    let kp: Vec<u32> = (0..2 * t)
        .map(|i| u32::from(i < t || i % t < t - 5))
        .collect();
    Ok([q, k, v, Tensor::from_vec(kp, (2, t), &Device::Cpu)?])
}

#[test]
fn causal_attention_matches_composed() -> Result<()> {
    let mut rng = Rng(13);
    // T = 150 spans three causal query blocks (the last one partial).
    for (h, hkv, t, pad) in [(9, 3, 37, true), (4, 4, 37, false), (9, 3, 150, true)] {
        let [q, k, v, kp] = attention_inputs(&mut rng, DType::F32, h, hkv, t, 64)?;
        let kp = pad.then_some(kp);
        let r = rng.tensor(&[2, h, t, 64], 1.0, DType::F32)?;
        let scale = 1.0 / 8.0;
        compare(
            &format!("causal_attention h={h} hkv={hkv} t={t} pad={pad}"),
            &[q, k, v],
            &r,
            &|x| super::causal_attention(&x[0], &x[1], &x[2], kp.as_ref(), scale),
            &|x| composed::causal_attention(&x[0], &x[1], &x[2], kp.as_ref(), scale),
            1e-5,
        )?;
    }
    Ok(())
}

#[test]
fn causal_attention_fully_masked_rows_are_zero() -> Result<()> {
    // Left padding: query 0 of batch 0 has no valid key.
    let mut rng = Rng(14);
    let [q, k, v, _] = attention_inputs(&mut rng, DType::F32, 2, 2, 6, 8)?;
    let kp = Tensor::new(&[[0u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], &Device::Cpu)?;
    let r = rng.tensor(&[2, 2, 6, 8], 1.0, DType::F32)?;
    compare(
        "causal_attention left pad",
        &[q.clone(), k.clone(), v.clone()],
        &r,
        &|x| super::causal_attention(&x[0], &x[1], &x[2], Some(&kp), 0.3),
        &|x| composed::causal_attention(&x[0], &x[1], &x[2], Some(&kp), 0.3),
        1e-5,
    )?;
    let y = super::causal_attention(&q, &k, &v, Some(&kp), 0.3)?;
    assert_eq!(max_abs(&y.get(0)?.narrow(1, 0, 1)?)?, 0.0);
    Ok(())
}

#[test]
fn causal_attention_finite_difference_f64() -> Result<()> {
    let mut rng = Rng(15);
    // T = 70 > one causal query block, so the block bookkeeping is differentiated too.
    let [q, k, v, kp] = attention_inputs(&mut rng, DType::F64, 4, 2, 70, 4)?;
    let r = rng.tensor(&[2, 4, 70, 4], 1.0, DType::F64)?;
    let f = |x: &[Tensor]| super::causal_attention(&x[0], &x[1], &x[2], Some(&kp), 0.35);
    finite_diff_each("causal_attention", &[q, k, v], &r, &f, &mut rng)
}

#[test]
fn weighted_nll_linear_matches_composed() -> Result<()> {
    let mut rng = Rng(16);
    // 600 rows: two full 256-row blocks and a partial one.
    let (_, t, w) = nll_inputs(&mut rng, 600, 384, DType::F32)?;
    let h = rng.tensor(&[600, 64], 1.0, DType::F32)?;
    let wt = rng.tensor(&[384, 64], 0.5, DType::F32)?;
    let r = Tensor::new(0.7f32, &Device::Cpu)?;
    compare(
        "weighted_nll_linear",
        std::slice::from_ref(&h),
        &r,
        &|x| super::weighted_nll_linear(&x[0], &wt, &t, &w, None),
        &|x| composed::weighted_nll(&x[0].matmul(&wt.t()?)?, &t, &w),
        1e-5,
    )?;
    // A trainable weight takes the composed path and gets its gradient.
    let (hv, wv) = (Var::from_tensor(&h)?, Var::from_tensor(&wt)?);
    let g = super::weighted_nll_linear(&hv, &wv, &t, &w, None)?.backward()?;
    assert!(g.get(&hv).is_some() && g.get(&wv).is_some());
    // A bf16 weight (a bf16 base's tied embedding) is used as stored: close to the f32 path on
    // the same weight values (the AVX-512 BF16 kernel also rounds h to bf16).
    let w16 = wt.to_dtype(DType::BF16)?;
    let w32 = w16.to_dtype(DType::F32)?;
    let (yf, gf) = grads(std::slice::from_ref(&h), &r, &|x| {
        super::weighted_nll_linear(&x[0], &w16, &t, &w, None)
    })?;
    let (yr, gr) = grads(std::slice::from_ref(&h), &r, &|x| {
        composed::weighted_nll(&x[0].matmul(&w32.t()?)?, &t, &w)
    })?;
    assert_close("bf16 weight forward", &yf, &yr, 1e-2)?;
    assert_close("bf16 weight grad", &gf[0], &gr[0], 2e-2)?;
    // With the weight's kept panels (both layouts: forward and dL/dh): the same bits, on first
    // use and after.
    let cache = super::PackCache::default();
    let bits = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    for pass in ["first", "kept"] {
        let (yk, gk) = grads(std::slice::from_ref(&h), &r, &|x| {
            super::weighted_nll_linear(&x[0], &w16, &t, &w, Some(&cache))
        })?;
        assert_eq!(bits(&yk)?, bits(&yf)?, "{pass} use: loss");
        assert_eq!(bits(&gk[0])?, bits(&gf[0])?, "{pass} use: gradient");
    }
    // The composed path (a trainable weight here; any weight off the CPU) takes the same mixed
    // dtypes: the bf16 weight is converted for the matmul.
    let w16v = Var::from_tensor(&w16)?;
    let yc = super::weighted_nll_linear(&h, &w16v, &t, &w, None)?;
    assert_close("bf16 weight, composed path", &yc, &yr, 1e-4)?;
    Ok(())
}

#[test]
fn weighted_nll_linear_finite_difference_f64() -> Result<()> {
    let mut rng = Rng(17);
    let (_, t, w) = nll_inputs(&mut rng, 40, 29, DType::F64)?;
    let h = rng.tensor(&[40, 6], 1.0, DType::F64)?;
    let wt = rng.tensor(&[29, 6], 1.0, DType::F64)?;
    let f = |x: &[Tensor]| super::weighted_nll_linear(&x[0], &wt, &t, &w, None);
    finite_diff("weighted_nll_linear", &[h], 0, &scalar_one()?, &f, &mut rng)
}

/// Token-major q [2, T, H, D], k/v [2, T, Hkv, D], and a [2, T] key mask whose batch 0 is
/// left-padded by 3 (its first queries see no valid key) and batch 1 right-padded by 5.
fn token_major_inputs(rng: &mut Rng, dt: DType, [h, hkv, t, d]: [usize; 4]) -> Result<[Tensor; 4]> {
    let q = rng.tensor(&[2, t, h, d], 1.5, dt)?;
    let k = rng.tensor(&[2, t, hkv, d], 1.5, dt)?;
    let v = rng.tensor(&[2, t, hkv, d], 1.0, dt)?;
    let kp: Vec<u32> = (0..2 * t)
        .map(|i| u32::from(if i < t { i >= 3 } else { i % t < t - 5 }))
        .collect();
    Ok([q, k, v, Tensor::from_vec(kp, (2, t), &Device::Cpu)?])
}

/// The unfused sequence in composed ops only: to [B, H, T, D], rope, attention, back.
fn rope_attention_reference(
    x: &[Tensor],
    cos: &Tensor,
    sin: &Tensor,
    kp: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let heads = |x: &Tensor| x.transpose(1, 2)?.contiguous();
    let q = composed::rope(&heads(&x[0])?, cos, sin)?;
    let k = composed::rope(&heads(&x[1])?, cos, sin)?;
    composed::causal_attention(&q, &k, &heads(&x[2])?, kp, scale)?.transpose(1, 2)
}

#[test]
fn rope_causal_attention_matches_composed() -> Result<()> {
    let mut rng = Rng(18);
    // T = 70: two causal query blocks; tables longer than T (only the first T rows count).
    let (h, hkv, t, d) = (4, 2, 70, 32);
    let (c, s) = rope_tables(80, d, DType::F32)?;
    let [q, k, v, kp] = token_major_inputs(&mut rng, DType::F32, [h, hkv, t, d])?;
    let r = rng.tensor(&[2, t, h, d], 1.0, DType::F32)?;
    for kp in [None, Some(&kp)] {
        compare(
            &format!("rope_causal_attention pad={}", kp.is_some()),
            &[q.clone(), k.clone(), v.clone()],
            &r,
            &|x| super::rope_causal_attention(&x[0], &x[1], &x[2], &c, &s, kp, 0.2),
            &|x| rope_attention_reference(x, &c, &s, kp, 0.2),
            1e-5,
        )?;
    }
    // Fully masked query rows (left padding) output exactly 0.
    let y = super::rope_causal_attention(&q, &k, &v, &c, &s, Some(&kp), 0.2)?;
    assert_eq!(max_abs(&y.get(0)?.narrow(0, 0, 3)?)?, 0.0);
    // Merged heads ([B, T, H·D], as the projections output them): same values and gradients,
    // on the fused path and on the fallback (bf16 is not fused).
    let merge = |x: &Tensor| x.flatten_from(2);
    let r3 = merge(&r)?;
    compare(
        "rope_causal_attention merged heads",
        &[merge(&q)?, merge(&k)?, merge(&v)?],
        &r3,
        &|x| super::rope_causal_attention(&x[0], &x[1], &x[2], &c, &s, Some(&kp), 0.2),
        &|x| {
            let split = |x: &Tensor, n: usize| x.reshape((2, t, n, d));
            let (q, k, v) = (split(&x[0], h)?, split(&x[1], hkv)?, split(&x[2], hkv)?);
            rope_attention_reference(&[q, k, v], &c, &s, Some(&kp), 0.2)?.flatten_from(2)
        },
        1e-5,
    )?;
    let bf = |x: &Tensor| merge(x)?.to_dtype(DType::BF16);
    let (cb, sb) = (c.to_dtype(DType::BF16)?, s.to_dtype(DType::BF16)?);
    let y16 = super::rope_causal_attention(&bf(&q)?, &bf(&k)?, &bf(&v)?, &cb, &sb, Some(&kp), 0.2)?;
    assert_eq!(y16.dims(), [2, t, h * d]);
    assert_close(
        "merged heads bf16 fallback",
        &y16.to_dtype(DType::F32)?,
        &merge(&y)?,
        5e-2,
    )?;
    // A merged width that is not a multiple of D is an error, not a panic.
    let bad = Tensor::zeros((2, t, h * d + 1), DType::F32, &Device::Cpu)?;
    assert!(
        super::rope_causal_attention(&bad, &merge(&k)?, &merge(&v)?, &c, &s, None, 0.2).is_err()
    );
    Ok(())
}

#[test]
fn rope_causal_attention_fallback_for_other_dtypes() -> Result<()> {
    // bf16 is not fused: the transpose + rope + causal_attention sequence runs instead.
    let mut rng = Rng(19);
    let (c, s) = rope_tables(9, 8, DType::F32)?;
    let [q, k, v, kp] = token_major_inputs(&mut rng, DType::F32, [4, 2, 9, 8])?;
    let f32_out = super::rope_causal_attention(&q, &k, &v, &c, &s, Some(&kp), 0.3)?;
    let bf = |x: &Tensor| x.to_dtype(DType::BF16);
    let bf16_out = super::rope_causal_attention(
        &bf(&q)?,
        &bf(&k)?,
        &bf(&v)?,
        &bf(&c)?,
        &bf(&s)?,
        Some(&kp),
        0.3,
    )?;
    assert_eq!(bf16_out.dtype(), DType::BF16);
    assert_close("bf16 fallback", &bf16_out, &f32_out, 5e-2)
}

#[test]
fn rope_causal_attention_finite_difference_f64() -> Result<()> {
    let mut rng = Rng(20);
    let (h, hkv, t, d) = (4, 2, 70, 8);
    let (c, s) = rope_tables(t, d, DType::F64)?;
    let [q, k, v, kp] = token_major_inputs(&mut rng, DType::F64, [h, hkv, t, d])?;
    let r = rng.tensor(&[2, t, h, d], 1.0, DType::F64)?;
    let f =
        |x: &[Tensor]| super::rope_causal_attention(&x[0], &x[1], &x[2], &c, &s, Some(&kp), 0.35);
    finite_diff_each("rope_causal_attention", &[q, k, v], &r, &f, &mut rng)
}

#[test]
fn rope_causal_attention_bad_inputs_are_errors() -> Result<()> {
    let dev = Device::Cpu;
    let z = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &dev);
    let (c, s) = rope_tables(6, 8, DType::F32)?;
    let (q, kv) = (z(&[2, 6, 4, 8])?, z(&[2, 6, 2, 8])?);
    let call = |q: &Tensor, k: &Tensor, c: &Tensor, kp: Option<&Tensor>| {
        super::rope_causal_attention(q, k, k, c, &s, kp, 1.0)
    };
    assert!(call(&q, &kv, &c, None).is_ok());
    assert!(
        call(&q, &z(&[2, 6, 3, 8])?, &c, None).is_err(),
        "H % Hkv != 0"
    );
    assert!(
        call(&q, &z(&[2, 5, 2, 8])?, &c, None).is_err(),
        "k has another T"
    );
    assert!(call(&z(&[2, 6, 4])?, &kv, &c, None).is_err(), "q not 4-D");
    assert!(
        call(&z(&[2, 7, 4, 8])?, &z(&[2, 7, 2, 8])?, &c, None).is_err(),
        "T > table rows"
    );
    assert!(
        call(&q, &kv, &c.narrow(1, 0, 3)?, None).is_err(),
        "cos not [T, D/2]"
    );
    assert!(
        call(&q, &kv, &c, Some(&z(&[2, 5])?)).is_err(),
        "key_padding shape"
    );
    let odd = |x: &Tensor| x.narrow(3, 0, 7);
    assert!(call(&odd(&q)?, &odd(&kv)?, &c, None).is_err(), "odd D");
    Ok(())
}

#[test]
fn candles_no_backward_kernels_match_the_composed_ops() -> Result<()> {
    // The graph-free accelerator path swaps these in for the composed ops: same contract (rope
    // takes the first T rows of longer tables; -inf gives exactly 0 in softmax).
    let mut rng = Rng(41);
    let x = rng.tensor(&[2, 3, 5, 8], 1.0, DType::F32)?;
    let (cos, sin) = rope_tables(7, 8, DType::F32)?;
    assert_close(
        "rope",
        &super::rope_no_backward(&x, &cos, &sin)?,
        &composed::rope(&x, &cos, &sin)?,
        1e-6,
    )?;
    let h = rng.tensor(&[4, 64], 1.0, DType::F32)?;
    let w = rng.tensor(&[64], 1.0, DType::F32)?;
    assert_close(
        "rms_norm",
        &super::rms_norm_no_backward(&h, &w, 1e-5)?,
        &composed::rms_norm(&h, &w, 1e-5)?,
        1e-6,
    )?;
    let mut v = rng.tensor(&[3, 50], 2.0, DType::F32)?.to_vec2::<f32>()?;
    v[1][7] = f32::NEG_INFINITY;
    let s = Tensor::new(v, &Device::Cpu)?;
    let fused = super::softmax_no_backward(&s)?;
    assert_close("softmax", &fused, &composed::softmax_last_dim(&s)?, 1e-6)?;
    assert_eq!(fused.to_vec2::<f32>()?[1][7], 0.0);
    Ok(())
}

/// A thread's scratch is the same memory on its next call (no fresh pages to fault in), grows
/// when a call needs more, and a nested call on the same thread gets a buffer of its own.
#[test]
fn scratch_is_reused_per_thread_and_nested_calls_get_their_own() {
    // SAFETY: the closure writes every element before reading any.
    let first = unsafe {
        kernel::with_scratch::<f32, _>(1000, |s| {
            s.fill(1.0);
            s.as_ptr() as usize
        })
    };
    // SAFETY: the closure reads no element.
    let again = unsafe { kernel::with_scratch::<f32, _>(500, |s| s.as_ptr() as usize) };
    assert_eq!(first, again, "a smaller request reuses the buffer");
    // SAFETY: both closures fill their buffers before reading them.
    let (outer, inner, sum) = unsafe {
        kernel::with_scratch::<f64, _>(4000, |outer| {
            outer.fill(2.0);
            let (inner, sum) = kernel::with_scratch::<f64, _>(4000, |inner| {
                inner.fill(3.0);
                (inner.as_ptr() as usize, inner.iter().sum::<f64>())
            });
            assert!(
                outer.iter().all(|v| *v == 2.0),
                "the nested call wrote elsewhere"
            );
            (outer.as_ptr() as usize, inner, sum)
        })
    };
    assert_ne!(outer, inner);
    assert_eq!(sum, 12_000.0);
    // 4000 f64 outgrew the 1000 f32 of the first call; the grown buffer is kept.
    // SAFETY: the closure reads no element.
    let grown = unsafe { kernel::with_scratch::<f64, _>(4000, |s| s.as_ptr() as usize) };
    assert_eq!(grown, outer);
}
