//! A whole decoder block as ONE autograd node on the CPU (f32/f64, full sequences):
//! rms_norm → q/k/v (+ LoRA) → rope + causal attention → o (+ LoRA) + residual → rms_norm →
//! gate/up (+ LoRA) → SwiGLU → down (+ LoRA) + residual.
//!
//! As separate nodes, candle's backward pays a `zeros_like` + `add` of a full-size gradient for
//! every input of every node (a dozen activation-sized tensors per block), and runs that
//! bookkeeping serially between the kernels. As one node, the block keeps exactly the
//! activations its backward needs, sums the q/k/v (and gate/up) input gradients inside the
//! gemms, and adds both residual branches in place. The LoRA factors enter as two flat tensors
//! (every adapted projection's A, then every B, flattened and concatenated), so candle routes
//! their gradients back to the adapter's `Var`s through `cat`.

use std::borrow::Cow;
use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::block_plan::{self, Activations, BlockSteps, Norm, DOWN, GATE, K, O, Q, UP, V};
use super::config::PROJECTIONS;
use super::decoder::Block;
use super::dropout::DropoutMask;
use super::linear::Branch;
use crate::ops::kernel::{
    add_assign_par, contiguous_slice, output_buffer, par_copy, tensor_from_vec, with_cpu_slices,
    Elem,
};
use crate::ops::{rms_norm, silu_mul, AttentionOp};

/// Where one adapted projection's factors sit in the flat A and B inputs.
#[derive(Clone, Copy)]
pub(crate) struct BranchSlot {
    pub rank: usize,
    pub scale: f64,
    pub mask: Option<DropoutMask>,
    /// Offsets of A (`[rank, in]`) and B (`[out, rank]`) in the flat inputs.
    pub a_offset: usize,
    pub b_offset: usize,
}

/// What backward needs from forward (the normed inputs are recomputed: one cheap pass each).
pub(crate) struct Saved<T> {
    /// The forward's activations (`out` left empty: the backward does not read it).
    acts: Activations<Vec<T>>,
    /// `(x ⊙ mask)·Aᵀ` per projection (empty where not adapted).
    lows: [Vec<T>; 7],
}

pub(crate) enum SavedAny {
    F32(Saved<f32>),
    F64(Saved<f64>),
}

/// Picks the saved activations of one dtype out of [`SavedAny`].
trait SavedElem: Elem {
    fn wrap(s: Saved<Self>) -> SavedAny;
    fn unwrap(s: &SavedAny) -> Option<&Saved<Self>>;
}

macro_rules! saved_elem {
    ($t:ty, $variant:ident, $other:ident) => {
        impl SavedElem for $t {
            fn wrap(s: Saved<Self>) -> SavedAny {
                SavedAny::$variant(s)
            }
            fn unwrap(s: &SavedAny) -> Option<&Saved<Self>> {
                match s {
                    SavedAny::$variant(s) => Some(s),
                    SavedAny::$other(_) => None,
                }
            }
        }
    };
}
saved_elem!(f32, F32, F64);
saved_elem!(f64, F64, F32);

/// The block op, applied to `(x, a_flat, b_flat)`.
pub(crate) struct BlockOp {
    pub block: Block,
    pub eps: f64,
    /// Widths: hidden, q (heads·D), k/v (kv heads·D).
    pub hidden: usize,
    pub q_width: usize,
    pub kv_width: usize,
    pub attention: AttentionOp,
    pub slots: [Option<BranchSlot>; 7],
    /// Keep activations for backward (false when nothing upstream can need gradients).
    pub save: bool,
    /// Filled by forward when `save`.
    pub saved: Mutex<Option<SavedAny>>,
}

/// One projection's weight dims `(out, in)`.
fn dims_of(block: &Block, p: usize) -> candle_core::Result<(usize, usize)> {
    block.projections[p]
        .weight
        .dims()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
}

impl BlockOp {
    /// Projection `p`'s LoRA branch over the flat factor inputs, if it is adapted.
    fn branch<'a, T: Elem>(
        &self,
        p: usize,
        a: &'a [T],
        b: &'a [T],
    ) -> candle_core::Result<Option<Branch<'a, T>>> {
        let Some(s) = self.slots[p] else {
            return Ok(None);
        };
        let (out, inp) = dims_of(&self.block, p)?;
        let (Some(a), Some(b)) = (
            a.get(s.a_offset..s.a_offset + s.rank * inp),
            b.get(s.b_offset..s.b_offset + out * s.rank),
        ) else {
            bail!("decoder block: flat LoRA factors too short for projection {p}");
        };
        Ok(Some(Branch {
            a,
            b,
            r: s.rank,
            scale: s.scale,
            mask: s.mask,
        }))
    }

    /// `y (+)= x·Wᵀ + bias + LoRA` for projection `p` over `rows` rows; returns the LoRA
    /// intermediate (empty without an adapter on `p`).
    #[allow(clippy::too_many_arguments)]
    fn project<T: Elem>(
        &self,
        p: usize,
        x: &[T],
        rows: usize,
        y: &mut [T],
        accumulate: bool,
        a: &[T],
        b: &[T],
    ) -> candle_core::Result<Vec<T>> {
        let proj = &self.block.projections[p];
        let (out, inp) = dims_of(&self.block, p)?;
        let mut accumulate = accumulate;
        if let Some(bias) = &proj.bias {
            let bias = bias.to_vec1::<T>()?;
            y.par_chunks_mut(out).for_each(|row| {
                for (v, b) in row.iter_mut().zip(&bias) {
                    *v = if accumulate { *v + *b } else { *b };
                }
            });
            accumulate = true;
        }
        proj.weight.cpu_product(y, x, rows, true, accumulate)?;
        match self.branch(p, a, b)? {
            Some(br) => br.forward(y, x, rows, inp, out),
            None => Ok(Vec::new()),
        }
    }

    /// Backward of projection `p` for its output gradient `dy`: `dx (+)= dy·W + LoRA part`
    /// when `dx` is given, and the factor gradients into the flat `da`/`db`.
    #[allow(clippy::too_many_arguments)]
    fn project_back<T: Elem>(
        &self,
        p: usize,
        x: &[T],
        dy: &[T],
        rows: usize,
        low: &[T],
        dx: Option<(&mut [T], bool)>,
        [a, b]: [&[T]; 2],
        da: &mut [T],
        db: &mut [T],
    ) -> candle_core::Result<()> {
        let (out, inp) = dims_of(&self.block, p)?;
        let dx = match dx {
            Some((dx, accumulate)) => {
                self.block.projections[p]
                    .weight
                    .cpu_product(dx, dy, rows, false, accumulate)?;
                Some(dx)
            }
            None => None,
        };
        if let (Some(br), Some(s)) = (self.branch(p, a, b)?, self.slots[p]) {
            let da = &mut da[s.a_offset..s.a_offset + s.rank * inp];
            let db = &mut db[s.b_offset..s.b_offset + out * s.rank];
            br.backward(dy, x, low, rows, inp, out, da, db, dx)?;
        }
        Ok(())
    }

    /// Checks that the block's weights chain as the buffers below assume: norms of `hidden`;
    /// q/k/v from hidden to the q/kv widths; o back to hidden; gate and up to one width
    /// (returned) that down maps back to hidden; biases of their projection's width. Loading
    /// already guarantees this; checking it here keeps the uninitialised buffers' safety local.
    fn check_shapes(&self) -> candle_core::Result<usize> {
        let (h, q, kv) = (self.hidden, self.q_width, self.kv_width);
        let inter = dims_of(&self.block, 4)?.0;
        let want = [
            (q, h),
            (kv, h),
            (kv, h),
            (h, q),
            (inter, h),
            (inter, h),
            (h, inter),
        ];
        for (p, want) in want.into_iter().enumerate() {
            let got = dims_of(&self.block, p)?;
            let bias_ok = self.block.projections[p]
                .bias
                .as_ref()
                .is_none_or(|b| b.dims() == [want.0]);
            if got != want || !bias_ok {
                bail!(
                    "decoder block: {} is {got:?} (or its bias does not fit), expected {want:?}",
                    PROJECTIONS[p]
                );
            }
        }
        for norm in [
            &self.block.input_layernorm,
            &self.block.post_attention_layernorm,
        ] {
            if norm.dims() != [h] {
                bail!(
                    "decoder block: norm weight {:?} for hidden {h}",
                    norm.dims()
                );
            }
        }
        Ok(inter)
    }

    /// `rms_norm(x) ⊙ w` for `x` of whole rows of `w.len()` (the hidden size, `check_shapes`).
    fn norm<T: Elem>(&self, w: &[T], x: &[T]) -> Vec<T> {
        // SAFETY: `x.len()` is a multiple of `w.len()` (this fn's precondition), so
        // `forward_into` overwrites every element of `y` (x's length) before it is returned.
        let mut y = unsafe { output_buffer(x.len()) };
        rms_norm::forward_into(x, w, &mut y, self.eps);
        y
    }

    /// The two norm weights (input, post-attention) as `T`.
    fn norm_weights<T: Elem>(&self) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        Ok((
            self.block.input_layernorm.to_vec1::<T>()?,
            self.block.post_attention_layernorm.to_vec1::<T>()?,
        ))
    }

    /// `[B, T, width]` dims for the attention kernel.
    fn attn_dims(&self, b: usize, t: usize) -> [Vec<usize>; 3] {
        [
            vec![b, t, self.q_width],
            vec![b, t, self.kv_width],
            vec![b, t, self.kv_width],
        ]
    }

    /// [`block_plan::forward`] with [`FusedSteps`], keeping what [`Self::bwd_t`] needs.
    fn fwd<T: SavedElem>(
        &self,
        [(xs, xl), (a_s, al), (bs, bl)]: [(&CpuStorage, &Layout); 3],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [b_sz, t, h] = xl.dims() else {
            bail!("decoder block: x must be [B, T, H], got {:?}", xl.dims());
        };
        let (b_sz, t, h) = (*b_sz, *t, *h);
        if h != self.hidden {
            bail!("decoder block: hidden size {h}, expected {}", self.hidden);
        }
        let inter = self.check_shapes()?;
        let rows = b_sz * t;
        let x = contiguous_slice::<T>(xs, xl)?;
        let a = contiguous_slice::<T>(a_s, al)?;
        let b = contiguous_slice::<T>(bs, bl)?;
        let (w_in, w_post) = self.norm_weights::<T>()?;
        let mut steps = FusedSteps {
            op: self,
            ab: [a, b],
            rows,
            inter,
            dims: self.attn_dims(b_sz, t),
            norms: [w_in, w_post],
            lows: Default::default(),
        };
        let mut acts = block_plan::forward(&mut steps, &Cow::Borrowed(x))?.map(Cow::into_owned);
        let out = std::mem::take(&mut acts.out);
        if self.save {
            let saved = Saved {
                acts,
                lows: steps.lows,
            };
            *self.saved.lock().map_err(|_| poisoned())? = Some(T::wrap(saved));
        }
        Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
    }

    /// The stages of [`block_plan::forward`] in reverse, on the activations the forward kept.
    #[allow(clippy::type_complexity)]
    fn bwd_t<T: SavedElem>(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b_sz, t, h) = x.dims3()?;
        // The same checks as forward (which also made `h` the hidden size); the buffers
        // below rely on them.
        let inter = self.check_shapes()?;
        let rows = b_sz * t;
        let need_dx = x.track_op();
        let guard = self.saved.lock().map_err(|_| poisoned())?;
        let s = guard.as_ref().and_then(T::unwrap).ok_or_else(|| {
            candle_core::Error::Msg("decoder block: backward before forward".into())
        })?;
        let (w_in, w_post) = self.norm_weights::<T>()?;
        let grads = with_cpu_slices::<T, _>(&[x, a, b, dy], |sl| {
            let (x, a, b, dy) = (sl[0], sl[1], sl[2], sl[3]);
            let ab = [a, b];
            // Every adapted projection writes its whole region; the rest stays 0.
            let (mut da, mut db) = (vec![T::ZERO; a.len()], vec![T::ZERO; b.len()]);

            // Every gradient buffer below is overwritten whole before it is read or returned
            // (`check_shapes` makes the widths chain): a projection's input gradient by the
            // base product `dy·W` without accumulation ([rows, in], the buffer's length),
            // before any accumulating call; the SwiGLU and RMS-norm backwards write every
            // element of their equal-length outputs.
            //
            // MLP: down, SwiGLU, gate + up into one dh2.
            // SAFETY: [rows, inter], overwritten by down's base product (see above).
            let mut d_act = unsafe { output_buffer(rows * inter) };
            let d_act_out = Some((&mut d_act[..], false));
            self.project_back(
                DOWN,
                &s.acts.act,
                dy,
                rows,
                &s.lows[DOWN],
                d_act_out,
                ab,
                &mut da,
                &mut db,
            )?;
            // SAFETY: gate, up and d_act are all [rows, inter]: `backward_into` overwrites
            // both outputs whole.
            let (mut dgate, mut dup) =
                unsafe { (output_buffer(rows * inter), output_buffer(rows * inter)) };
            silu_mul::backward_into(&s.acts.gate, &s.acts.up, &d_act, &mut dgate, &mut dup);
            drop(d_act);
            let h2 = self.norm(&w_post, &s.acts.x_mid);
            // SAFETY: [rows, h], overwritten by gate's base product (up's then accumulates).
            let mut dh2 = unsafe { output_buffer(rows * h) };
            let out = Some((&mut dh2[..], false));
            self.project_back(
                GATE,
                &h2,
                &dgate,
                rows,
                &s.lows[GATE],
                out,
                ab,
                &mut da,
                &mut db,
            )?;
            let out = Some((&mut dh2[..], true));
            self.project_back(UP, &h2, &dup, rows, &s.lows[UP], out, ab, &mut da, &mut db)?;
            drop((h2, dgate, dup));
            // dx_mid = dy + rms_norm'(dh2)
            // SAFETY: x_mid, dh2 and dx_mid are [rows, h] with a norm weight of h:
            // `backward_into` overwrites dx_mid whole before `add_assign_par` reads it.
            let mut dx_mid = unsafe { output_buffer(rows * h) };
            rms_norm::backward_into(&s.acts.x_mid, &w_post, &dh2, &mut dx_mid, self.eps);
            add_assign_par(&mut dx_mid, dy);
            drop(dh2);

            // Attention: o, then the kernel's backward, then q/k/v into one dh1.
            // SAFETY: the attention output has q's length, [rows, q_width], overwritten by
            // o's base product.
            let mut dattn = unsafe { output_buffer(s.acts.attn.len()) };
            let out = Some((&mut dattn[..], false));
            self.project_back(
                O,
                &s.acts.attn,
                &dx_mid,
                rows,
                &s.lows[O],
                out,
                ab,
                &mut da,
                &mut db,
            )?;
            let dims = self.attn_dims(b_sz, t);
            let (dq, dk, dv) = self.attention.backward_slices(
                [&dims[0], &dims[1], &dims[2]],
                [&s.acts.q, &s.acts.k, &s.acts.v, &dattn],
            )?;
            drop(dattn);
            let h1 = self.norm(&w_in, x);
            // SAFETY: [rows, h], overwritten by q's base product (the first below, without
            // accumulation); k and v then accumulate.
            let mut dh1 = need_dx.then(|| unsafe { output_buffer(rows * h) });
            for (p, dp) in [(Q, &dq), (K, &dk), (V, &dv)] {
                let out = dh1.as_deref_mut().map(|d| (d, p != Q));
                self.project_back(p, &h1, dp, rows, &s.lows[p], out, ab, &mut da, &mut db)?;
            }
            // dx = dx_mid + rms_norm'(dh1)
            let dx = match dh1 {
                Some(dh1) => {
                    // SAFETY: x, dh1 and dx are [rows, h] with a norm weight of h:
                    // `backward_into` overwrites dx whole before `add_assign_par` reads it.
                    let mut dx = unsafe { output_buffer(rows * h) };
                    rms_norm::backward_into(x, &w_in, &dh1, &mut dx, self.eps);
                    add_assign_par(&mut dx, &dx_mid);
                    Some(dx)
                }
                None => None,
            };
            Ok((dx, da, db))
        })?;
        drop(guard);
        let (dx, da, db) = grads;
        Ok((
            dx.map(|dx| tensor_from_vec(dx, x.dims())).transpose()?,
            a.track_op()
                .then(|| tensor_from_vec(da, a.dims()))
                .transpose()?,
            b.track_op()
                .then(|| tensor_from_vec(db, b.dims()))
                .transpose()?,
        ))
    }
}

/// The [`block_plan`] stages on slices, for the fused forward: the input is borrowed, every
/// stage's output owned (so it can be kept for backward without a copy); each projection's
/// LoRA intermediate is kept in `lows`.
struct FusedSteps<'a, T> {
    op: &'a BlockOp,
    /// The flat LoRA factors (A, B).
    ab: [&'a [T]; 2],
    rows: usize,
    /// MLP width (`check_shapes`, which the forward ran before the stages).
    inter: usize,
    dims: [Vec<usize>; 3],
    /// Norm weights: input, post-attention.
    norms: [Vec<T>; 2],
    lows: [Vec<T>; 7],
}

impl<'a, T: Elem> BlockSteps for FusedSteps<'a, T> {
    type Act = Cow<'a, [T]>;
    type Error = candle_core::Error;

    fn norm(&mut self, norm: Norm, x: &Self::Act) -> candle_core::Result<Self::Act> {
        let w = match norm {
            Norm::Input => &self.norms[0],
            Norm::PostAttention => &self.norms[1],
        };
        if x.len() % w.len().max(1) != 0 {
            bail!("decoder block: norm input is not whole rows");
        }
        Ok(Cow::Owned(self.op.norm(w, x)))
    }

    fn project(
        &mut self,
        p: usize,
        x: &Self::Act,
        residual: Option<&Self::Act>,
    ) -> candle_core::Result<Self::Act> {
        let [a, b] = self.ab;
        let mut y = match residual {
            // The residual's rows, then the projection accumulated into them.
            Some(r) => par_copy(r),
            // SAFETY: `project` without accumulation overwrites all of `y`: the bias fills
            // every row (it has the projection's width, `check_shapes`), or the base product
            // writes the whole [rows, out] result.
            None => unsafe { output_buffer(self.rows * dims_of(&self.op.block, p)?.0) },
        };
        let low = self
            .op
            .project(p, x, self.rows, &mut y, residual.is_some(), a, b)?;
        self.lows[p] = low;
        Ok(Cow::Owned(y))
    }

    fn attention(
        &mut self,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
    ) -> candle_core::Result<Self::Act> {
        let [qd, kd, vd] = &self.dims;
        let out = self.op.attention.forward_slices([qd, kd, vd], q, k, v)?;
        Ok(Cow::Owned(out))
    }

    fn silu_mul(&mut self, gate: &Self::Act, up: &Self::Act) -> candle_core::Result<Self::Act> {
        let n = self.rows * self.inter;
        if gate.len() != n || up.len() != n {
            bail!("decoder block: gate/up are not [rows, intermediate]");
        }
        // SAFETY: gate, up and act all have n elements (checked above), so `forward_into`
        // overwrites all of act.
        let mut act = unsafe { output_buffer(n) };
        silu_mul::forward_into(gate, up, &mut act);
        Ok(Cow::Owned(act))
    }
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("decoder block: saved state poisoned by an earlier panic".into())
}

impl CustomOp3 for BlockOp {
    fn name(&self) -> &'static str {
        "peft-decoder-block"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let storages = [(xs, xl), (a_s, al), (bs, bl)];
        match xs {
            CpuStorage::F32(_) => self.fwd::<f32>(storages),
            CpuStorage::F64(_) => self.fwd::<f64>(storages),
            _ => bail!("decoder block: the fused op supports f32 and f64"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.bwd_t::<f32>(x, a, b, dy),
            DType::F64 => self.bwd_t::<f64>(x, a, b, dy),
            dt => bail!("decoder block: no fused backward for {dt:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use rand::SeedableRng;

    use crate::lora::{LoraAdapter, LoraConfig, TargetModules};
    use crate::model::decoder::{Dropout, ForwardContext};
    use crate::model::random::{random_decoder, tiny_config};

    /// The fused block against the per-op graph (f64): hidden states, and the gradients of a
    /// random projection of them for every LoRA factor.
    fn compare(qkv_bias: bool, lora: LoraConfig, padded: bool) {
        let device = Device::Cpu;
        let config = tiny_config(qkv_bias);
        let mut decoder = random_decoder(&config, 5, DType::F64, None, &device).unwrap();
        let adapter = LoraAdapter::init(&lora, &config, 3, DType::F64, &device).unwrap();
        for (k, var) in adapter.vars().into_iter().enumerate() {
            let values: Vec<f64> = (0..var.elem_count())
                .map(|i| 0.2 * ((i as f64) * 0.61 + k as f64 * 0.9).sin())
                .collect();
            var.set(&Tensor::from_vec(values, var.dims(), &device).unwrap())
                .unwrap();
        }
        let (b, t) = (2, 7);
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 45 + 3) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, t), &device).unwrap();
        let mask = padded.then(|| {
            let m: Vec<f32> = (0..b * t).map(|i| f32::from(i < b * t - 2)).collect();
            Tensor::from_vec(m, (b, t), &device).unwrap()
        });
        let n = b * t * config.hidden_size;
        let r: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).cos()).collect();
        let r = Tensor::from_vec(r, (b, t, config.hidden_size), &device).unwrap();
        let run = |decoder: &crate::model::Decoder| {
            let mut dropout = Dropout {
                p: lora.lora_dropout,
                rng: rand::rngs::StdRng::seed_from_u64(11),
            };
            let mut ctx = ForwardContext {
                adapter: Some(&adapter),
                dropout: Some(&mut dropout),
                ..Default::default()
            };
            let hidden = decoder
                .forward_hidden(&ids, mask.as_ref(), &mut ctx)
                .unwrap();
            let grads = (&hidden * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let mut out = vec![flat(&hidden)];
            for (key, var) in adapter.named_vars() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{key}: no grad"));
                out.push(flat(g));
            }
            out
        };
        let fused = run(&decoder);
        // Evaluation mode: the same hidden states, and no graph to backpropagate through.
        let mut ctx = ForwardContext {
            adapter: Some(&adapter),
            no_grad: true,
            ..Default::default()
        };
        let hidden = decoder
            .forward_hidden(&ids, mask.as_ref(), &mut ctx)
            .unwrap();
        assert!(
            !hidden.track_op(),
            "a no_grad forward must not build a graph"
        );
        if lora.lora_dropout == 0.0 {
            let h: Vec<f64> = hidden.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(h, fused[0], "no_grad changes the forward pass");
        }
        decoder.set_block_fusion(false);
        let reference = run(&decoder);
        assert_eq!(fused.len(), reference.len());
        for (i, (f, r)) in fused.iter().zip(&reference).enumerate() {
            let scale = r.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            let diff = f.iter().zip(r).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 1e-10 * scale,
                "tensor {i}: max diff {diff:e} (scale {scale:e})"
            );
            assert!(r.iter().any(|v| *v != 0.0), "tensor {i} is all zero");
        }
    }

    #[test]
    fn fused_block_matches_per_op_graph() {
        let all = LoraConfig {
            r: 3,
            lora_alpha: 6.0,
            lora_dropout: 0.0,
            ..Default::default()
        };
        compare(false, all.clone(), false);
        // qwen2 biases, dropout on every branch, a padded row.
        compare(
            true,
            LoraConfig {
                lora_dropout: 0.3,
                ..all.clone()
            },
            true,
        );
        // Some projections and only the top layer adapted: the lower block runs without
        // factors and without saving activations, the upper one mixes plain and adapted ones.
        compare(
            false,
            LoraConfig {
                target_modules: TargetModules::parse("q_proj,v_proj,down_proj").unwrap(),
                layers_to_transform: Some(vec![1]),
                ..all
            },
            true,
        );
    }
}
