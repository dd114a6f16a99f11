//! Differentiable building blocks of the decoder. These composed versions are the reference
//! implementations; candle's fused `rms_norm`, `softmax_last_dim` and `rope` have no backward.

use candle_core::{DType, Result, Tensor, D};

/// At least f32: reductions in half precision lose too much; f64 (gradient checks) stays f64.
fn wide(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `x / sqrt(mean(x²) + eps) * weight`, normalised in f32 as transformers does.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(wide(dtype))?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(&weight.to_dtype(dtype)?)
}

/// HF rotary embedding (rotate_half layout); x `[B, H, T, D]`, cos/sin `[T, D/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    candle_nn::rotary_emb::rope_slow(x, &cos.to_dtype(x.dtype())?, &sin.to_dtype(x.dtype())?)
}

/// Softmax over the last dimension, in f32.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    candle_nn::ops::softmax(&x.to_dtype(wide(dtype))?, D::Minus1)?.to_dtype(dtype)
}

/// `silu(gate) * up`, the SwiGLU MLP activation.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// `Σ_i w_i · -log softmax(logits_i)[target_i]` (a sum; the caller normalises).
pub fn weighted_nll(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(wide(logits.dtype()))?, D::Minus1)?;
    let picked = logp
        .gather(&targets.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    (picked * weights.to_dtype(logp.dtype())?)?.sum_all()?.neg()
}
