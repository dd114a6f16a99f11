//! Composed (candle tensor op) versions of the fused ops: differentiable on every device and
//! dtype. Used as the non-CPU fallback and as the reference in tests and benchmarks.

use candle_core::{bail, DType, Result, Tensor, D};

/// Composed RMS norm; f16/bf16 are normalised in f32 (HF semantics).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = match dt {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dt)?;
    normed.broadcast_mul(weight)
}

/// Composed HF rope (`candle_nn::rotary_emb::rope_slow`), with the same shape checks as the
/// fused op.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    super::rope::check_dims(x.dims(), cos.dims(), sin.dims())?;
    candle_nn::rotary_emb::rope_slow(x, cos, sin)
}

/// Composed softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Composed `silu(gate) * up`.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        bail!(
            "silu_mul: gate {:?} and up {:?} must have the same shape",
            gate.dims(),
            up.dims()
        );
    }
    gate.silu()? * up
}

/// Composed weighted NLL sum via log_softmax + gather.
pub fn weighted_nll(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    super::nll::check_dims(logits.dims(), targets.dims(), weights.dims())?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    (picked * weights.to_dtype(logits.dtype())?)?
        .neg()?
        .sum_all()
}

/// Composed causal attention with the same contract as [`super::causal_attention`]
/// (fully-masked query rows give 0, not NaN).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_padding: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    let (k, v) = if hkv != h {
        let rep = h / hkv;
        let expand =
            |x: &Tensor| -> Result<Tensor> { Tensor::cat(&vec![x; rep], 2)?.reshape((b, h, t, d)) };
        (expand(k)?, expand(v)?)
    } else {
        (k.clone(), v.clone())
    };
    // allowed[b, 1, i, j] = (j <= i) · key_valid[b, j], as 0/1 in the compute dtype.
    let dev = q.device();
    let causal: Vec<u8> = (0..t * t).map(|x| u8::from(x % t <= x / t)).collect();
    let causal = Tensor::from_vec(causal, (1, 1, t, t), dev)?.to_dtype(q.dtype())?;
    let allowed = match key_padding {
        Some(kp) => {
            let kp = kp.to_dtype(DType::F32)?;
            let kv = kp.ne(&kp.zeros_like()?)?.to_dtype(q.dtype())?;
            let kv = kv.reshape((b, 1, 1, t))?;
            causal.broadcast_mul(&kv)?
        }
        None => causal,
    };
    // A large finite bias instead of -inf keeps fully-masked rows finite; they are then
    // zeroed by the multiplicative mask.
    let bias = ((allowed.ones_like()? - &allowed)? * -1e30)?;
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
    let p = softmax_last_dim(&scores)?.broadcast_mul(&allowed)?;
    p.matmul(&v)
}
