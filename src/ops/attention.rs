//! Fused causal self-attention: softmax(scale·QKᵀ + causal/padding mask)·V with backward.
//!
//! Only q, k, v and the output are candle tensors; the [T, T] scores live in per-task scratch,
//! so candle never allocates, stores or accumulates gradients of [B, H, T, T] tensors (the
//! dominant cost of the composed version). Forward keeps the per-row logsumexp; backward
//! recomputes the probabilities from it (flash-attention style), so nothing [T, T]-sized is
//! stored between passes.

use super::kernel::{
    contiguous_slice, dot, max, simd_fn, sum, tensor_from_vec, with_cpu_slices, Elem,
};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Query rows per causal block: blocks skip the keys after their last query (~37% fewer
/// flops at T = 256 than full T×T products).
const QBLOCK: usize = 64;

pub(crate) struct AttentionOp {
    pub scale: f64,
    /// [B, T] key validity (true = may be attended to); None = all valid.
    pub key_valid: Option<Vec<bool>>,
    /// Per-row logsumexp of the scaled, masked scores ([B, H, T]); +inf marks a row with no
    /// valid key (its output and gradients are 0).
    lse: OnceLock<Vec<f64>>,
}

impl AttentionOp {
    pub(crate) fn new(scale: f64, key_valid: Option<Vec<bool>>) -> Self {
        Self {
            scale,
            key_valid,
            lse: OnceLock::new(),
        }
    }
}

/// Shapes: (B, H, Hkv, T, D).
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    b: usize,
    h: usize,
    hkv: usize,
    t: usize,
    d: usize,
}

pub(crate) fn check_dims(q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
    let ([b, h, t, d], [kb, hkv, kt, kd]) = (q, k) else {
        bail!("causal_attention: q and k must be [B, H, T, D], got {q:?} and {k:?}");
    };
    if k != v {
        bail!("causal_attention: k {k:?} and v {v:?} must have the same shape");
    }
    if kb != b || kt != t || kd != d || *hkv == 0 || h % hkv != 0 {
        bail!("causal_attention: q {q:?} and k/v {k:?} are incompatible (need same B, T, D and H % Hkv == 0)");
    }
    Ok(Dims {
        b: *b,
        h: *h,
        hkv: *hkv,
        t: *t,
        d: *d,
    })
}

/// A row-major view: element (i, j) is at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

fn mat<T>(data: &[T], rs: usize, cs: usize) -> Mat<'_, T> {
    Mat { data, rs, cs }
}

/// `c[m×n] (contiguous) = (accumulate ? c : 0) + a[m×k] · b[k×n]`, single-threaded (callers
/// parallelise over heads).
fn gemm<T: Elem>(
    c: &mut [T],
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
    if c.len() < m * n || !need(&a, m, k) || !need(&b, k, n) {
        bail!("causal_attention: internal gemm bounds");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(T::ZERO);
        }
        return Ok(());
    }
    // SAFETY: bounds of all three operands are checked above; `c` does not alias `a` or `b`
    // (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
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

impl AttentionOp {
    fn key_valid(&self, b: usize, t: usize) -> Option<&[bool]> {
        self.key_valid.as_deref().map(|kv| &kv[b * t..(b + 1) * t])
    }

    fn fwd<T: Elem>(&self, s: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
        let dm = check_dims(s[0].1.dims(), s[1].1.dims(), s[2].1.dims())?;
        let Dims { b, h, hkv, t, d } = dm;
        if self.key_valid.as_ref().is_some_and(|kv| kv.len() != b * t) {
            bail!("causal_attention: key_padding must be [{b}, {t}]");
        }
        let q = contiguous_slice::<T>(s[0].0, s[0].1)?;
        let k = contiguous_slice::<T>(s[1].0, s[1].1)?;
        let v = contiguous_slice::<T>(s[2].0, s[2].1)?;
        let rep = h / hkv;
        let (td, scale) = (t * d, T::from_f64(self.scale));
        let mut out = vec![T::ZERO; q.len()];
        let mut lse = vec![0f64; b * h * t];
        if td > 0 {
            // One task per (batch, kv head): its `rep` query heads share k/v.
            out.par_chunks_mut(rep * td)
                .zip(lse.par_chunks_mut(rep * t))
                .enumerate()
                .try_for_each(|(task, (o, lse))| -> Result<()> {
                    let kv = self.key_valid(task / hkv, t);
                    let kh = &k[task * td..(task + 1) * td];
                    let vh = &v[task * td..(task + 1) * td];
                    let mut sc = vec![T::ZERO; QBLOCK.min(t) * t];
                    for r in 0..rep {
                        let qh = &q[(task * rep + r) * td..(task * rep + r + 1) * td];
                        let oh = &mut o[r * td..(r + 1) * td];
                        let lse = &mut lse[r * t..(r + 1) * t];
                        // Causal: query block i0..i1 only sees keys 0..i1.
                        for i0 in (0..t).step_by(QBLOCK) {
                            let (i1, nq) = ((i0 + QBLOCK).min(t), (QBLOCK).min(t - i0));
                            let sc = &mut sc[..nq * i1];
                            let qb = mat(&qh[i0 * d..], d, 1);
                            gemm(sc, nq, i1, d, qb, mat(kh, 1, d), false)?;
                            probs(sc, i1, i0, scale, kv, &mut lse[i0..i1]);
                            let ob = &mut oh[i0 * d..i1 * d];
                            gemm(ob, nq, d, i1, mat(sc, i1, 1), mat(vh, d, 1), false)?;
                        }
                    }
                    Ok(())
                })?;
        }
        let _ = self.lse.set(lse);
        Ok((T::to_cpu_storage_owned(out), s[0].1.shape().clone()))
    }

    fn bwd_t<T: Elem>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dm = check_dims(q.dims(), k.dims(), v.dims())?;
        let Dims { b, h, hkv, t, d } = dm;
        let lse = self
            .lse
            .get()
            .filter(|l| l.len() == b * h * t)
            .ok_or_else(|| candle_core::Error::Msg("causal_attention: no forward state".into()))?;
        let rep = h / hkv;
        let (td, scale) = (t * d, T::from_f64(self.scale));
        let (qdims, kdims) = (q.dims().to_vec(), k.dims().to_vec());
        with_cpu_slices::<T, _>(&[q, k, v, g], |s| {
            let (q, k, v, go) = (s[0], s[1], s[2], s[3]);
            let mut dq = vec![T::ZERO; q.len()];
            let mut dk = vec![T::ZERO; k.len()];
            let mut dv = vec![T::ZERO; v.len()];
            if td > 0 {
                dq.par_chunks_mut(rep * td)
                    .zip(dk.par_chunks_mut(td).zip(dv.par_chunks_mut(td)))
                    .zip(lse.par_chunks(rep * t))
                    .enumerate()
                    .try_for_each(|(task, ((dq, (dk, dv)), lse))| -> Result<()> {
                        let kv = self.key_valid(task / hkv, t);
                        let kh = &k[task * td..(task + 1) * td];
                        let vh = &v[task * td..(task + 1) * td];
                        let mut p = vec![T::ZERO; QBLOCK.min(t) * t];
                        let mut dp = vec![T::ZERO; QBLOCK.min(t) * t];
                        for r in 0..rep {
                            let off = (task * rep + r) * td;
                            let (qh, gh) = (&q[off..off + td], &go[off..off + td]);
                            let dqh = &mut dq[r * td..(r + 1) * td];
                            let lse = &lse[r * t..(r + 1) * t];
                            for i0 in (0..t).step_by(QBLOCK) {
                                let (i1, nq) = ((i0 + QBLOCK).min(t), QBLOCK.min(t - i0));
                                let (p, dp) = (&mut p[..nq * i1], &mut dp[..nq * i1]);
                                let (qb, gb) = (mat(&qh[i0 * d..], d, 1), mat(&gh[i0 * d..], d, 1));
                                gemm(p, nq, i1, d, qb, mat(kh, 1, d), false)?;
                                probs_from_lse(p, i1, i0, scale, kv, &lse[i0..i1]);
                                // dV[..i1] += Pᵀ dO
                                gemm(&mut dv[..i1 * d], i1, d, nq, mat(p, 1, i1), gb, true)?;
                                // dP = dO Vᵀ; dS = scale · P ⊙ (dP − Σ_j P dP)
                                gemm(dp, nq, i1, d, gb, mat(vh, 1, d), false)?;
                                softmax_grad(p, dp, i1, scale);
                                // dQ = dS K; dK[..i1] += dSᵀ Q
                                let dqb = &mut dqh[i0 * d..i1 * d];
                                gemm(dqb, nq, d, i1, mat(dp, i1, 1), mat(kh, d, 1), false)?;
                                gemm(&mut dk[..i1 * d], i1, d, nq, mat(dp, 1, i1), qb, true)?;
                            }
                        }
                        Ok(())
                    })?;
            }
            Ok((
                tensor_from_vec(dq, &qdims)?,
                tensor_from_vec(dk, &kdims)?,
                tensor_from_vec(dv, &kdims)?,
            ))
        })
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "peft-causal-attention"
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
            _ => bail!("causal_attention: fused op supports f32/f64 with matching dtypes"),
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
            dt => bail!("causal_attention: unsupported dtype {dt:?} in backward"),
        };
        Ok((
            q.track_op().then_some(dq),
            k.track_op().then_some(dk),
            v.track_op().then_some(dv),
        ))
    }
}
