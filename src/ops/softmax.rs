//! Fused softmax over the last dim, with backward dx = y ⊙ (g − Σ g⊙y).

use super::kernel::{
    contiguous_slice, dot, max, rows_per_task, simd_fn, sum, tensor_from_vec, with_cpu_slices, Elem,
};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub(crate) struct SoftmaxOp;

simd_fn! {
    fn fwd_rows<T: Elem>(x: &[T], y: &mut [T], n: usize) {
        for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let m = max(xr);
            for (yv, xv) in yr.iter_mut().zip(xr) {
                *yv = (*xv - m).vexp();
            }
            let inv = T::ONE / sum(yr);
            for yv in yr.iter_mut() {
                *yv *= inv;
            }
        }
    }
}

simd_fn! {
    fn bwd_rows<T: Elem>(y: &[T], g: &[T], dx: &mut [T], n: usize) {
        for ((yr, gr), dr) in y.chunks_exact(n).zip(g.chunks_exact(n)).zip(dx.chunks_exact_mut(n)) {
            let s = dot(yr, gr);
            for ((d, yv), gv) in dr.iter_mut().zip(yr).zip(gr) {
                *d = *yv * (*gv - s);
            }
        }
    }
}

fn last_dim(dims: &[usize]) -> Result<usize> {
    match dims.last() {
        Some(&n) if n > 0 => Ok(n),
        _ => bail!("softmax_last_dim: needs a non-empty last dim, got {dims:?}"),
    }
}

fn fwd<T: Elem>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let n = last_dim(l.dims())?;
    let x = contiguous_slice::<T>(s, l)?;
    let mut y = vec![T::ZERO; x.len()];
    let rows = rows_per_task(x.len() / n, n) * n;
    x.par_chunks(rows)
        .zip(y.par_chunks_mut(rows))
        .for_each(|(x, y)| fwd_rows(x, y, n));
    Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
}

fn bwd<T: Elem>(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let n = last_dim(y.dims())?;
    let dims = y.dims().to_vec();
    with_cpu_slices::<T, _>(&[y, g], |s| {
        let (y, g) = (s[0], s[1]);
        let mut dx = vec![T::ZERO; y.len()];
        let rows = rows_per_task(y.len() / n, n) * n;
        y.par_chunks(rows)
            .zip(g.par_chunks(rows))
            .zip(dx.par_chunks_mut(rows))
            .for_each(|((y, g), dx)| bwd_rows(y, g, dx, n));
        tensor_from_vec(dx, &dims)
    })
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "peft-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(_) => fwd::<f32>(s, l),
            CpuStorage::F64(_) => fwd::<f64>(s, l),
            _ => bail!("softmax_last_dim: fused op supports f32/f64"),
        }
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dx = match y.dtype() {
            candle_core::DType::F32 => bwd::<f32>(y, g)?,
            candle_core::DType::F64 => bwd::<f64>(y, g)?,
            dt => bail!("softmax_last_dim: unsupported dtype {dt:?} in backward"),
        };
        Ok(Some(dx))
    }
}
