//! One decoder for the Llama family (llama, mistral, qwen2): pre-norm blocks of grouped-query
//! attention with rotary embeddings and a SwiGLU MLP. Architecture differences are config flags.
//!
//! Every op on the training path has a backward pass (see NOTES-candle: candle's fused rms_norm,
//! softmax_last_dim and rope silently drop gradients), and frozen weights go through
//! [`FrozenWeight`], whose backward returns only the input gradient.

use candle_core::{DType, Device, Tensor};

use super::block_op::{BlockOp, BranchSlot};
use super::block_plan::{self, BlockSteps, Norm};
use super::config::{ModelConfig, PROJECTIONS};
use super::dropout::DropoutMask;
use super::frozen::FrozenWeight;
use super::linear::{lora_linear, LoraPair};
use super::rope::RopeTables;
use crate::ops;
use crate::Result;

/// A frozen projection with its optional bias (qwen2's q/k/v).
#[derive(Debug, Clone)]
pub struct Projection {
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
}

/// The frozen tensors of one decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    /// In [`PROJECTIONS`] order: q, k, v, o, gate, up, down.
    pub projections: Vec<Projection>,
}

/// Dropout on the LoRA input, drawn from our own seeded RNG (candle's CPU RNG can't be seeded).
pub struct Dropout {
    pub p: f32,
    pub rng: rand::rngs::StdRng,
}

impl Dropout {
    /// The keep mask for the next adapted projection's input; `None` when dropout is off.
    fn mask(&mut self) -> Option<DropoutMask> {
        use rand::Rng;
        (self.p > 0.0).then(|| DropoutMask {
            seed: self.rng.random(),
            keep: 1.0 - self.p,
        })
    }
}

/// Keys and values of past positions, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dims()[2])
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `len` positions (a shared prompt prefix reused for another
    /// continuation); the tensors are views, nothing is copied.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            let keep = len.min(k.dims()[2]);
            *k = k.narrow(2, 0, keep)?;
            *v = v.narrow(2, 0, keep)?;
        }
        Ok(())
    }
}

/// The trainable low-rank branches a forward pass adds to the frozen projections: a LoRA adapter
/// (`lora::LoraAdapter`), seen by the model only through this lookup so the model does not depend
/// on how adapters are built, stored or read.
pub trait LowRankBranches: Sync {
    /// The pair on `(layer, index in PROJECTIONS)`, if that projection is adapted.
    fn pair(&self, layer: usize, projection: usize) -> Option<&LoraPair>;
}

/// What one forward pass runs with besides its inputs.
#[derive(Default)]
pub struct ForwardContext<'a> {
    pub adapter: Option<&'a dyn LowRankBranches>,
    /// Training-time dropout on LoRA inputs; `None` in evaluation.
    pub dropout: Option<&'a mut Dropout>,
    pub cache: Option<&'a mut KvCache>,
    /// Evaluation and generation: nothing will call backward, so no block keeps activations or
    /// a graph through the adapter beyond its own step (peak memory is one block's, not the
    /// whole stack's).
    pub no_grad: bool,
}

/// How attention is masked in one forward pass.
enum AttentionMask<'a> {
    /// Fused causal attention with an optional `[B, T]` key-padding mask.
    Fused(Option<&'a Tensor>),
    /// An additive `[B, 1, T, offset + T]` bias (`None`: attend to everything).
    Bias(Option<Tensor>),
}

/// The decoder with its frozen weights.
pub struct Decoder {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    pub lm_head: FrozenWeight,
    rope: RopeTables,
    dtype: DType,
    device: Device,
    /// Run each block as one fused CPU node when it can (see [`Decoder::set_block_fusion`]).
    fuse_blocks: bool,
}

impl Decoder {
    /// Assembles a decoder; `dtype` is the activation (compute) dtype.
    pub fn new(
        config: ModelConfig,
        embed_tokens: Tensor,
        blocks: Vec<Block>,
        norm: Tensor,
        lm_head: FrozenWeight,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let max_positions = config.max_position_embeddings.clamp(1, 1 << 16);
        let mut rope = RopeTables::new(&config, max_positions, device)?;
        // The fused rope wants tables in the activation dtype.
        rope.cos = rope.cos.to_dtype(dtype)?;
        rope.sin = rope.sin.to_dtype(dtype)?;
        Ok(Self {
            config,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            rope,
            dtype,
            device: device.clone(),
            fuse_blocks: true,
        })
    }

    /// Whether a whole decoder block runs as one fused autograd node on the CPU (the default;
    /// same results to rounding, see `block_op`). Off, every op is its own graph node, as on
    /// other devices: the reference the fused block is tested against.
    pub fn set_block_fusion(&mut self, enabled: bool) {
        self.fuse_blocks = enabled;
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// Final hidden states `[B, T, H]` BEFORE the final norm. The loss normalises and projects
    /// only the rows it needs; [`Decoder::logits`] does it for all.
    ///
    /// `attention_mask` is a `[B, offset + T]` key mask (1 = real token, 0 = padding), `None`
    /// when nothing is padded.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = ctx.cache.as_ref().map(|c| c.len()).unwrap_or(0);
        if offset + t > self.max_positions() {
            return Err(crate::Error::InvalidArgument(format!(
                "sequence of {} positions exceeds the model's {} positions",
                offset + t,
                self.max_positions()
            )));
        }
        let mut x = self
            .embed_tokens
            .embedding(&ids.flatten_all()?)?
            .reshape((b, t, self.config.hidden_size))?
            .to_dtype(self.dtype)?;
        // Without a cache, attention runs fused (causal + key padding inside the op); the
        // incremental path with a cache builds an additive mask instead.
        let attention = if ctx.cache.is_some() {
            AttentionMask::Bias(self.attention_bias(b, t, offset, attention_mask)?)
        } else {
            AttentionMask::Fused(attention_mask)
        };
        let (cos, sin) = self.rope.slice(offset, t)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            x = self.block_forward(layer, block, &x, &attention, &cos, &sin, ctx)?;
            if ctx.no_grad {
                // Each block's graph (through the adapter's vars) is dropped as soon as the
                // next block has its input.
                x = x.detach();
            }
        }
        Ok(x)
    }

    /// Logits `[..., V]` (in f32; f64 for an f64 model) from pre-norm hidden states `[..., H]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let normed = ops::rms_norm(hidden, &self.norm, self.config.rms_norm_eps)?;
        // f32 whatever the compute dtype, except f64 (gradient checks) keeps its precision.
        let out_dtype = if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        Ok(self.lm_head.forward(&normed)?.to_dtype(out_dtype)?)
    }

    /// `Σ_i w_i · −log p(target_i)` from pre-norm hidden rows `[N, H]`: the final norm, the
    /// output projection and the weighted NLL, fused when the output weight is dense so the
    /// `[N, V]` logits are never kept for backward.
    pub fn weighted_nll_from_hidden(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
    ) -> Result<Tensor> {
        let normed = ops::rms_norm(hidden, &self.norm, self.config.rms_norm_eps)?;
        match self.dense_lm_head(normed.dtype()) {
            Some((w, cache)) => {
                let weights = weights.to_dtype(normed.dtype())?;
                Ok(ops::weighted_nll_linear(
                    &normed,
                    w,
                    targets,
                    &weights,
                    Some(cache),
                )?)
            }
            None => {
                let logits = self.lm_head.forward(&normed)?;
                let weights = weights.to_dtype(logits.dtype())?;
                Ok(ops::weighted_nll(&logits, targets, &weights)?)
            }
        }
    }

    /// `−log p(target)` for each pre-norm hidden row `[N, H]`, without gradient (evaluation).
    pub fn nll_from_hidden(&self, hidden: &Tensor, targets: &[u32]) -> Result<Vec<f64>> {
        let normed = ops::rms_norm(&hidden.detach(), &self.norm, self.config.rms_norm_eps)?;
        match self.dense_lm_head(normed.dtype()) {
            Some((w, cache)) => Ok(ops::row_nll_linear(&normed, w, targets, Some(cache))?),
            None => {
                let w = self.lm_head.to_dense(normed.dtype(), &self.device)?;
                Ok(ops::row_nll_linear(&normed, &w, targets, None)?)
            }
        }
    }

    /// The output weight when the fused vocabulary kernels can take it as stored: dense in the
    /// activation dtype, or bf16 on the CPU (multiplied as stored, or converted once inside the
    /// op). Elsewhere a bf16 weight under f32 activations goes through `FrozenWeight::forward`,
    /// which converts it: the composed vocabulary path multiplies same-dtype tensors only.
    /// With it comes its pack cache, which the fused kernels use for its bf16 panels.
    fn dense_lm_head(&self, dtype: DType) -> Option<(&Tensor, &ops::PackCache)> {
        match &self.lm_head {
            FrozenWeight::Dense(w, cache)
                if w.dtype() == dtype || (w.dtype() == DType::BF16 && w.device().is_cpu()) =>
            {
                Some((w, cache))
            }
            _ => None,
        }
    }

    /// Full logits `[B, T, V]`.
    pub fn forward(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, attention_mask, ctx)?;
        self.logits(&hidden)
    }

    /// Additive mask `[B, 1, T, offset + T]`: causal, plus key padding. `None` for one new token
    /// without padding (it may attend to everything).
    fn attention_bias(
        &self,
        b: usize,
        t: usize,
        offset: usize,
        key_mask: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let total = offset + t;
        if t == 1 && key_mask.is_none() {
            return Ok(None);
        }
        let neg = f32::NEG_INFINITY;
        let causal: Vec<f32> = (0..t)
            .flat_map(|i| (0..total).map(move |j| if j <= offset + i { 0.0 } else { neg }))
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, t, total), &self.device)?;
        let bias = match key_mask {
            None => causal.broadcast_as((b, 1, t, total))?.contiguous()?,
            Some(mask) => {
                let (mb, mt) = mask.dims2()?;
                if mb != b || mt != total {
                    return Err(crate::Error::InvalidArgument(format!(
                        "attention mask is [{mb}, {mt}], expected [{b}, {total}]"
                    )));
                }
                let keep = mask.to_dtype(DType::F32)?.ne(0f32)?;
                let zeros = Tensor::zeros((b, total), DType::F32, &self.device)?;
                let negs = Tensor::full(neg, (b, total), &self.device)?;
                let pad = keep.where_cond(&zeros, &negs)?.reshape((b, 1, 1, total))?;
                // A padding position still attends to itself: a query row with every key
                // masked would be NaN, and its NaN keys would poison the real rows' sums.
                let own: Vec<f32> = (0..t)
                    .flat_map(|i| (0..total).map(move |j| if j == offset + i { 0.0 } else { neg }))
                    .collect();
                let own = Tensor::from_vec(own, (1, 1, t, total), &self.device)?;
                causal.broadcast_add(&pad)?.broadcast_maximum(&own)?
            }
        };
        Ok(Some(bias.to_dtype(self.dtype)?))
    }

    fn project(
        &self,
        layer: usize,
        index: usize,
        block: &Block,
        x: &Tensor,
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Tensor> {
        let proj = &block.projections[index];
        let pair = ctx.adapter.and_then(|a| a.pair(layer, index));
        let mask = match pair {
            Some(_) => ctx.dropout.as_deref_mut().and_then(Dropout::mask),
            None => None,
        };
        let graph_free = self.graph_free(ctx, x) && mask.is_none();
        if let Some(pair) = pair.filter(|_| !graph_free) {
            return lora_linear(x, &proj.weight, proj.bias.as_ref(), pair, mask);
        }
        let y = proj.weight.forward(x)?;
        let y = match &proj.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        Ok(match pair {
            // Off the CPU without gradients the factors join as plain values: the block then
            // builds no graph, so ops::* can take candle's one-launch kernels.
            Some(pair) => (y + pair.delta_no_grad(x)?)?,
            None => y,
        })
    }

    /// Whether this pass runs on an accelerator with no gradient wanted and `x` outside any
    /// graph (the CPU has fused kernels of its own, with or without a graph).
    fn graph_free(&self, ctx: &ForwardContext<'_>, x: &Tensor) -> bool {
        ctx.no_grad && !self.device.is_cpu() && !x.track_op() && ops::graph_free_path_enabled()
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        layer: usize,
        block: &Block,
        x: &Tensor,
        attention: &AttentionMask<'_>,
        cos: &Tensor,
        sin: &Tensor,
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Tensor> {
        if let AttentionMask::Fused(key_padding) = attention {
            if let Some(out) = self.fused_block(layer, block, x, *key_padding, cos, sin, ctx)? {
                return Ok(out);
            }
        }
        let mut steps = PerOpSteps {
            decoder: self,
            layer,
            block,
            attention,
            cos,
            sin,
            ctx,
        };
        Ok(block_plan::forward(&mut steps, x)?.out)
    }
}

/// The [`block_plan`] stages as separate candle ops: the graph for any device, with candle's
/// backward, and the incremental path with a KV cache.
struct PerOpSteps<'a, 'm, 'c> {
    decoder: &'a Decoder,
    layer: usize,
    block: &'a Block,
    attention: &'a AttentionMask<'m>,
    cos: &'a Tensor,
    sin: &'a Tensor,
    ctx: &'a mut ForwardContext<'c>,
}

impl BlockSteps for PerOpSteps<'_, '_, '_> {
    type Act = Tensor;
    type Error = crate::Error;

    fn norm(&mut self, norm: Norm, x: &Tensor) -> Result<Tensor> {
        let w = match norm {
            Norm::Input => &self.block.input_layernorm,
            Norm::PostAttention => &self.block.post_attention_layernorm,
        };
        Ok(ops::rms_norm(x, w, self.decoder.config.rms_norm_eps)?)
    }

    fn project(&mut self, p: usize, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let y = self
            .decoder
            .project(self.layer, p, self.block, x, self.ctx)?;
        Ok(match residual {
            Some(r) => (r + y)?,
            None => y,
        })
    }

    fn attention(&mut self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let cfg = &self.decoder.config;
        let (b, t, _) = q.dims3()?;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let (cos, sin) = (self.cos, self.sin);
        let scale = 1.0 / (hd as f64).sqrt();
        Ok(match self.attention {
            // Token-major all the way ([B, T, heads·D] in and out): rope and attention in one
            // node, no transposes or reshapes.
            AttentionMask::Fused(key_padding) => {
                ops::rope_causal_attention(q, k, v, cos, sin, *key_padding, scale)?
            }
            AttentionMask::Bias(bias) => {
                let heads =
                    |x: &Tensor, n: usize| x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous();
                let q = ops::rope(&heads(q, nh)?, cos, sin)?;
                let mut k = ops::rope(&heads(k, nkv)?, cos, sin)?;
                let mut v = heads(v, nkv)?;
                if let Some(cache) = self.ctx.cache.as_deref_mut() {
                    if let Some((pk, pv)) = &cache.layers[self.layer] {
                        k = Tensor::cat(&[pk, &k], 2)?;
                        v = Tensor::cat(&[pv, &v], 2)?;
                    }
                    // Cached without their graph: decoding never differentiates through
                    // earlier tokens, and an attached cache keeps every step's graph alive.
                    cache.layers[self.layer] = Some((k.detach(), v.detach()));
                }
                let n_rep = nh / nkv;
                let k = candle_transformers::utils::repeat_kv(k, n_rep)?.contiguous()?;
                let v = candle_transformers::utils::repeat_kv(v, n_rep)?.contiguous()?;
                let mut scores = (q.matmul(&k.t()?)? * scale)?;
                if let Some(bias) = bias {
                    scores = scores.broadcast_add(bias)?;
                }
                let out = ops::softmax_last_dim(&scores)?.matmul(&v)?;
                out.transpose(1, 2)?.reshape((b, t, nh * hd))?
            }
        })
    }

    fn silu_mul(&mut self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Ok(ops::silu_mul(gate, up)?)
    }
}

impl Decoder {
    /// The block as one [`BlockOp`] node, when everything it touches is on the CPU in the
    /// activation dtype (f32/f64); `None` otherwise (the caller runs the per-op graph).
    #[allow(clippy::too_many_arguments)]
    fn fused_block(
        &self,
        layer: usize,
        block: &Block,
        x: &Tensor,
        key_padding: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Option<Tensor>> {
        let dtype = x.dtype();
        let pairs: Vec<Option<&LoraPair>> = (0..PROJECTIONS.len())
            .map(|p| ctx.adapter.and_then(|a| a.pair(layer, p)))
            .collect();
        let mut tensors = vec![x, &block.input_layernorm, &block.post_attention_layernorm];
        tensors.extend(block.projections.iter().filter_map(|p| p.bias.as_ref()));
        for pair in pairs.iter().flatten() {
            tensors.extend([pair.a.as_tensor(), pair.b.as_tensor()]);
        }
        let fusable = self.fuse_blocks
            && ops::fused(&tensors)
            && block.projections.iter().all(|p| p.weight.is_cpu());
        if !fusable {
            return Ok(None);
        }
        let (_, t, _) = x.dims3()?;
        let cfg = &self.config;
        // Dropout masks in projection order, as the per-op path draws them.
        let mut slots: [Option<BranchSlot>; 7] = [None; 7];
        let (mut a_parts, mut b_parts) = (Vec::new(), Vec::new());
        let (mut a_offset, mut b_offset) = (0, 0);
        for (p, pair) in pairs.iter().enumerate() {
            let Some(pair) = pair else { continue };
            let (out, inp) = block.projections[p].weight.dims()?;
            let rank = pair.rank()?;
            if pair.a.dims() != [rank, inp] || pair.b.dims() != [out, rank] {
                return Err(crate::Error::InvalidArgument(format!(
                    "layer {layer} {}: LoRA A {:?} / B {:?} do not fit a [{out}, {inp}] weight",
                    PROJECTIONS[p],
                    pair.a.dims(),
                    pair.b.dims()
                )));
            }
            slots[p] = Some(BranchSlot {
                rank,
                scale: pair.scale,
                mask: ctx.dropout.as_deref_mut().and_then(Dropout::mask),
                a_offset,
                b_offset,
            });
            a_offset += rank * inp;
            b_offset += out * rank;
            a_parts.push(pair.a.as_tensor().flatten_all()?);
            b_parts.push(pair.b.as_tensor().flatten_all()?);
        }
        let flat = |parts: &[Tensor]| -> Result<Tensor> {
            Ok(match parts {
                [] => Tensor::zeros(0, dtype, x.device())?,
                _ => Tensor::cat(parts, 0)?,
            })
        };
        let (mut a_flat, mut b_flat) = (flat(&a_parts)?, flat(&b_parts)?);
        if ctx.no_grad {
            (a_flat, b_flat) = (a_flat.detach(), b_flat.detach());
        }
        let hd = cfg.head_dim;
        let scale = 1.0 / (hd as f64).sqrt();
        let op = BlockOp {
            block: block.clone(),
            eps: cfg.rms_norm_eps,
            hidden: cfg.hidden_size,
            q_width: cfg.num_attention_heads * hd,
            kv_width: cfg.num_key_value_heads * hd,
            attention: ops::rope_attention_kernel(cos, sin, key_padding, scale, t)?,
            slots,
            save: !ctx.no_grad && (x.track_op() || !a_parts.is_empty()),
            saved: Default::default(),
        };
        Ok(Some(x.contiguous()?.apply_op3(&a_flat, &b_flat, op)?))
    }
}

/// Index of a projection name in [`PROJECTIONS`].
pub fn projection_index(name: &str) -> Option<usize> {
    PROJECTIONS.iter().position(|&p| p == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{LoraAdapter, LoraConfig};
    use crate::model::random::{random_decoder, tiny_config};

    /// Cached keys/values carry no graph (an attached cache would keep every decoding step's
    /// graph through the adapter alive: gigabytes over a long generation), and a no_grad pass
    /// returns untracked hidden states on the cached path too.
    #[test]
    fn kv_cache_and_no_grad_keep_no_graph() {
        let device = Device::Cpu;
        let config = tiny_config(false);
        let decoder = random_decoder(&config, 3, DType::F32, None, &device).unwrap();
        let adapter =
            LoraAdapter::init(&LoraConfig::default(), &config, 1, DType::F32, &device).unwrap();
        let mut cache = KvCache::new(config.num_hidden_layers);
        for (step, no_grad) in [(0, false), (1, true)] {
            let ids = Tensor::from_vec(vec![3u32 + step, 4, 5], (1, 3), &device).unwrap();
            let mut ctx = ForwardContext {
                adapter: Some(&adapter),
                cache: Some(&mut cache),
                no_grad,
                ..Default::default()
            };
            let hidden = decoder.forward_hidden(&ids, None, &mut ctx).unwrap();
            assert_eq!(hidden.track_op(), !no_grad);
        }
        assert_eq!(cache.len(), 6);
        for (k, v) in cache.layers.iter().flatten() {
            assert!(!k.track_op() && !v.track_op(), "cached k/v carry a graph");
        }
    }
}
