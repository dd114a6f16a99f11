//! Fused HF-style (rotate_half, non-interleaved) rotary embedding on [B, H, T, D].

use super::kernel::{
    contiguous_slice, output_buffer, simd_fn, tensor_from_vec, with_cpu_slices, Elem,
};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub(crate) struct RopeOp;

simd_fn! {
    // Rotates the rows of x (row stride xs) into the rows of y (row stride ys), one row of D
    // per row of cos/sin ([rows, D/2]). `inverse` rotates by −θ (the backward pass).
    pub(crate) fn rotate<T: Elem>(x: &[T], xs: usize, y: &mut [T], ys: usize, tables: (&[T], &[T]), d: usize, inverse: bool) {
        let ((cos, sin), half) = (tables, d / 2);
        if half == 0 {
            return;
        }
        for (t, (c, s)) in cos.chunks_exact(half).zip(sin.chunks_exact(half)).enumerate() {
            let (x1, x2) = x[t * xs..t * xs + d].split_at(half);
            let (y1, y2) = y[t * ys..t * ys + d].split_at_mut(half);
            if inverse {
                for i in 0..half {
                    y1[i] = x1[i] * c[i] + x2[i] * s[i];
                    y2[i] = x2[i] * c[i] - x1[i] * s[i];
                }
            } else {
                for i in 0..half {
                    y1[i] = x1[i] * c[i] - x2[i] * s[i];
                    y2[i] = x2[i] * c[i] + x1[i] * s[i];
                }
            }
        }
    }
}

/// Checks x [B, H, T, D] against cos/sin [T' ≥ T, D/2]; returns (T, D).
pub(crate) fn check_dims(x: &[usize], cos: &[usize], sin: &[usize]) -> Result<(usize, usize)> {
    let [_, _, t, d] = x else {
        bail!("rope: x must be [B, H, T, D], got {x:?}");
    };
    let (t, d) = (*t, *d);
    if d % 2 != 0 {
        bail!("rope: head dim {d} must be even");
    }
    for (name, c) in [("cos", cos), ("sin", sin)] {
        if c.len() != 2 || c[1] != d / 2 || c[0] < t {
            bail!("rope: {name} must be [>= {t}, {}], got {c:?}", d / 2);
        }
    }
    Ok((t, d))
}

/// `x` rotated (`inverse`: by −θ); `x` is `[B, H, T, D]` and `cos`/`sin` hold at least T rows
/// of D/2, as [`check_dims`] ensures.
fn apply<T: Elem>(x: &[T], cos: &[T], sin: &[T], t: usize, d: usize, inverse: bool) -> Vec<T> {
    // SAFETY: `x.len()` is a whole number of [T, D] blocks (x is [B, H, T, D]); y chunks like
    // x, and `rotate` writes all D elements of each of a block's T rows (the tables are cut to
    // exactly T rows below). With T·D = 0, x and y are empty.
    let mut y = unsafe { output_buffer(x.len()) };
    let block = t * d;
    if let Some(n_blocks) = x.len().checked_div(block) {
        // (b, h) blocks are independent; group small ones so tasks stay ≥ ~16K elements.
        let per = super::kernel::rows_per_task(n_blocks, block) * block;
        let (cos, sin) = (&cos[..t * d / 2], &sin[..t * d / 2]);
        x.par_chunks(per)
            .zip(y.par_chunks_mut(per))
            .for_each(|(x, y)| {
                for (xb, yb) in x.chunks_exact(block).zip(y.chunks_exact_mut(block)) {
                    rotate(xb, d, yb, d, (cos, sin), d, inverse);
                }
            });
    }
    y
}

fn fwd<T: Elem>(s: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    let (t, d) = check_dims(s[0].1.dims(), s[1].1.dims(), s[2].1.dims())?;
    let x = contiguous_slice::<T>(s[0].0, s[0].1)?;
    let cos = contiguous_slice::<T>(s[1].0, s[1].1)?;
    let sin = contiguous_slice::<T>(s[2].0, s[2].1)?;
    let y = apply(x, cos, sin, t, d, false);
    Ok((T::to_cpu_storage_owned(y), s[0].1.shape().clone()))
}

fn bwd<T: Elem>(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (t, d) = check_dims(g.dims(), cos.dims(), sin.dims())?;
    with_cpu_slices::<T, _>(&[g, cos, sin], |s| {
        tensor_from_vec(apply(s[0], s[1], s[2], t, d, true), g.dims())
    })
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "peft-rope"
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
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => fwd::<f32>(s),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => fwd::<f64>(s),
            _ => bail!("rope: fused op supports f32/f64 with matching dtypes"),
        }
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // cos/sin are position tables (constants): no gradient for them.
        let dx = match g.dtype() {
            candle_core::DType::F32 => bwd::<f32>(g, cos, sin)?,
            candle_core::DType::F64 => bwd::<f64>(g, cos, sin)?,
            dt => bail!("rope: unsupported dtype {dt:?} in backward"),
        };
        Ok((Some(dx), None, None))
    }
}
