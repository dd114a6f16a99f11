//! Fused causal self-attention: softmax(scale·QKᵀ + causal/padding mask)·V with backward,
//! optionally preceded by rotary embedding of q and k (one graph node for rope + attention).
//!
//! Only q, k, v and the output are candle tensors; the [T, T] scores live in per-task scratch,
//! so candle never allocates, stores or accumulates gradients of [B, H, T, T] tensors (the
//! dominant cost of the composed version). Forward keeps the per-row logsumexp; backward
//! recomputes the probabilities from it (flash-attention style), so nothing [T, T]-sized is
//! stored between passes. The kernel reads and writes heads through row strides, so the same
//! code serves head-major `[B, H, T, D]` tensors and the token-major `[B, T, H, D]` layout the
//! projections produce (no transposes or copies around the op). With rope, rotated q/k heads
//! are recomputed per task into [T, D] scratch in both passes (O(T·D) against the O(T²·D)
//! attention work) instead of being stored.
//!
//! f32 on CPUs with AVX-512 takes [`fast`]: the products run through register-tiled micro-
//! kernels written for these shapes (k = D or a 64-row query block; the `gemm` crate's per-call
//! packing and dispatch dominated them), with K and V packed once per task, causal skipping
//! per 8-row micro-tile rather than per query block, and 16-wide softmax passes. Everything
//! else (f64, other CPUs) takes the generic path through the `gemm` crate.

use super::gemm::{gemm_raw, View};
use super::kernel::{
    contiguous_slice, dot, max, output_buffer, simd_fn, sum, tensor_from_vec, with_cpu_slices, Elem,
};
use super::rope::rotate;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::marker::PhantomData;
use std::sync::OnceLock;

/// Query rows per causal block: blocks skip the keys after their last query (~37% fewer
/// flops at T = 256 than full T×T products).
const QBLOCK: usize = 64;

/// Axis order of the q/k/v/output tensors.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadLayout {
    /// `[B, H, T, D]` (each head's [T, D] block is contiguous).
    HeadMajor,
    /// `[B, T, H, D]` (a head's rows are `H·D` apart), as the q/k/v projections produce.
    TokenMajor,
}

impl HeadLayout {
    fn op_name(self) -> &'static str {
        match self {
            Self::HeadMajor => "causal_attention",
            Self::TokenMajor => "rope_causal_attention",
        }
    }
}

pub(crate) struct AttentionOp {
    scale: f64,
    /// [B, T] key validity (true = may be attended to); None = all valid.
    key_valid: Option<Vec<bool>>,
    layout: HeadLayout,
    /// cos/sin tables, exactly [T, D/2], when q and k are rotated inside the op.
    rope: Option<(Tensor, Tensor)>,
    /// Per-row logsumexp of the scaled, masked scores ([B, H, T]); +inf marks a row with no
    /// valid key (its output and gradients are 0).
    lse: OnceLock<Vec<f64>>,
}

impl AttentionOp {
    pub(crate) fn new(
        scale: f64,
        key_valid: Option<Vec<bool>>,
        layout: HeadLayout,
        rope: Option<(Tensor, Tensor)>,
    ) -> Self {
        Self {
            scale,
            key_valid,
            layout,
            rope,
            lse: OnceLock::new(),
        }
    }
}

/// Shapes: (B, H, Hkv, T, D).
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub h: usize,
    pub hkv: usize,
    pub t: usize,
    pub d: usize,
}

impl Dims {
    /// (offset, row stride) of head `head` of `heads` in batch `b`.
    fn head(&self, layout: HeadLayout, b: usize, head: usize, heads: usize) -> (usize, usize) {
        let (t, d) = (self.t, self.d);
        match layout {
            HeadLayout::HeadMajor => ((b * heads + head) * t * d, d),
            HeadLayout::TokenMajor => ((b * t * heads + head) * d, heads * d),
        }
    }
}

/// Token-major dims as `[B, T, H, D]`: 4-D dims as they are, `[B, T, H·D]` split with the head
/// dim `D = 2 · width` of the rope tables `[T', width]`.
pub(crate) fn split_heads(x: &[usize], rope_table: &[usize]) -> Result<Vec<usize>> {
    match (x, rope_table) {
        ([_, _, _, _], _) => Ok(x.to_vec()),
        ([b, t, hd], [_, half]) if *half > 0 && hd % (2 * half) == 0 => {
            Ok(vec![*b, *t, hd / (2 * half), 2 * half])
        }
        _ => bail!(
            "rope_causal_attention: need [B, T, H, D] or [B, T, H·D] with D = 2·{:?}[1], got {x:?}",
            rope_table
        ),
    }
}

/// Checks q `[B, H, T, D]` and k, v `[B, Hkv, T, D]` (T and H swapped when token-major).
pub(crate) fn check_dims(
    layout: HeadLayout,
    q: &[usize],
    k: &[usize],
    v: &[usize],
) -> Result<Dims> {
    let name = layout.op_name();
    let ([b, q1, q2, d], [kb, k1, k2, kd]) = (q, k) else {
        let want = match layout {
            HeadLayout::HeadMajor => "q [B, H, T, D] and k [B, Hkv, T, D]",
            HeadLayout::TokenMajor => "q [B, T, H, D] and k [B, T, Hkv, D]",
        };
        bail!("{name}: need {want}, got {q:?} and {k:?}");
    };
    if k != v {
        bail!("{name}: k {k:?} and v {v:?} must have the same shape");
    }
    let ((h, t), (hkv, kt)) = match layout {
        HeadLayout::HeadMajor => ((*q1, *q2), (*k1, *k2)),
        HeadLayout::TokenMajor => ((*q2, *q1), (*k2, *k1)),
    };
    if kb != b || kt != t || kd != d || hkv == 0 || h == 0 || h % hkv != 0 {
        bail!(
            "{name}: q {q:?} and k/v {k:?} are incompatible (need same B, T, D and H a positive \
             multiple of Hkv)"
        );
    }
    Ok(Dims {
        b: *b,
        h,
        hkv,
        t,
        d: *d,
    })
}

/// Checks that the q, k, v slices hold exactly the elements of their dims (the kernels write
/// outputs of these lengths through the dims, so a longer slice would leave elements unset).
fn check_lens(dm: &Dims, layout: HeadLayout, [q, k, v]: [usize; 3]) -> Result<()> {
    let per_head = dm.b * dm.t * dm.d;
    if q != per_head * dm.h || k != per_head * dm.hkv || v != k {
        bail!("{}: slice lengths do not match the dims", layout.op_name());
    }
    Ok(())
}

/// A read-only strided matrix: element (i, j) is at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

fn mat<T>(data: &[T], rs: usize, cs: usize) -> Mat<'_, T> {
    Mat { data, rs, cs }
}

impl<'a, T> Mat<'a, T> {
    fn t(self) -> Self {
        mat(self.data, self.cs, self.rs)
    }

    /// The matrix from row `i0` on.
    fn skip_rows(self, i0: usize) -> Self {
        mat(&self.data[i0 * self.rs..], self.rs, self.cs)
    }
}

/// A writable matrix with unit column stride and row stride `rs`, `len` elements readable and
/// writable from `ptr`. Either borrowed from a slice, or a head of a [`SharedOut`].
struct MatMut<'a, T> {
    ptr: *mut T,
    len: usize,
    rs: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

impl<'a, T> MatMut<'a, T> {
    fn new(s: &'a mut [T], rs: usize) -> Self {
        Self {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            rs,
            _borrow: PhantomData,
        }
    }

    /// The matrix from row `i0` on (a reborrow).
    fn skip_rows(&mut self, i0: usize) -> Result<MatMut<'_, T>> {
        let off = i0 * self.rs;
        if off > self.len {
            bail!("attention: internal row {i0} out of bounds");
        }
        Ok(MatMut {
            // SAFETY: off <= len, so the pointer stays within (or one past) the buffer.
            ptr: unsafe { self.ptr.add(off) },
            len: self.len - off,
            rs: self.rs,
            _borrow: PhantomData,
        })
    }

    /// The first `n` elements of row `i`.
    fn row(&mut self, i: usize, n: usize) -> Result<&mut [T]> {
        if i * self.rs + n > self.len {
            bail!("attention: internal row {i} out of bounds");
        }
        // SAFETY: in bounds (checked); exclusive for the lifetime of `&mut self` (a slice
        // borrow, or a SharedOut head whose rows no other task touches).
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.rs), n) })
    }
}

/// An output buffer that parallel tasks write directly in its final layout, each task to its
/// own heads (which interleave in memory when token-major, so safe chunking cannot split it).
struct SharedOut<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: tasks only write disjoint elements through `at` (its contract), so sharing the
// pointer between threads is sound for Send element types.
unsafe impl<T: Send> Sync for SharedOut<'_, T> {}

impl<'a, T> SharedOut<'a, T> {
    fn new(s: &'a mut [T]) -> Self {
        Self {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: PhantomData,
        }
    }

    /// The head at `off` with row stride `rs`.
    ///
    /// # Safety
    /// While the result is alive, no other live `MatMut` may touch the elements written
    /// through it (each task passes only the offsets of the heads it owns).
    unsafe fn at(&self, off: usize, rs: usize) -> Result<MatMut<'_, T>> {
        if off > self.len {
            bail!("attention: internal head offset out of bounds");
        }
        Ok(MatMut {
            // SAFETY: off <= len.
            ptr: unsafe { self.ptr.add(off) },
            len: self.len - off,
            rs,
            _borrow: PhantomData,
        })
    }
}

/// `c[m×n] = (accumulate ? c : 0) + a[m×k] · b[k×n]`, single-threaded (callers parallelise
/// over heads).
fn gemm<T: Elem>(
    c: MatMut<'_, T>,
    m: usize,
    n: usize,
    k: usize,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
) -> Result<()> {
    let need = |x: &Mat<'_, T>, r: usize, c: usize| {
        r == 0 || c == 0 || (r - 1) * x.rs + (c - 1) * x.cs < x.data.len()
    };
    let c_fits = m == 0 || n == 0 || ((m - 1) * c.rs + n <= c.len && n <= c.rs);
    if !c_fits || !need(&a, m, k) || !need(&b, k, n) {
        bail!("attention: internal gemm bounds");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            let mut c = c;
            for i in 0..m {
                c.row(i, n)?.fill(T::ZERO);
            }
        }
        return Ok(());
    }
    fn view<T>(x: Mat<'_, T>, rows: usize, cols: usize) -> View<'_, T> {
        View {
            data: x.data,
            rows,
            cols,
            rs: x.rs,
            cs: x.cs,
        }
    }
    // SAFETY: bounds of all three operands are checked above; the rows of `c` do not overlap
    // each other (n <= rs) nor `a` or `b` (an exclusive borrow or an exclusively owned head).
    unsafe {
        gemm_raw(
            c.ptr,
            c.rs,
            view(a, m, k),
            view(b, k, n),
            T::ONE,
            accumulate,
            false,
        )
    };
    Ok(())
}

/// Valid keys of row i: j ≤ i and not padded.
#[inline(always)]
fn valid(kv: Option<&[bool]>, i: usize, j: usize) -> bool {
    j <= i && kv.is_none_or(|kv| kv[j])
}

simd_fn! {
    // Turns raw scores of queries i0.. against keys 0..nk (rows of length nk) into
    // probabilities in place; writes per-row lse.
    fn probs<T: Elem>(s: &mut [T], nk: usize, i0: usize, scale: T, kv: Option<&[bool]>, lse: &mut [f64]) {
        for (r, row) in s.chunks_exact_mut(nk).enumerate() {
            let i = i0 + r;
            for (j, x) in row.iter_mut().enumerate() {
                *x = if valid(kv, i, j) { *x * scale } else { T::NEG_INF };
            }
            let m = max(&row[..=i]);
            if m == T::NEG_INF {
                row.fill(T::ZERO);
                lse[r] = f64::INFINITY;
                continue;
            }
            for x in row[..=i].iter_mut() {
                *x = (*x - m).vexp();
            }
            let total = sum(&row[..=i]);
            row[i + 1..].fill(T::ZERO);
            let inv = T::ONE / total;
            for x in row[..=i].iter_mut() {
                *x *= inv;
            }
            lse[r] = m.to_f64() + total.to_f64().ln();
        }
    }
}

simd_fn! {
    // Recomputes probabilities from raw scores and the stored lse.
    fn probs_from_lse<T: Elem>(s: &mut [T], nk: usize, i0: usize, scale: T, kv: Option<&[bool]>, lse: &[f64]) {
        for (r, row) in s.chunks_exact_mut(nk).enumerate() {
            let i = i0 + r;
            if lse[r].is_infinite() {
                row.fill(T::ZERO);
                continue;
            }
            let l = T::from_f64(lse[r]);
            for (j, x) in row.iter_mut().enumerate() {
                *x = if valid(kv, i, j) { (*x * scale - l).vexp() } else { T::ZERO };
            }
        }
    }
}

simd_fn! {
    // dS = scale · P ⊙ (dP − Σ_j P dP), in place over dP.
    fn softmax_grad<T: Elem>(p: &[T], dp: &mut [T], t: usize, scale: T) {
        for (pr, dr) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
            let c = dot(pr, dr);
            for (x, pv) in dr.iter_mut().zip(pr) {
                *x = *pv * (*x - c) * scale;
            }
        }
    }
}

/// cos/sin rows for positions 0..T, [T, D/2] each.
#[derive(Clone, Copy)]
struct Tables<'a, T> {
    cos: &'a [T],
    sin: &'a [T],
}

/// Head (off, rs) of `x` as a [T, D] matrix: a strided view, or rotated into `buf` with rope.
fn load<'a, T: Elem>(
    x: &'a [T],
    (off, rs): (usize, usize),
    rope: Option<Tables<'_, T>>,
    buf: &'a mut [T],
    d: usize,
) -> Mat<'a, T> {
    match rope {
        Some(tb) => {
            rotate(&x[off..], rs, buf, d, (tb.cos, tb.sin), d, false);
            mat(buf, d, 1)
        }
        None => mat(&x[off..], rs, 1),
    }
}

/// Writes the inverse rotation of the contiguous [T, D] `src` into head `dst` (rope backward).
fn unrotate<T: Elem>(src: &[T], mut dst: MatMut<'_, T>, tb: Tables<'_, T>, d: usize) -> Result<()> {
    let half = d / 2;
    for (i, x) in src.chunks_exact(d).enumerate() {
        let rows = i * half..(i + 1) * half;
        let (c, s) = (&tb.cos[rows.clone()], &tb.sin[rows]);
        rotate(x, d, dst.row(i, d)?, d, (c, s), d, true);
    }
    Ok(())
}

/// Per-task scratch for the rotated q/k heads (and their gradients): [T, D] with rope, empty
/// without.
fn rope_scratch<T: Elem>(rope: Option<Tables<'_, T>>, dm: Dims) -> Vec<T> {
    vec![T::ZERO; if rope.is_some() { dm.t * dm.d } else { 0 }]
}

impl AttentionOp {
    fn key_valid(&self, b: usize, t: usize) -> Option<&[bool]> {
        self.key_valid.as_deref().map(|kv| &kv[b * t..(b + 1) * t])
    }

    fn check(&self, q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
        let dm = match (&self.rope, self.layout) {
            (Some((cos, _)), HeadLayout::TokenMajor) => {
                let split = |x| split_heads(x, cos.dims());
                check_dims(self.layout, &split(q)?, &split(k)?, &split(v)?)?
            }
            _ => check_dims(self.layout, q, k, v)?,
        };
        let name = self.layout.op_name();
        let (b, t) = (dm.b, dm.t);
        if self.key_valid.as_ref().is_some_and(|kv| kv.len() != b * t) {
            bail!("{name}: key_padding must be [{b}, {t}]");
        }
        if let Some((c, s)) = &self.rope {
            let want = [t, dm.d / 2];
            if dm.d % 2 != 0 || c.dims() != want || s.dims() != want {
                bail!("{name}: cos/sin must be {want:?} (even D)");
            }
        }
        Ok(dm)
    }

    /// Runs `f` with the rope tables as slices (None without rope).
    fn with_tables<T: Elem, R>(
        &self,
        f: impl FnOnce(Option<Tables<'_, T>>) -> Result<R>,
    ) -> Result<R> {
        match &self.rope {
            Some((c, s)) => with_cpu_slices::<T, _>(&[c, s], |cs| {
                f(Some(Tables {
                    cos: cs[0],
                    sin: cs[1],
                }))
            }),
            None => f(None),
        }
    }

    fn fwd<T: Elem>(&self, s: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
        let [(qs, ql), (ks, kl), (vs, vl)] = s;
        let out = self.forward_slices(
            [ql.dims(), kl.dims(), vl.dims()],
            contiguous_slice::<T>(qs, ql)?,
            contiguous_slice::<T>(ks, kl)?,
            contiguous_slice::<T>(vs, vl)?,
        )?;
        Ok((T::to_cpu_storage_owned(out), ql.shape().clone()))
    }

    fn fwd_heads<T: Elem>(
        &self,
        dm: Dims,
        q: &[T],
        k: &[T],
        v: &[T],
        rope: Option<Tables<'_, T>>,
    ) -> Result<(Vec<T>, Vec<f64>)> {
        if dm.t * dm.d > 0 {
            #[cfg(target_arch = "x86_64")]
            if let Some(res) = self.fwd_fast(dm, [q, k, v], rope) {
                return res;
            }
        }
        self.fwd_generic(dm, q, k, v, rope)
    }

    /// [`Self::fwd_heads`] for any [`Elem`] through the `gemm` crate.
    fn fwd_generic<T: Elem>(
        &self,
        dm: Dims,
        q: &[T],
        k: &[T],
        v: &[T],
        rope: Option<Tables<'_, T>>,
    ) -> Result<(Vec<T>, Vec<f64>)> {
        let Dims { b, h, hkv, t, d } = dm;
        let rep = h / hkv;
        let scale = T::from_f64(self.scale);
        let mut out = vec![T::ZERO; q.len()];
        let mut lse = vec![0f64; b * h * t];
        if t * d == 0 {
            return Ok((out, lse));
        }
        let shared = SharedOut::new(&mut out);
        // One task per (batch, kv head): its `rep` query heads share k/v.
        lse.par_chunks_mut(rep * t)
            .enumerate()
            .try_for_each(|(task, lse)| -> Result<()> {
                let (bi, g) = (task / hkv, task % hkv);
                let kv = self.key_valid(bi, t);
                let (mut kr, mut qr) = (rope_scratch(rope, dm), rope_scratch(rope, dm));
                let mut sc = vec![T::ZERO; QBLOCK.min(t) * t];
                let kpos = dm.head(self.layout, bi, g, hkv);
                let kh = load(k, kpos, rope, &mut kr, d);
                let vh = mat(&v[kpos.0..], kpos.1, 1);
                for r in 0..rep {
                    let (qoff, qrs) = dm.head(self.layout, bi, g * rep + r, h);
                    let qh = load(q, (qoff, qrs), rope, &mut qr, d);
                    // SAFETY: this task is the only one that writes query head g·rep + r of
                    // batch bi.
                    let mut oh = unsafe { shared.at(qoff, qrs)? };
                    let lse = &mut lse[r * t..(r + 1) * t];
                    // Causal: query block i0..i1 only sees keys 0..i1.
                    for i0 in (0..t).step_by(QBLOCK) {
                        let (i1, nq) = ((i0 + QBLOCK).min(t), QBLOCK.min(t - i0));
                        let sc = &mut sc[..nq * i1];
                        let qb = qh.skip_rows(i0);
                        gemm(MatMut::new(sc, i1), nq, i1, d, qb, kh.t(), false)?;
                        probs(sc, i1, i0, scale, kv, &mut lse[i0..i1]);
                        gemm(oh.skip_rows(i0)?, nq, d, i1, mat(sc, i1, 1), vh, false)?;
                    }
                }
                Ok(())
            })?;
        Ok((out, lse))
    }

    fn bwd_t<T: Elem>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (dq, dk, dv) = with_cpu_slices::<T, _>(&[q, k, v, g], |s| {
            self.backward_slices([q.dims(), k.dims(), v.dims()], [s[0], s[1], s[2], s[3]])
        })?;
        Ok((
            tensor_from_vec(dq, q.dims())?,
            tensor_from_vec(dk, k.dims())?,
            tensor_from_vec(dv, v.dims())?,
        ))
    }

    fn bwd_heads<T: Elem>(
        &self,
        dm: Dims,
        [q, k, v, go]: [&[T]; 4],
        lse: &[f64],
        rope: Option<Tables<'_, T>>,
    ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
        if dm.t * dm.d > 0 {
            #[cfg(target_arch = "x86_64")]
            if let Some(res) = self.bwd_fast(dm, [q, k, v, go], lse, rope) {
                return res;
            }
        }
        self.bwd_generic(dm, [q, k, v, go], lse, rope)
    }

    /// [`Self::bwd_heads`] for any [`Elem`]: the [`bwd_task`] skeleton with [`GenericSteps`].
    fn bwd_generic<T: Elem>(
        &self,
        dm: Dims,
        x: [&[T]; 4],
        lse: &[f64],
        rope: Option<Tables<'_, T>>,
    ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let [q, k, v, _] = x;
        // Zeroed: the generic dK/dV steps always accumulate (they ignore `first`).
        let mut dq = vec![T::ZERO; q.len()];
        let mut dk = vec![T::ZERO; k.len()];
        let mut dv = vec![T::ZERO; v.len()];
        if dm.t * dm.d > 0 {
            let steps = GenericSteps {
                scale: T::from_f64(self.scale),
                d: dm.d,
            };
            self.bwd_tasks(&steps, dm, x, lse, rope, [&mut dq, &mut dk, &mut dv])?;
        }
        Ok((dq, dk, dv))
    }

    /// Runs [`bwd_task`] with `steps` for every task (one per batch and kv head, in parallel),
    /// writing dq, dk, dv (q, k, v's lengths and layout).
    #[allow(clippy::too_many_arguments)]
    fn bwd_tasks<T: Elem, S: BwdSteps<T>>(
        &self,
        steps: &S,
        dm: Dims,
        x: [&[T]; 4],
        lse: &[f64],
        rope: Option<Tables<'_, T>>,
        [dq, dk, dv]: [&mut [T]; 3],
    ) -> Result<()> {
        let Dims { h, hkv, t, .. } = dm;
        let out = [
            &SharedOut::new(dq),
            &SharedOut::new(dk),
            &SharedOut::new(dv),
        ];
        let cx = TaskCx {
            dm,
            layout: self.layout,
            rope,
        };
        lse.par_chunks(h / hkv * t)
            .enumerate()
            .try_for_each(|(task, lse)| {
                let (bi, g) = (task / hkv, task % hkv);
                bwd_task(steps, &cx, x, self.key_valid(bi, t), (bi, g), lse, out)
            })
    }
}

/// What every attention task needs besides its data: dims, head layout, rope tables.
struct TaskCx<'a, T> {
    dm: Dims,
    layout: HeadLayout,
    rope: Option<Tables<'a, T>>,
}

/// Query block `i0 .. i1` (`nq` rows) of the causal loop: it sees keys `0 .. i1` only.
#[derive(Clone, Copy)]
struct Block {
    i0: usize,
    i1: usize,
    nq: usize,
}

/// The per-step kernels of the attention backward. [`bwd_task`] is its one decomposition;
/// each path provides only how a step is computed: [`GenericSteps`] (the `gemm` crate and
/// [`Elem`] loops, any element type) and `fast::Steps` (AVX-512 micro-kernels, f32).
///
/// For each query block, with P and dP/dS in `[nq, ·]` scratch of row stride [`Self::ld`]:
/// [`scores`](Self::scores) S = Q·Kᵀ → [`probs`](Self::probs) P from the saved logsumexp →
/// [`dv`](Self::dv) dV += Pᵀ·dO → [`dp`](Self::dp) dP = dO·Vᵀ →
/// [`ds`](Self::ds) dS = scale · P ⊙ (dP − Σ_j P dP) → [`dq`](Self::dq) dQ = dS·K →
/// [`dk`](Self::dk) dK += dSᵀ·Q. Key-side gradients (dV, dK) only get rows `0 .. i1`; with
/// `first` (the task's first query head) rows `i0 .. i1` are written for the first time, so
/// a step may overwrite them instead of accumulating.
trait BwdSteps<T: Elem>: Sync {
    /// A task's K and V heads (and key mask) in the form this path's products read.
    type Kv<'a>;
    fn kv<'a>(&self, k: Mat<'a, T>, v: Mat<'a, T>, valid: Option<&'a [bool]>) -> Self::Kv<'a>;
    /// Row stride of the block scratch for block `b` of `t` queries.
    fn ld(&self, b: Block, t: usize) -> usize;
    fn scores(&self, kv: &Self::Kv<'_>, s: &mut [T], q: Mat<'_, T>, b: Block) -> Result<()>;
    fn probs(&self, kv: &Self::Kv<'_>, p: &mut [T], b: Block, lse: &[f64]);
    fn dv(
        &self,
        dv: &mut MatMut<'_, T>,
        p: &[T],
        go: Mat<'_, T>,
        b: Block,
        first: bool,
    ) -> Result<()>;
    fn dp(&self, kv: &Self::Kv<'_>, dp: &mut [T], go: Mat<'_, T>, b: Block) -> Result<()>;
    fn ds(&self, p: &[T], dp: &mut [T], b: Block);
    fn dq(&self, kv: &Self::Kv<'_>, dq: &mut MatMut<'_, T>, ds: &[T], b: Block) -> Result<()>;
    fn dk(
        &self,
        dk: &mut MatMut<'_, T>,
        ds: &[T],
        q: Mat<'_, T>,
        b: Block,
        first: bool,
    ) -> Result<()>;
}

/// Backward of one task: kv head `g` of batch `bi` and its query heads (dQ of those, dK and
/// dV of the kv head), written into `[dq, dk, dv]` in their final layout. With rope, q and k
/// are rotated into scratch, their gradients collect in scratch and are un-rotated at the end.
#[allow(clippy::too_many_arguments)]
fn bwd_task<T: Elem, S: BwdSteps<T>>(
    steps: &S,
    cx: &TaskCx<'_, T>,
    [q, k, v, go]: [&[T]; 4],
    valid: Option<&[bool]>,
    (bi, g): (usize, usize),
    lse: &[f64],
    [sq, sk, sv]: [&SharedOut<'_, T>; 3],
) -> Result<()> {
    let (dm, rope) = (cx.dm, cx.rope);
    let Dims { h, hkv, t, d, .. } = dm;
    let rep = h / hkv;
    let (mut kr, mut qr) = (rope_scratch(rope, dm), rope_scratch(rope, dm));
    let (mut dkr, mut dqr) = (rope_scratch(rope, dm), rope_scratch(rope, dm));
    let mut p = vec![T::ZERO; QBLOCK.min(t) * t];
    let mut dp = vec![T::ZERO; QBLOCK.min(t) * t];
    let (koff, krs) = dm.head(cx.layout, bi, g, hkv);
    let kh = load(k, (koff, krs), rope, &mut kr, d);
    let kvh = steps.kv(kh, mat(&v[koff..], krs, 1), valid);
    // SAFETY: (every `at` below) this task is the only one that writes kv head g of batch bi
    // and its query heads g·rep .. (g+1)·rep.
    let mut dvh = unsafe { sv.at(koff, krs)? };
    let mut dkh = match rope {
        Some(_) => MatMut::new(&mut dkr, d),
        // SAFETY: see "every `at` below" above: a head only this task writes.
        None => unsafe { sk.at(koff, krs)? },
    };
    for r in 0..rep {
        let (qoff, qrs) = dm.head(cx.layout, bi, g * rep + r, h);
        let qh = load(q, (qoff, qrs), rope, &mut qr, d);
        let gh = mat(&go[qoff..], qrs, 1);
        let mut dqh = match rope {
            Some(_) => MatMut::new(&mut dqr, d),
            // SAFETY: see "every `at` below" above: a head only this task writes.
            None => unsafe { sq.at(qoff, qrs)? },
        };
        let lse = &lse[r * t..(r + 1) * t];
        for i0 in (0..t).step_by(QBLOCK) {
            let (i1, nq) = ((i0 + QBLOCK).min(t), QBLOCK.min(t - i0));
            let b = Block { i0, i1, nq };
            let n = nq * steps.ld(b, t);
            let (p, dp) = (&mut p[..n], &mut dp[..n]);
            let (qb, gb, first) = (qh.skip_rows(i0), gh.skip_rows(i0), r == 0);
            steps.scores(&kvh, p, qb, b)?;
            steps.probs(&kvh, p, b, &lse[i0..i1]);
            steps.dv(&mut dvh, p, gb, b, first)?;
            steps.dp(&kvh, dp, gb, b)?;
            steps.ds(p, dp, b);
            steps.dq(&kvh, &mut dqh, dp, b)?;
            steps.dk(&mut dkh, dp, qb, b, first)?;
        }
        if let Some(tb) = rope {
            // SAFETY: see "every `at` below" above: a head only this task writes.
            unrotate(&dqr, unsafe { sq.at(qoff, qrs)? }, tb, d)?;
        }
    }
    if let Some(tb) = rope {
        // SAFETY: see "every `at` below" above: a head only this task writes.
        unrotate(&dkr, unsafe { sk.at(koff, krs)? }, tb, d)?;
    }
    Ok(())
}

/// The [`BwdSteps`] of any [`Elem`]: `gemm` crate products over compact `[nq, i1]` scratch,
/// causal skipping per query block, [`Elem`] softmax loops. dK and dV always accumulate (their
/// buffers start zeroed).
struct GenericSteps<T> {
    scale: T,
    /// Head dim D.
    d: usize,
}

/// A task's K and V heads as strided views, and its key mask.
struct KvHeads<'a, T> {
    k: Mat<'a, T>,
    v: Mat<'a, T>,
    valid: Option<&'a [bool]>,
}

impl<T: Elem> BwdSteps<T> for GenericSteps<T> {
    type Kv<'a> = KvHeads<'a, T>;

    fn kv<'a>(&self, k: Mat<'a, T>, v: Mat<'a, T>, valid: Option<&'a [bool]>) -> KvHeads<'a, T> {
        KvHeads { k, v, valid }
    }

    fn ld(&self, b: Block, _t: usize) -> usize {
        b.i1
    }

    fn scores(&self, kv: &KvHeads<'_, T>, s: &mut [T], q: Mat<'_, T>, b: Block) -> Result<()> {
        gemm(MatMut::new(s, b.i1), b.nq, b.i1, self.d, q, kv.k.t(), false)
    }

    fn probs(&self, kv: &KvHeads<'_, T>, p: &mut [T], b: Block, lse: &[f64]) {
        probs_from_lse(p, b.i1, b.i0, self.scale, kv.valid, lse);
    }

    fn dv(&self, dv: &mut MatMut<'_, T>, p: &[T], go: Mat<'_, T>, b: Block, _: bool) -> Result<()> {
        gemm(
            dv.skip_rows(0)?,
            b.i1,
            self.d,
            b.nq,
            mat(p, 1, b.i1),
            go,
            true,
        )
    }

    fn dp(&self, kv: &KvHeads<'_, T>, dp: &mut [T], go: Mat<'_, T>, b: Block) -> Result<()> {
        gemm(
            MatMut::new(dp, b.i1),
            b.nq,
            b.i1,
            self.d,
            go,
            kv.v.t(),
            false,
        )
    }

    fn ds(&self, p: &[T], dp: &mut [T], b: Block) {
        softmax_grad(p, dp, b.i1, self.scale);
    }

    fn dq(&self, kv: &KvHeads<'_, T>, dq: &mut MatMut<'_, T>, ds: &[T], b: Block) -> Result<()> {
        gemm(
            dq.skip_rows(b.i0)?,
            b.nq,
            self.d,
            b.i1,
            mat(ds, b.i1, 1),
            kv.k,
            false,
        )
    }

    fn dk(&self, dk: &mut MatMut<'_, T>, ds: &[T], q: Mat<'_, T>, b: Block, _: bool) -> Result<()> {
        gemm(
            dk.skip_rows(0)?,
            b.i1,
            self.d,
            b.nq,
            mat(ds, 1, b.i1),
            q,
            true,
        )
    }
}

/// The rope tables as f32 (None when `T` is not f32).
fn f32_tables<T: Elem>(rope: Option<Tables<'_, T>>) -> Option<Option<Tables<'_, f32>>> {
    match rope {
        None => Some(None),
        Some(tb) => Some(Some(Tables {
            cos: T::as_f32(tb.cos)?,
            sin: T::as_f32(tb.sin)?,
        })),
    }
}

#[cfg(target_arch = "x86_64")]
impl AttentionOp {
    /// [`fast`] context, when `T` is f32 and the CPU has AVX-512.
    fn fast_cx<'a, T: Elem>(&self, dm: Dims, rope: Option<Tables<'a, T>>) -> Option<fast::Cx<'a>> {
        if !fast::available() {
            return None;
        }
        Some(fast::Cx {
            dm,
            layout: self.layout,
            scale: self.scale as f32,
            rope: f32_tables(rope)?,
        })
    }

    /// [`Self::fwd_heads`] on the f32 AVX-512 path (None when it does not apply).
    fn fwd_fast<T: Elem>(
        &self,
        dm: Dims,
        [q, k, v]: [&[T]; 3],
        rope: Option<Tables<'_, T>>,
    ) -> Option<Result<(Vec<T>, Vec<f64>)>> {
        let cx = self.fast_cx(dm, rope)?;
        let x = [T::as_f32(q)?, T::as_f32(k)?, T::as_f32(v)?];
        let Dims { b, h, hkv, t, .. } = dm;
        // SAFETY: every element is written before `out` is returned. q is [B, H, T, D] (or
        // token-major; its length checked in `forward_slices`), the tasks cover every (batch,
        // query head) (B·Hkv tasks of H/Hkv ≥ 1 heads each), and each query block's last
        // product overwrites all D columns of its rows (`product` with `load` false and
        // `nc = D`). On an error `out` is dropped unread.
        let mut out = unsafe { output_buffer::<T>(q.len()) };
        let mut lse = vec![0f64; b * h * t];
        let res = {
            let shared = SharedOut::new(T::as_f32_mut(&mut out)?);
            lse.par_chunks_mut(h / hkv * t)
                .enumerate()
                .try_for_each(|(task, lse)| {
                    let (bi, g) = (task / hkv, task % hkv);
                    let kv = self.key_valid(bi, t);
                    // SAFETY: the CPU has avx512f (`fast_cx` checked it).
                    unsafe { fast::fwd_task(&cx, x, kv, (bi, g), lse, &shared) }
                })
        };
        Some(res.map(|()| (out, lse)))
    }

    /// [`Self::bwd_heads`] on the f32 AVX-512 path: the [`bwd_task`] skeleton with
    /// `fast::Steps` (None when it does not apply).
    #[allow(clippy::type_complexity)]
    fn bwd_fast<T: Elem>(
        &self,
        dm: Dims,
        [q, k, v, go]: [&[T]; 4],
        lse: &[f64],
        rope: Option<Tables<'_, T>>,
    ) -> Option<Result<(Vec<T>, Vec<T>, Vec<T>)>> {
        let steps = fast::Steps::new(self.scale as f32, dm)?;
        let rope = f32_tables(rope)?;
        let x = [T::as_f32(q)?, T::as_f32(k)?, T::as_f32(v)?, T::as_f32(go)?];
        // SAFETY: every element is written before it is read or returned (lengths checked in
        // `backward_slices`; the tasks cover every batch and head, as in `fwd_fast`). dQ: each
        // query block overwrites all D columns of its rows, or with rope `unrotate` writes the
        // whole head from zeroed scratch. dK/dV: in the task's first query head (`first` in
        // `fast::key_grad`), each query block overwrites its own rows and accumulates only
        // into the rows before it, which earlier blocks overwrote; later heads accumulate. With
        // rope, dK is gathered in zeroed scratch and written whole by `unrotate`. On an error
        // the buffers are dropped unread.
        let (mut dq, mut dk, mut dv) = unsafe {
            (
                output_buffer::<T>(q.len()),
                output_buffer::<T>(k.len()),
                output_buffer::<T>(v.len()),
            )
        };
        let out = [
            T::as_f32_mut(&mut dq)?,
            T::as_f32_mut(&mut dk)?,
            T::as_f32_mut(&mut dv)?,
        ];
        let res = self.bwd_tasks(&steps, dm, x, lse, rope, out);
        Some(res.map(|()| (dq, dk, dv)))
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        match self.layout {
            HeadLayout::HeadMajor => "peft-causal-attention",
            HeadLayout::TokenMajor => "peft-rope-causal-attention",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = [(s1, l1), (s2, l2), (s3, l3)];
        match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => self.fwd::<f32>(s),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => self.fwd::<f64>(s),
            _ => bail!(
                "{}: fused op supports f32/f64 with matching dtypes",
                self.layout.op_name()
            ),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = match q.dtype() {
            candle_core::DType::F32 => self.bwd_t::<f32>(q, k, v, g)?,
            candle_core::DType::F64 => self.bwd_t::<f64>(q, k, v, g)?,
            dt => bail!(
                "{}: unsupported dtype {dt:?} in backward",
                self.layout.op_name()
            ),
        };
        Ok((
            q.track_op().then_some(dq),
            k.track_op().then_some(dk),
            v.track_op().then_some(dv),
        ))
    }
}

/// Slice entry points for ops that run attention inside a larger fused node (the decoder
/// block): the same kernels as this op's forward and backward.
impl AttentionOp {
    /// Output for contiguous q, k, v of the given dims; keeps the logsumexp for
    /// [`AttentionOp::backward_slices`].
    pub(crate) fn forward_slices<T: Elem>(
        &self,
        [qd, kd, vd]: [&[usize]; 3],
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> Result<Vec<T>> {
        let dm = self.check(qd, kd, vd)?;
        check_lens(&dm, self.layout, [q.len(), k.len(), v.len()])?;
        let (out, lse) = self.with_tables(|rope| self.fwd_heads(dm, q, k, v, rope))?;
        let _ = self.lse.set(lse);
        Ok(out)
    }

    /// (dq, dk, dv) for the output gradient `g`, after [`AttentionOp::forward_slices`].
    pub(crate) fn backward_slices<T: Elem>(
        &self,
        [qd, kd, vd]: [&[usize]; 3],
        [q, k, v, g]: [&[T]; 4],
    ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let dm = self.check(qd, kd, vd)?;
        check_lens(&dm, self.layout, [q.len(), k.len(), v.len()])?;
        if g.len() != q.len() {
            bail!(
                "{}: output gradient does not match q",
                self.layout.op_name()
            );
        }
        let lse = self
            .lse
            .get()
            .filter(|l| l.len() == dm.b * dm.h * dm.t)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("{}: no forward state", self.layout.op_name()))
            })?;
        self.with_tables(|rope| self.bwd_heads(dm, [q, k, v, g], lse, rope))
    }
}

/// The f32 path on AVX-512 (see its module docs).
#[cfg(target_arch = "x86_64")]
mod fast;

#[cfg(test)]
mod bench {
    use super::*;

    /// Times `fwd_heads` / `bwd_heads` on the SmolLM2-135M training shape (f32, token-major,
    /// rope, GQA 9/3, T = 256, D = 64), against the generic path, interleaved. Run with
    /// `cargo test --release --lib attention_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn attention_throughput() -> Result<()> {
        let dm = Dims {
            b: 4,
            h: 9,
            hkv: 3,
            t: 256,
            d: 64,
        };
        let mut seed = 1u64;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect()
        };
        let (b, h, hkv, t, d) = (dm.b, dm.h, dm.hkv, dm.t, dm.d);
        let (q, k, v, go) = (
            rnd(b * t * h * d),
            rnd(b * t * hkv * d),
            rnd(b * t * hkv * d),
            rnd(b * t * h * d),
        );
        let cos: Vec<f32> = (0..t * d / 2)
            .map(|i| ((i % 97) as f32 * 0.1).cos())
            .collect();
        let sin: Vec<f32> = (0..t * d / 2)
            .map(|i| ((i % 97) as f32 * 0.1).sin())
            .collect();
        let rope = Some(Tables {
            cos: &cos,
            sin: &sin,
        });
        let kv: Vec<bool> = (0..b * t).map(|i| i % t < t - 7 * (i / t)).collect();
        let op = AttentionOp::new(0.125, Some(kv), HeadLayout::TokenMajor, None);
        let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            let t0 = std::time::Instant::now();
            f()?;
            Ok(t0.elapsed().as_secs_f64() * 1e3)
        };
        let (mut tf, mut tb, mut gf, mut gb) = (vec![], vec![], vec![], vec![]);
        let (o_fast, l_fast) = op.fwd_heads(dm, &q, &k, &v, rope)?;
        let (o_gen, l_gen) = op.fwd_generic(dm, &q, &k, &v, rope)?;
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        println!(
            "fwd max diff {:e}, lse max diff {:e}",
            diff(&o_fast, &o_gen),
            l_fast
                .iter()
                .zip(&l_gen)
                .filter(|(a, _)| a.is_finite())
                .map(|(a, b)| (a - b).abs())
                .fold(0f64, f64::max)
        );
        let g1 = op.bwd_heads(dm, [&q, &k, &v, &go], &l_fast, rope)?;
        let g2 = op.bwd_generic(dm, [&q, &k, &v, &go], &l_fast, rope)?;
        println!(
            "bwd max diff dq {:e} dk {:e} dv {:e}",
            diff(&g1.0, &g2.0),
            diff(&g1.1, &g2.1),
            diff(&g1.2, &g2.2)
        );
        // ATTN_FAST_ONLY=1: time only the fast path (for profiling).
        let only_fast = std::env::var("ATTN_FAST_ONLY").is_ok();
        let runs = if only_fast { 301 } else { 31 };
        for _ in 0..runs {
            tf.push(time(&mut || {
                op.fwd_heads(dm, &q, &k, &v, rope).map(|_| ())
            })?);
            tb.push(time(&mut || {
                op.bwd_heads(dm, [&q, &k, &v, &go], &l_fast, rope)
                    .map(|_| ())
            })?);
            if only_fast {
                continue;
            }
            gf.push(time(&mut || {
                op.fwd_generic(dm, &q, &k, &v, rope).map(|_| ())
            })?);
            gb.push(time(&mut || {
                op.bwd_generic(dm, [&q, &k, &v, &go], &l_fast, rope)
                    .map(|_| ())
            })?);
        }
        let med = |mut x: Vec<f64>| {
            x.sort_by(f64::total_cmp);
            (x[x.len() / 2], x[0])
        };
        if only_fast {
            gf.push(0.0);
            gb.push(0.0);
        }
        let (a, b2, c, e) = (med(tf), med(gf), med(tb), med(gb));
        println!(
            "fwd  fast {:.3} ms (min {:.3})  generic {:.3} ms (min {:.3})",
            a.0, a.1, b2.0, b2.1
        );
        println!(
            "bwd  fast {:.3} ms (min {:.3})  generic {:.3} ms (min {:.3})",
            c.0, c.1, e.0, e.1
        );
        Ok(())
    }
}
