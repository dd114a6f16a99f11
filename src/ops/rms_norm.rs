//! Fused RMS norm: y = x · rsqrt(mean(x²) + eps) · w over the last dim.

use super::kernel::{
    contiguous_slice, dot, output_buffer, rows_per_task, simd_fn, tensor_from_vec, with_cpu_slices,
    Elem,
};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub(crate) struct RmsNormOp {
    pub eps: f64,
}

#[inline(always)]
fn rinv<T: Elem>(x: &[T], eps: f64) -> T {
    let ms = dot(x, x).to_f64() / x.len() as f64;
    T::from_f64(1.0 / (ms + eps).sqrt())
}

simd_fn! {
    fn fwd_rows<T: Elem>(x: &[T], w: &[T], y: &mut [T], eps: f64) {
        let h = w.len();
        for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
            let r = rinv(xr, eps);
            for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                *yv = *xv * r * *wv;
            }
        }
    }
}

simd_fn! {
    // dx = r·(g⊙w − x̂·mean(g⊙w⊙x̂)), x̂ = x·r; accumulates dw += g⊙x̂ when asked.
    fn bwd_rows<T: Elem>(x: &[T], w: &[T], g: &[T], dx: &mut [T], dw: Option<&mut [T]>, eps: f64) {
        let h = w.len();
        let hf = T::from_f64(h as f64);
        let mut dw = dw;
        for ((xr, gr), dxr) in x.chunks_exact(h).zip(g.chunks_exact(h)).zip(dx.chunks_exact_mut(h)) {
            let r = rinv(xr, eps);
            // Σ g·w·x (then ·r for x̂); dxr is scratch for g·w.
            for ((d, gv), wv) in dxr.iter_mut().zip(gr).zip(w) {
                *d = *gv * *wv;
            }
            let c = dot(dxr, xr) * r * r / hf;
            for (d, xv) in dxr.iter_mut().zip(xr) {
                *d = r * (*d - *xv * c);
            }
            if let Some(dw) = dw.as_deref_mut() {
                for ((a, gv), xv) in dw.iter_mut().zip(gr).zip(xr) {
                    *a += *gv * *xv * r;
                }
            }
        }
    }
}

fn check(xl: &Layout, wl: &Layout) -> Result<usize> {
    let h = *xl.dims().last().unwrap_or(&0);
    if wl.dims() != [h] {
        bail!(
            "rms_norm: weight shape {:?} does not match last dim of x {:?}",
            wl.dims(),
            xl.dims()
        );
    }
    Ok(h)
}

fn fwd<T: Elem>(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    check(xl, wl)?;
    let x = contiguous_slice::<T>(xs, xl)?;
    let w = contiguous_slice::<T>(ws, wl)?;
    // SAFETY: `check` made `w.len()` the last dim of x, so `x.len()` is a whole number of rows
    // and `forward_into` overwrites all of `y` (same length as x) before it is returned.
    let mut y = unsafe { output_buffer(x.len()) };
    forward_into(x, w, &mut y, eps);
    Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
}

/// `y = rms_norm(x) ⊙ w` over rows of `w.len()` elements, in parallel (slices of equal length).
/// Overwrites every element of `y` when `x.len() == y.len()` is a multiple of `w.len()`.
pub(crate) fn forward_into<T: Elem>(x: &[T], w: &[T], y: &mut [T], eps: f64) {
    if let Some(n_rows) = x.len().checked_div(w.len()) {
        let rows = rows_per_task(n_rows, w.len()) * w.len();
        x.par_chunks(rows)
            .zip(y.par_chunks_mut(rows))
            .for_each(|(x, y)| fwd_rows(x, w, y, eps));
    }
}

/// `dx` (overwritten) for the output gradient `g`, the weight taken as constant. Overwrites
/// every element of `dx` when `x`, `g` and `dx` have the same length, a multiple of `w.len()`.
pub(crate) fn backward_into<T: Elem>(x: &[T], w: &[T], g: &[T], dx: &mut [T], eps: f64) {
    if let Some(n_rows) = x.len().checked_div(w.len()) {
        let rows = rows_per_task(n_rows, w.len()) * w.len();
        x.par_chunks(rows)
            .zip(g.par_chunks(rows))
            .zip(dx.par_chunks_mut(rows))
            .for_each(|((x, g), dx)| bwd_rows(x, w, g, dx, None, eps));
    }
}

fn bwd<T: Elem>(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    want_dw: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dims = x.dims().to_vec();
    let h = *dims.last().unwrap_or(&0);
    with_cpu_slices::<T, _>(&[x, w, g], |s| {
        let (x, w, g) = (s[0], s[1], s[2]);
        // SAFETY: w is x's last dim `h` (checked in forward) and g has x's shape (the gradient
        // of this op's output), so both branches below overwrite every row of `dx`:
        // `backward_into`, or `bwd_rows` over chunks of `dx` that pair one to one with x's
        // (its first loop writes each element). With `h = 0`, x and `dx` are empty.
        let mut dx = unsafe { output_buffer(x.len()) };
        let mut dw = None;
        if !want_dw {
            backward_into(x, w, g, &mut dx, eps);
        } else if let Some(n_rows) = x.len().checked_div(h) {
            let rows = rows_per_task(n_rows, h) * h;
            // Per-task partial dw, summed afterwards (deterministic order).
            let parts: Vec<Vec<T>> = x
                .par_chunks(rows)
                .zip(g.par_chunks(rows))
                .zip(dx.par_chunks_mut(rows))
                .map(|((x, g), dx)| {
                    let mut acc = vec![T::ZERO; h];
                    bwd_rows(x, w, g, dx, Some(&mut acc), eps);
                    acc
                })
                .collect();
            let mut total = vec![T::ZERO; h];
            for p in parts {
                for (t, v) in total.iter_mut().zip(p) {
                    *t += v;
                }
            }
            dw = Some(tensor_from_vec(total, &[h])?);
        } else {
            dw = Some(tensor_from_vec(Vec::<T>::new(), &[0])?);
        }
        Ok((tensor_from_vec(dx, &dims)?, dw))
    })
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "peft-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => fwd::<f32>(s1, l1, s2, l2, self.eps),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => fwd::<f64>(s1, l1, s2, l2, self.eps),
            _ => bail!("rms_norm: fused op supports f32/f64 with matching dtypes"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Only differentiate w.r.t. what can reach a Var: a frozen weight gets no gradient
        // (saves the reduction and the stored tensor).
        let want_dw = w.track_op();
        let (dx, dw) = match x.dtype() {
            candle_core::DType::F32 => bwd::<f32>(x, w, g, self.eps, want_dw)?,
            candle_core::DType::F64 => bwd::<f64>(x, w, g, self.eps, want_dw)?,
            dt => bail!("rms_norm: unsupported dtype {dt:?} in backward"),
        };
        Ok((Some(dx), dw))
    }
}
