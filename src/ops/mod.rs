//! Fused, differentiable ops for training on CPU.
//!
//! candle 0.11.1's fused `rms_norm`, `softmax_last_dim` and `rope*` have no backward (their
//! gradients silently vanish) and the composed equivalents are slow on CPU. Every public
//! function here dispatches: CPU tensors in f32/f64 run a rayon-parallel CustomOp with a
//! hand-written backward; any other device or dtype runs the composed, autograd-friendly
//! implementation in [`composed`] (which is also the reference the tests compare against),
//! except that tensors on an accelerator outside any autograd graph (decoding, evaluation) take
//! candle's own one-launch kernels, which have no backward and need none there.

mod attention;
pub mod composed;
pub(crate) mod gemm;
pub(crate) mod kernel;
mod nll;
mod nll_linear;
pub(crate) mod rms_norm;
mod rope;
pub(crate) mod silu_mul;
mod softmax;
#[cfg(test)]
mod tests;
mod tuning;
pub(crate) mod wgemm;

pub(crate) use attention::AttentionOp;
use candle_core::{DType, Result, Tensor};
pub use tuning::{limit_candle_spinning, tune_glibc_malloc, HugePageAlloc};
pub use wgemm::{pack_cache_budget, PackCache};

/// True when every tensor is on the CPU and in the same float dtype the fused kernels support.
pub(crate) fn fused(ts: &[&Tensor]) -> bool {
    let dt = ts[0].dtype();
    matches!(dt, DType::F32 | DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dt)
}

/// True when every tensor lives on an accelerator and none can pass a gradient (none reaches a
/// `Var`): candle's fused kernels, which have no backward, then stand in for the composed ops
/// at one launch instead of several (decoding and evaluation are launch-bound on a GPU).
fn graph_free_accel(ts: &[&Tensor]) -> bool {
    let dt = ts[0].dtype();
    graph_free_path_enabled()
        && matches!(dt, DType::F32 | DType::F16 | DType::BF16)
        && ts
            .iter()
            .all(|t| !t.device().is_cpu() && !t.track_op() && t.dtype() == dt)
}

/// Whether graph-free passes on an accelerator take their own path (candle's no-backward kernels
/// here, LoRA factors as plain values in the decoder): `PEFT_WIT_GRAPH_FREE=0` turns it off, to
/// measure what it gives.
pub(crate) fn graph_free_path_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("PEFT_WIT_GRAPH_FREE").map_or(true, |v| v != "0"))
}

// candle's one-launch kernels for the graph-free accelerator path (each has a CPU version too,
// which the tests compare with the composed ops).
fn rms_norm_no_backward(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32)
}

fn rope_no_backward(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope::check_dims(x.dims(), cos.dims(), sin.dims())?;
    candle_nn::rotary_emb::rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)
}

fn softmax_no_backward(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax_last_dim(&x.contiguous()?)
}

/// RMS norm over the last dim (Llama/HF): `y = x / sqrt(mean(x²) + eps) * weight`.
///
/// `x`: `[..., H]`, `weight`: `[H]`, same dtype. f16/bf16 inputs (composed path) are
/// normalised in f32, cast back, then multiplied by the weight, as HF does.
/// Gradients: dL/dx always; dL/dweight only when `weight` is a `Var` or depends on one
/// (a frozen weight gets none, which saves a reduction and a stored tensor).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(&[x, weight]) {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, rms_norm::RmsNormOp { eps })
    } else if graph_free_accel(&[x, weight]) && x.dtype() == DType::F32 {
        // Half precision keeps the composed path: HF rounds the normalised value before the
        // weight multiplies it, candle's kernel once at the end.
        rms_norm_no_backward(x, weight, eps)
    } else {
        composed::rms_norm(x, weight, eps)
    }
}

/// HF rotary embedding (non-interleaved, "rotate_half"), same contract as
/// `candle_nn::rotary_emb::rope_slow`: `x` `[B, H, T, D]`, `cos`/`sin` `[T', D/2]` with
/// `T' >= T` (the first T rows are used), all the same dtype.
/// Gradient: dL/dx only; `cos`/`sin` are treated as constants (no gradient, even if tracked).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused(&[x, cos, sin]) {
        rope::check_dims(x.dims(), cos.dims(), sin.dims())?;
        x.contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, rope::RopeOp)
    } else if graph_free_accel(&[x, cos, sin]) {
        rope_no_backward(x, cos, sin)
    } else {
        composed::rope(x, cos, sin)
    }
}

/// Softmax over the last dim. `-inf` entries give exactly 0; a row that is entirely `-inf`
/// gives NaN (as the composed version does). Gradient: dL/dx.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused(&[x]) {
        x.contiguous()?.apply_op1(softmax::SoftmaxOp)
    } else if graph_free_accel(&[x]) {
        softmax_no_backward(x)
    } else {
        composed::softmax_last_dim(x)
    }
}

/// SwiGLU activation `silu(gate) * up`; `gate` and `up` have the same shape and dtype (no
/// broadcasting). Gradients: to both inputs (each only if it is a `Var` or depends on one).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused(&[gate, up]) {
        gate.contiguous()?
            .apply_op2(&up.contiguous()?, silu_mul::SiluMulOp)
    } else {
        composed::silu_mul(gate, up)
    }
}

/// Weighted token NLL, summed (not averaged): `Σ_i w_i · (logsumexp(logits_i) − logits_i[t_i])`.
///
/// `logits`: `[N, V]` f32 (f64 also fused), `targets`: `[N]` u32 (< V, checked), `weights`:
/// `[N]` same dtype as logits. Returns a scalar (shape `[]`) in the logits dtype; the sum is
/// accumulated in f64. Rows with weight 0 are skipped (their logits may be anything finite).
/// Gradient: dL/dlogits only (targets and weights are constants).
pub fn weighted_nll(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    if fused(&[logits, weights]) && targets.device().is_cpu() && targets.dtype() == DType::U32 {
        nll::check_dims(logits.dims(), targets.dims(), weights.dims())?;
        logits.contiguous()?.apply_op3(
            &targets.contiguous()?,
            &weights.contiguous()?,
            nll::WeightedNllOp::new(),
        )
    } else {
        composed::weighted_nll(logits, targets, weights)
    }
}

/// Causal self-attention `softmax(scale·q·kᵀ + mask)·v`, fused (no [B, H, T, T] tensor enters
/// the autograd graph on the fused path).
///
/// `q`: `[B, H, T, D]`; `k`, `v`: `[B, Hkv, T, D]` with `H % Hkv == 0` (grouped-query
/// attention: query head `h` uses kv head `h / (H / Hkv)`, as HF's `repeat_kv`); all the same
/// dtype. Query `i` attends to keys `j <= i` that are not padding. `key_padding`: optional
/// `[B, T]` of any dtype, nonzero = real token, 0 = padding. A query row with no valid key
/// (e.g. a left-padded position) outputs 0 and passes no gradient (instead of NaN).
/// Returns `[B, H, T, D]`. Gradients: to q, k and v (each only if it can reach a `Var`).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_padding: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let layout = attention::HeadLayout::HeadMajor;
    let dm = attention::check_dims(layout, q.dims(), k.dims(), v.dims())?;
    check_key_padding("causal_attention", key_padding, dm.b, dm.t)?;
    if fused(&[q, k, v]) {
        let op = attention::AttentionOp::new(scale, key_validity(key_padding)?, layout, None);
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    } else {
        composed::causal_attention(q, k, v, key_padding, scale)
    }
}

/// The output weight the fused vocabulary kernels take for `hidden` (CPU, f32/f64): one of the
/// same dtype, or a bf16 weight (a bf16 base's tied embedding) under f32 hidden states —
/// multiplied as stored where the CPU has AVX-512 BF16, else converted once; both beat
/// materialising `[N, V]` logits. `None`: the composed path runs instead.
fn fused_output_weight(hidden: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    if !fused(&[hidden]) || !weight.device().is_cpu() {
        return Ok(None);
    }
    Ok(match weight.dtype() {
        dt if dt == hidden.dtype() => Some(weight.clone()),
        DType::BF16 if hidden.dtype() == DType::F32 => Some(if gemm::bf16_supported::<f32>() {
            weight.clone()
        } else {
            weight.to_dtype(DType::F32)?
        }),
        _ => None,
    })
}

/// Per-row `−log softmax(hidden·weightᵀ)[target]` as plain numbers (no autograd), computed
/// block by block so the `[N, V]` logits are never held at once.
///
/// `hidden`: `[N, H]`, `weight`: `[V, H]`, same dtype; `targets`: one per row. Fused on CPU for
/// f32/f64; otherwise logits + log-softmax in chunks of rows. `cache`: the weight's own kept
/// panels (see [`PackCache`]), for a bf16 weight multiplied as stored.
pub fn row_nll_linear(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    cache: Option<&PackCache>,
) -> Result<Vec<f64>> {
    let (n, hd, v) = nll_linear::check_dims(hidden.dims(), weight.dims(), targets.len())?;
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("row_nll_linear: target {bad} out of range for vocabulary {v}");
    }
    let cache = kept_panels(weight, cache);
    if let Some(weight) = fused_output_weight(hidden, weight)? {
        fn run<T: kernel::Elem>(
            h: &Tensor,
            w: &Tensor,
            t: &[u32],
            (hd, v): (usize, usize),
            cache: Option<&PackCache>,
        ) -> Result<Vec<f64>> {
            kernel::with_cpu_slices::<T, _>(&[h], |h| {
                gemm::with_weight_data::<T, _>(w, |w| nll_linear::row_nll(h[0], w, t, hd, v, cache))
            })
        }
        return match hidden.dtype() {
            DType::F32 => run::<f32>(hidden, &weight, targets, (hd, v), cache),
            _ => run::<f64>(hidden, &weight, targets, (hd, v), cache),
        };
    }
    const CHUNK: usize = 256;
    let weight = weight_as(weight, hidden)?;
    let mut out = Vec::with_capacity(n);
    for r0 in (0..n).step_by(CHUNK) {
        let m = CHUNK.min(n - r0);
        let logits = hidden
            .narrow(0, r0, m)?
            .matmul(&weight.t()?)?
            .to_dtype(DType::F32)?;
        let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
        let t = Tensor::from_slice(&targets[r0..r0 + m], m, hidden.device())?;
        let picked: Vec<f32> = logp.gather(&t.unsqueeze(1)?, 1)?.squeeze(1)?.to_vec1()?;
        out.extend(picked.into_iter().map(|lp| -(lp as f64)));
    }
    Ok(out)
}

/// Rotary embedding of q and k followed by causal attention, in the token-major layout the
/// projections produce: one graph node, no transposes or copies between them.
///
/// `q`: `[B, T, H, D]`; `k`, `v`: `[B, T, Hkv, D]`; `cos`, `sin`: `[T' >= T, D/2]` (the first
/// T rows are used); all the same dtype. `key_padding`: optional `[B, T]`, nonzero = real
/// token. Returns `[B, T, H, D]`. The heads may also come merged, `[B, T, H·D]` and
/// `[B, T, Hkv·D]` as the projections output them (D is read off the rope tables); the result
/// is then `[B, T, H·D]`, and no reshape node enters the graph. Same result as [`rope`] on `q`/`k` transposed to
/// `[B, H, T, D]`, then [`causal_attention`], transposed back (which is what runs off the
/// fused path: other devices and dtypes). Gradients: to q, k and v (each only if it can reach
/// a `Var`); `cos`/`sin` are constants. The fused op stores only the per-row logsumexp; the
/// rotated q/k are recomputed in backward.
pub fn rope_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    key_padding: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let layout = attention::HeadLayout::TokenMajor;
    let split = |x: &Tensor| attention::split_heads(x.dims(), cos.dims());
    let dm = attention::check_dims(layout, &split(q)?, &split(k)?, &split(v)?)?;
    rope::check_dims(&[dm.b, dm.h, dm.t, dm.d], cos.dims(), sin.dims())?;
    check_key_padding("rope_causal_attention", key_padding, dm.b, dm.t)?;
    if fused(&[q, k, v, cos, sin]) {
        let op = rope_attention_kernel(cos, sin, key_padding, scale, dm.t)?;
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    } else {
        let heads = |x: &Tensor| x.reshape(split(x)?)?.transpose(1, 2)?.contiguous();
        let out = causal_attention(
            &rope(&heads(q)?, cos, sin)?,
            &rope(&heads(k)?, cos, sin)?,
            &heads(v)?,
            key_padding,
            scale,
        )?;
        out.transpose(1, 2)?.reshape(q.dims())
    }
}

fn check_key_padding(op: &str, key_padding: Option<&Tensor>, b: usize, t: usize) -> Result<()> {
    match key_padding {
        Some(kp) if kp.dims() != [b, t] => {
            candle_core::bail!("{op}: key_padding must be [{b}, {t}], got {:?}", kp.dims())
        }
        _ => Ok(()),
    }
}

/// The attention kernel of [`rope_causal_attention`] (token-major q/k/v, rope inside) for
/// callers that run it within a larger fused CPU op; `cos`/`sin` cover at least `t` positions.
pub(crate) fn rope_attention_kernel(
    cos: &Tensor,
    sin: &Tensor,
    key_padding: Option<&Tensor>,
    scale: f64,
    t: usize,
) -> Result<attention::AttentionOp> {
    let table = |x: &Tensor| x.narrow(0, 0, t)?.contiguous().map(|x| x.detach());
    let tables = Some((table(cos)?, table(sin)?));
    Ok(attention::AttentionOp::new(
        scale,
        key_validity(key_padding)?,
        attention::HeadLayout::TokenMajor,
        tables,
    ))
}

/// The fused ops' form of a key padding mask: `[B·T]` flags, true = real token.
fn key_validity(key_padding: Option<&Tensor>) -> Result<Option<Vec<bool>>> {
    key_padding
        .map(|kp| {
            let flags = kp.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(flags.into_iter().map(|x| x != 0.0).collect())
        })
        .transpose()
}

/// Output projection fused with [`weighted_nll`]: the same scalar as
/// `weighted_nll(&hidden.matmul(&weight.t()?)?, targets, weights)` without materialising the
/// `[N, V]` logits or their gradient.
///
/// `hidden`: `[N, H]`, `weight`: `[V, H]` (lm_head / tied embedding layout, no bias), same
/// dtype (or a bf16 weight under f32 hidden states); `targets`: `[N]` u32; `weights`: `[N]`.
/// Gradient: dL/dhidden only. The fused path requires a constant `weight` (not a Var and not
/// derived from one); otherwise, and off CPU, it falls back to matmul + [`weighted_nll`], which
/// also yields dL/dweight. On the fused path the forward pass does the backward matmul as well
/// (~2× the forward flops of a plain projection) when `hidden` needs a gradient, and backward
/// is a scalar multiply. `cache`: the weight's own kept panels (see [`PackCache`]), for a bf16
/// weight multiplied as stored.
pub fn weighted_nll_linear(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    cache: Option<&PackCache>,
) -> Result<Tensor> {
    nll_linear::check_dims(hidden.dims(), weight.dims(), targets.elem_count())?;
    let fused_weight = match weight.track_op() {
        false => fused_output_weight(hidden, weight)?,
        true => None,
    };
    if let (Some(weight), DType::U32) = (fused_weight, targets.dtype()) {
        nll::check_dims(
            &[hidden.dims()[0], weight.dims()[0]],
            targets.dims(),
            weights.dims(),
        )?;
        let op = nll_linear::NllLinearOp::new(
            targets.to_vec1::<u32>()?,
            weights.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            hidden.track_op(),
            kept_panels(&weight, cache).cloned(),
        );
        hidden.contiguous()?.apply_op2(&weight.contiguous()?, op)
    } else {
        let logits = hidden.matmul(&weight_as(weight, hidden)?.t()?)?;
        weighted_nll(&logits, targets, weights)
    }
}

/// `cache` where the kernels will read `weight`'s own storage: a strided view is copied for
/// every product, so its copies have no stable address to key panels on.
pub(crate) fn kept_panels<'c>(
    weight: &Tensor,
    cache: Option<&'c PackCache>,
) -> Option<&'c PackCache> {
    cache.filter(|_| weight.is_contiguous())
}

/// `weight` in `hidden`'s dtype, for the composed paths' plain matmuls (the fused kernels take a
/// bf16 weight under f32 hidden states as stored; candle's matmul wants one dtype).
fn weight_as(weight: &Tensor, hidden: &Tensor) -> Result<Tensor> {
    weight.to_dtype(hidden.dtype())
}
