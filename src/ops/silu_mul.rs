//! Fused SwiGLU: y = silu(gate) ⊙ up.

use super::kernel::{
    contiguous_slice, output_buffer, simd_fn, tensor_from_vec, with_cpu_slices, Elem,
};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub(crate) struct SiluMulOp;

/// Elements per rayon task for flat elementwise work.
const CHUNK: usize = 32 * 1024;

#[inline(always)]
fn sigmoid<T: Elem>(g: T) -> T {
    T::ONE / (T::ONE + (T::ZERO - g).vexp())
}

simd_fn! {
    fn fwd_chunk<T: Elem>(g: &[T], u: &[T], y: &mut [T]) {
        for ((yv, gv), uv) in y.iter_mut().zip(g).zip(u) {
            *yv = *gv * sigmoid(*gv) * *uv;
        }
    }
}

simd_fn! {
    // d gate = dy·up·σ(g)·(1 + g·(1 − σ(g))), d up = dy·g·σ(g).
    fn bwd_chunk<T: Elem>(g: &[T], u: &[T], dy: &[T], dg: &mut [T], du: &mut [T]) {
        let n = g.len().min(u.len()).min(dy.len()).min(dg.len()).min(du.len());
        let (g, u, dy, dg, du) = (&g[..n], &u[..n], &dy[..n], &mut dg[..n], &mut du[..n]);
        for i in 0..n {
            let s = sigmoid(g[i]);
            let gs = g[i] * s;
            du[i] = dy[i] * gs;
            dg[i] = dy[i] * u[i] * (s + gs * (T::ONE - s));
        }
    }
}

fn fwd<T: Elem>(
    gs: &CpuStorage,
    gl: &Layout,
    us: &CpuStorage,
    ul: &Layout,
) -> Result<(CpuStorage, Shape)> {
    if gl.dims() != ul.dims() {
        bail!(
            "silu_mul: gate {:?} and up {:?} must have the same shape",
            gl.dims(),
            ul.dims()
        );
    }
    let g = contiguous_slice::<T>(gs, gl)?;
    let u = contiguous_slice::<T>(us, ul)?;
    // SAFETY: g and u have the same shape (checked above), so `forward_into` pairs every
    // element of `y` (g's length) with one of g and u and overwrites it.
    let mut y = unsafe { output_buffer(g.len()) };
    forward_into(g, u, &mut y);
    Ok((T::to_cpu_storage_owned(y), gl.shape().clone()))
}

/// `y = silu(g) ⊙ u` in parallel (slices of equal length; every element of `y` is overwritten).
pub(crate) fn forward_into<T: Elem>(g: &[T], u: &[T], y: &mut [T]) {
    g.par_chunks(CHUNK)
        .zip(u.par_chunks(CHUNK))
        .zip(y.par_chunks_mut(CHUNK))
        .for_each(|((g, u), y)| fwd_chunk(g, u, y));
}

/// Gradients of `silu(g) ⊙ u` for the output gradient `dy`, written into `dg` and `du` (all
/// five slices of equal length; every element of `dg` and `du` is overwritten).
pub(crate) fn backward_into<T: Elem>(g: &[T], u: &[T], dy: &[T], dg: &mut [T], du: &mut [T]) {
    g.par_chunks(CHUNK)
        .zip(u.par_chunks(CHUNK))
        .zip(dy.par_chunks(CHUNK))
        .zip(dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)))
        .for_each(|(((g, u), dy), (dg, du))| bwd_chunk(g, u, dy, dg, du));
}

fn bwd<T: Elem>(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let dims = g.dims().to_vec();
    with_cpu_slices::<T, _>(&[g, u, dy], |s| {
        let (g, u, dy) = (s[0], s[1], s[2]);
        // SAFETY: u has g's shape (checked in forward) and dy too (the gradient of this op's
        // output), so `backward_into` overwrites every element of `dg` and `du` (g's length).
        let (mut dg, mut du) = unsafe { (output_buffer(g.len()), output_buffer(g.len())) };
        backward_into(g, u, dy, &mut dg, &mut du);
        Ok((tensor_from_vec(dg, &dims)?, tensor_from_vec(du, &dims)?))
    })
}

impl CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "peft-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => fwd::<f32>(s1, l1, s2, l2),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => fwd::<f64>(s1, l1, s2, l2),
            _ => bail!("silu_mul: fused op supports f32/f64 with matching dtypes"),
        }
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // One pass computes both; only hand back grads for inputs that can reach a Var.
        let (dg, du) = match gate.dtype() {
            candle_core::DType::F32 => bwd::<f32>(gate, up, dy)?,
            candle_core::DType::F64 => bwd::<f64>(gate, up, dy)?,
            dt => bail!("silu_mul: unsupported dtype {dt:?} in backward"),
        };
        Ok((gate.track_op().then_some(dg), up.track_op().then_some(du)))
    }
}
