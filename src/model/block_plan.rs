//! The decoder block's architecture, written once: [`forward`] lists its stages and both ways
//! of running it follow that list. The per-op candle graph (`decoder.rs`, any device, and the
//! incremental path with a KV cache) implements [`BlockSteps`] on tensors; the fused CPU node
//! (`block_op.rs`) implements it on slices and keeps the activations its backward needs.
//!
//! An architecture change (a bias, a norm placement, qk-norm) is made here and in the step
//! that carries it. The fused node's hand-written backward (`BlockOp::bwd_t`) walks these
//! stages in reverse and must mirror a change in their order; the per-op graph gets its
//! backward from candle, and `fused_block_matches_per_op_graph` checks that the two agree.

/// Index of each projection in [`super::PROJECTIONS`] (and in `Block::projections`).
pub(crate) const Q: usize = 0;
pub(crate) const K: usize = 1;
pub(crate) const V: usize = 2;
pub(crate) const O: usize = 3;
pub(crate) const GATE: usize = 4;
pub(crate) const UP: usize = 5;
pub(crate) const DOWN: usize = 6;

/// The block's two RMS norms.
#[derive(Clone, Copy)]
pub(crate) enum Norm {
    /// Before attention (`input_layernorm`).
    Input,
    /// Before the MLP (`post_attention_layernorm`).
    PostAttention,
}

/// One way of computing the block's stages on activations `Act` (`[B, T, width]` rows).
pub(crate) trait BlockSteps {
    type Act;
    type Error;
    /// `rms_norm(x) ⊙ w` with the weight of `norm`.
    fn norm(&mut self, norm: Norm, x: &Self::Act) -> Result<Self::Act, Self::Error>;
    /// `residual + x·Wᵀ + bias + LoRA(x)` for projection `p` (no residual: without the first
    /// term). Draws the LoRA branch's dropout mask, if any, in call order.
    fn project(
        &mut self,
        p: usize,
        x: &Self::Act,
        residual: Option<&Self::Act>,
    ) -> Result<Self::Act, Self::Error>;
    /// Rotary embedding of q and k, then causal grouped-query attention (masked as the pass
    /// asks), back in the token-major `[B, T, heads·D]` layout.
    fn attention(
        &mut self,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
    ) -> Result<Self::Act, Self::Error>;
    /// `silu(gate) ⊙ up`.
    fn silu_mul(&mut self, gate: &Self::Act, up: &Self::Act) -> Result<Self::Act, Self::Error>;
}

/// Every activation of one block pass that a backward may need (the normed inputs are not
/// kept: the fused backward recomputes them).
pub(crate) struct Activations<A> {
    pub q: A,
    pub k: A,
    pub v: A,
    pub attn: A,
    pub x_mid: A,
    pub gate: A,
    pub up: A,
    pub act: A,
    pub out: A,
}

impl<A> Activations<A> {
    pub(crate) fn map<B>(self, f: impl Fn(A) -> B) -> Activations<B> {
        Activations {
            q: f(self.q),
            k: f(self.k),
            v: f(self.v),
            attn: f(self.attn),
            x_mid: f(self.x_mid),
            gate: f(self.gate),
            up: f(self.up),
            act: f(self.act),
            out: f(self.out),
        }
    }
}

/// The block: pre-norm grouped-query attention with rope and a residual, then a pre-norm
/// SwiGLU MLP with a residual.
pub(crate) fn forward<S: BlockSteps>(
    s: &mut S,
    x: &S::Act,
) -> Result<Activations<S::Act>, S::Error> {
    let h1 = s.norm(Norm::Input, x)?;
    let q = s.project(Q, &h1, None)?;
    let k = s.project(K, &h1, None)?;
    let v = s.project(V, &h1, None)?;
    drop(h1);
    let attn = s.attention(&q, &k, &v)?;
    let x_mid = s.project(O, &attn, Some(x))?;

    let h2 = s.norm(Norm::PostAttention, &x_mid)?;
    let gate = s.project(GATE, &h2, None)?;
    let up = s.project(UP, &h2, None)?;
    drop(h2);
    let act = s.silu_mul(&gate, &up)?;
    let out = s.project(DOWN, &act, Some(&x_mid))?;
    Ok(Activations {
        q,
        k,
        v,
        attn,
        x_mid,
        gate,
        up,
        act,
        out,
    })
}
