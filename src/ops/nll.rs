//! Fused weighted NLL: Σ_i w_i · (logsumexp(logits_i) − logits_i[target_i]), no log-softmax
//! tensor materialised. Forward caches the per-row logsumexp so backward is a single exp pass.

use super::kernel::{contiguous_slice, max, rows_per_task, simd_fn, tensor_from_vec, Elem};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

pub(crate) struct WeightedNllOp {
    /// Per-row logsumexp from the forward pass (0 for zero-weight rows, which are skipped).
    lse: OnceLock<Vec<f64>>,
}

impl WeightedNllOp {
    pub(crate) fn new() -> Self {
        Self {
            lse: OnceLock::new(),
        }
    }
}

/// Validates logits [N, V], targets [N] (< V), weights [N]; returns (N, V).
pub(crate) fn check_dims(l: &[usize], t: &[usize], w: &[usize]) -> Result<(usize, usize)> {
    let [n, v] = l else {
        bail!("weighted_nll: logits must be [N, V], got {l:?}");
    };
    if t != [*n] || w != [*n] {
        bail!("weighted_nll: targets {t:?} and weights {w:?} must be [{n}]");
    }
    if *v == 0 {
        bail!("weighted_nll: empty vocabulary");
    }
    Ok((*n, *v))
}

fn check_targets(t: &[u32], v: usize) -> Result<()> {
    if let Some(bad) = t.iter().find(|&&x| x as usize >= v) {
        bail!("weighted_nll: target {bad} out of range for vocabulary {v}");
    }
    Ok(())
}

simd_fn! {
    // Returns Σ w·(lse − x[t]) for the rows of this chunk, filling `lse`.
    fn fwd_rows<T: Elem>(x: &[T], t: &[u32], w: &[T], lse: &mut [f64], v: usize) -> f64 {
        const L: usize = 16;
        let mut loss = 0.0f64;
        for (i, xr) in x.chunks_exact(v).enumerate() {
            if w[i] == T::ZERO {
                lse[i] = 0.0;
                continue;
            }
            let m = max(xr);
            let mut acc = [T::ZERO; L];
            let c = xr.chunks_exact(L);
            let mut s = c.remainder().iter().fold(T::ZERO, |s, xv| s + (*xv - m).vexp());
            for xc in c {
                for l in 0..L {
                    acc[l] += (xc[l] - m).vexp();
                }
            }
            s = acc.iter().fold(s, |s, a| s + *a);
            let l = m.to_f64() + s.to_f64().ln();
            lse[i] = l;
            loss += w[i].to_f64() * (l - xr[t[i] as usize].to_f64());
        }
        loss
    }
}

simd_fn! {
    // d = g·w·(exp(x − lse) − onehot(t)); zero-weight rows stay 0.
    fn bwd_rows<T: Elem>(x: &[T], t: &[u32], w: &[T], lse: &[f64], g: f64, d: &mut [T], v: usize) {
        for (i, (xr, dr)) in x.chunks_exact(v).zip(d.chunks_exact_mut(v)).enumerate() {
            if w[i] == T::ZERO {
                continue;
            }
            let coef = T::from_f64(g * w[i].to_f64());
            let l = T::from_f64(lse[i]);
            for (dv, xv) in dr.iter_mut().zip(xr) {
                *dv = coef * (*xv - l).vexp();
            }
            dr[t[i] as usize] -= coef;
        }
    }
}

impl WeightedNllOp {
    fn fwd<T: Elem>(&self, s: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
        let (n, v) = check_dims(s[0].1.dims(), s[1].1.dims(), s[2].1.dims())?;
        let x = contiguous_slice::<T>(s[0].0, s[0].1)?;
        let t = contiguous_slice::<u32>(s[1].0, s[1].1)?;
        let w = contiguous_slice::<T>(s[2].0, s[2].1)?;
        check_targets(t, v)?;
        let mut lse = vec![0f64; n];
        let rows = rows_per_task(n, v);
        let total: f64 = x
            .par_chunks(rows * v)
            .zip(t.par_chunks(rows))
            .zip(w.par_chunks(rows))
            .zip(lse.par_chunks_mut(rows))
            .map(|(((x, t), w), lse)| fwd_rows(x, t, w, lse, v))
            .collect::<Vec<f64>>()
            .into_iter()
            .sum();
        // A second forward through the same op instance keeps the first cache; the public
        // function always builds a fresh op, so this never happens in practice.
        let _ = self.lse.set(lse);
        Ok((
            T::to_cpu_storage_owned(vec![T::from_f64(total)]),
            Shape::from(()),
        ))
    }

    fn bwd_t<T: Elem>(&self, x: &Tensor, t: &Tensor, w: &Tensor, g: f64) -> Result<Tensor> {
        let (n, v) = check_dims(x.dims(), t.dims(), w.dims())?;
        let (x, t, w) = (x.contiguous()?, t.contiguous()?, w.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (ts, tl) = t.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ts), Storage::Cpu(ws)) = (&*xs, &*ts, &*ws) else {
            bail!("weighted_nll: expected CPU tensors in backward");
        };
        let (x, t, w) = (
            contiguous_slice::<T>(xs, xl)?,
            contiguous_slice::<u32>(ts, tl)?,
            contiguous_slice::<T>(ws, wl)?,
        );
        let lse = self.lse.get().filter(|l| l.len() == n).ok_or_else(|| {
            candle_core::Error::Msg("weighted_nll: backward before forward".into())
        })?;
        let mut d = vec![T::ZERO; n * v];
        let rows = rows_per_task(n, v);
        x.par_chunks(rows * v)
            .zip(t.par_chunks(rows))
            .zip(w.par_chunks(rows))
            .zip(lse.par_chunks(rows))
            .zip(d.par_chunks_mut(rows * v))
            .for_each(|((((x, t), w), lse), d)| bwd_rows(x, t, w, lse, g, d, v));
        tensor_from_vec(d, &[n, v])
    }
}

impl CustomOp3 for WeightedNllOp {
    fn name(&self) -> &'static str {
        "peft-weighted-nll"
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
            (CpuStorage::F32(_), CpuStorage::U32(_), CpuStorage::F32(_)) => self.fwd::<f32>(s),
            (CpuStorage::F64(_), CpuStorage::U32(_), CpuStorage::F64(_)) => self.fwd::<f64>(s),
            _ => bail!("weighted_nll: fused op wants f32/f64 logits and weights, u32 targets"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Weights are per-token constants and targets are integers: only logits get a grad.
        let g = g.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let d = match x.dtype() {
            DType::F32 => self.bwd_t::<f32>(x, t, w, g)?,
            DType::F64 => self.bwd_t::<f64>(x, t, w, g)?,
            dt => bail!("weighted_nll: unsupported dtype {dt:?} in backward"),
        };
        Ok((Some(d), None, None))
    }
}
