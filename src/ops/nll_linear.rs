//! Fused output projection + weighted NLL: Σ_i w_i · (logsumexp(h_i·Wᵀ) − h_i·W[t_i]).
//!
//! The [N, V] logits never become a candle tensor. Because dL/dlogits = g · w_i ·
//! (softmax − onehot) is linear in the incoming scalar g, the forward pass computes
//! dL/dh / g = w ⊙ (softmax − onehot) · W block by block (while the logits block is hot) and
//! backward only scales it: no stored logits, no [N, V] gradient, and no dW product for the
//! frozen projection.

use super::gemm::{weight_product, WeightData};
use super::kernel::{
    contiguous_slice, exp_shifted_in_place, max, output_buffer, simd_fn, sum_exp_shifted,
    tensor_from_vec, with_scratch, Elem,
};
use super::wgemm::PackCache;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows per block: 512 × V logits of scratch (100 MB at V = 49152, f32). Large blocks matter:
/// each gemm call packs the whole [V, H] weight, so small blocks re-pack it many times
/// (576 × 49152 products: 191 GFLOP/s at 256 rows, 205 at 512, 208 at 1024).
const ROWS: usize = 512;

pub(crate) struct NllLinearOp {
    pub targets: Vec<u32>,
    pub weights: Vec<f64>,
    /// Precompute dL/dh (only when `hidden` can reach a Var).
    pub need_grad: bool,
    /// dL/dh for an incoming gradient of 1, [N, H].
    grad: OnceLock<Tensor>,
    /// The weight's kept packed panels (bf16 weights as stored).
    cache: Option<PackCache>,
}

impl NllLinearOp {
    pub(crate) fn new(
        targets: Vec<u32>,
        weights: Vec<f64>,
        need_grad: bool,
        cache: Option<PackCache>,
    ) -> Self {
        Self {
            targets,
            weights,
            need_grad,
            grad: OnceLock::new(),
            cache,
        }
    }
}

/// hidden [N, H], weight [V, H]; returns (N, H, V).
pub(crate) fn check_dims(
    h: &[usize],
    w: &[usize],
    n_targets: usize,
) -> Result<(usize, usize, usize)> {
    let ([n, hd], [v, wh]) = (h, w) else {
        bail!("weighted_nll_linear: hidden must be [N, H] and weight [V, H], got {h:?}, {w:?}");
    };
    if hd != wh || *v == 0 || *n != n_targets {
        bail!(
            "weighted_nll_linear: hidden {h:?}, weight {w:?}, {n_targets} targets are incompatible"
        );
    }
    Ok((*n, *hd, *v))
}

simd_fn! {
    // Per row: loss term, and (if `grad`) the row turned into w·(softmax − onehot) in place.
    fn rows_loss<T: Elem>(logits: &mut [T], t: &[u32], w: &[f64], v: usize, grad: bool) -> f64 {
        let mut loss = 0.0;
        for (i, row) in logits.chunks_exact_mut(v).enumerate() {
            if w[i] == 0.0 {
                row.fill(T::ZERO);
                continue;
            }
            let m = max(row);
            let target = row[t[i] as usize].to_f64();
            let s = if grad {
                exp_shifted_in_place(row, m)
            } else {
                sum_exp_shifted(row, m)
            };
            loss += w[i] * (m.to_f64() + s.to_f64().ln() - target);
            if grad {
                let c = T::from_f64(w[i]) / s;
                for x in row.iter_mut() {
                    *x *= c;
                }
                row[t[i] as usize] -= T::from_f64(w[i]);
            }
        }
        loss
    }
}

impl NllLinearOp {
    fn fwd<T: Elem>(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, hd, v) = check_dims(hl.dims(), wl.dims(), self.targets.len())?;
        if self.weights.len() != n {
            bail!(
                "weighted_nll_linear: {} weights for {n} rows",
                self.weights.len()
            );
        }
        if let Some(bad) = self.targets.iter().find(|&&t| t as usize >= v) {
            bail!("weighted_nll_linear: target {bad} out of range for vocabulary {v}");
        }
        let h = contiguous_slice::<T>(hs, hl)?;
        let w = match ws {
            CpuStorage::BF16(_) => WeightData::Bf16(contiguous_slice::<half::bf16>(ws, wl)?),
            _ => WeightData::Same(contiguous_slice::<T>(ws, wl)?),
        };
        let need_grad = self.need_grad;
        let cache = self.cache.as_ref();
        // SAFETY: `dh` is written before it is read: with `need_grad` each block of `m` rows
        // overwrites its rows (a weight product without accumulation, [m, H]), and the blocks
        // cover all `n` rows before `dh` is stored.
        let mut dh = unsafe { output_buffer(if need_grad { n * hd } else { 0 }) };
        // Row blocks in sequence; the gemms and the per-row softmax are parallel inside.
        let blocks = |logits: &mut [T]| -> Result<f64> {
            let mut total = 0.0f64;
            for r0 in (0..n).step_by(ROWS) {
                let m = ROWS.min(n - r0);
                let lg = &mut logits[..m * v];
                // logits = h_blk · Wᵀ
                let h_blk = &h[r0 * hd..(r0 + m) * hd];
                weight_product(lg, h_blk, m, w, cache, v, hd, true, false)?;
                let (t, wt) = (&self.targets[r0..r0 + m], &self.weights[r0..r0 + m]);
                let per = super::kernel::rows_per_task(m, v);
                total += lg
                    .par_chunks_mut(per * v)
                    .zip(t.par_chunks(per).zip(wt.par_chunks(per)))
                    .map(|(lg, (t, wt))| rows_loss(lg, t, wt, v, need_grad))
                    .sum::<f64>();
                if need_grad {
                    // dh_blk = (w ⊙ (softmax − onehot)) · W
                    let dh = &mut dh[r0 * hd..(r0 + m) * hd];
                    weight_product(dh, lg, m, w, cache, v, hd, false, false)?;
                }
            }
            Ok(total)
        };
        // SAFETY: each block first overwrites `logits[..m·v]` (a weight product without
        // accumulation, [m, V]) and reads only that.
        let total = unsafe { with_scratch(ROWS.min(n) * v, blocks) }?;
        if need_grad {
            let _ = self.grad.set(tensor_from_vec(dh, &[n, hd])?);
        }
        Ok((
            T::to_cpu_storage_owned(vec![T::from_f64(total)]),
            Shape::from(()),
        ))
    }
}

/// `−log softmax(h_i·Wᵀ)[t_i]` for every row, without gradient (evaluation): the same
/// block-wise logits as the training op, but one value per row instead of a weighted sum.
pub(crate) fn row_nll<T: Elem>(
    h: &[T],
    w: WeightData<'_, T>,
    targets: &[u32],
    hd: usize,
    v: usize,
    cache: Option<&PackCache>,
) -> Result<Vec<f64>> {
    let n = targets.len();
    if h.len() != n * hd || w.len() != v * hd {
        bail!("row_nll: hidden, weight and targets do not fit");
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("row_nll: target {bad} out of range for vocabulary {v}");
    }
    let mut out = vec![0.0; n];
    let blocks = |logits: &mut [T]| -> Result<()> {
        for r0 in (0..n).step_by(ROWS) {
            let m = ROWS.min(n - r0);
            let lg = &mut logits[..m * v];
            let h_blk = &h[r0 * hd..(r0 + m) * hd];
            weight_product(lg, h_blk, m, w, cache, v, hd, true, false)?;
            lg.par_chunks_mut(v)
                .zip(targets[r0..r0 + m].par_iter())
                .zip(out[r0..r0 + m].par_iter_mut())
                .for_each(|((row, t), o)| {
                    *o = rows_loss(row, std::slice::from_ref(t), &[1.0], v, false)
                });
        }
        Ok(())
    };
    // SAFETY: each block of `m` rows overwrites `logits[..m·v]` (a weight product without
    // accumulation, [m, V]) and reads only that.
    unsafe { with_scratch(ROWS.min(n) * v, blocks) }?;
    Ok(out)
}

impl CustomOp2 for NllLinearOp {
    fn name(&self) -> &'static str {
        "peft-weighted-nll-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_) | CpuStorage::BF16(_)) => {
                self.fwd::<f32>(s1, l1, s2, l2)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => self.fwd::<f64>(s1, l1, s2, l2),
            _ => bail!("weighted_nll_linear: fused op supports f32/f64 with matching dtypes"),
        }
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The public function only takes this path for a weight that cannot reach a Var.
        let dh = self.grad.get().ok_or_else(|| {
            candle_core::Error::Msg("weighted_nll_linear: no precomputed gradient".into())
        })?;
        let g = g.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        Ok((Some(dh.affine(g, 0.0)?), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, D};
    use rand::{Rng, SeedableRng};

    /// Seeded uniform values with standard deviation `std` (candle's CPU randn can't be seeded,
    /// and the bf16/f16 tolerances below must hold for the data every run, not most runs).
    fn seeded(dims: (usize, usize), std: f32, seed: u64) -> candle_core::Result<Tensor> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let half_width = std * 3f32.sqrt();
        let data: Vec<f32> = (0..dims.0 * dims.1)
            .map(|_| rng.random_range(-half_width..half_width))
            .collect();
        Tensor::from_vec(data, dims, &Device::Cpu)
    }

    #[test]
    fn row_nll_matches_log_softmax_in_f32_and_fallback_dtypes() -> candle_core::Result<()> {
        let (n, hd, v) = (300, 24, 517); // more rows than one block, odd vocabulary
        let h = seeded((n, hd), 1.0, 1)?;
        let w = seeded((v, hd), 0.5, 2)?;
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37) % v as u32).collect();
        let logp = candle_nn::ops::log_softmax(&h.matmul(&w.t()?)?, D::Minus1)?;
        let t = Tensor::from_slice(&targets, n, &Device::Cpu)?.unsqueeze(1)?;
        let expected: Vec<f32> = logp.gather(&t, 1)?.squeeze(1)?.to_vec1()?;
        for dtype in [DType::F32, DType::F16] {
            let got = super::super::row_nll_linear(
                &h.to_dtype(dtype)?,
                &w.to_dtype(dtype)?,
                &targets,
                None,
            )?;
            let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    (g + *e as f64).abs() < tol,
                    "{dtype:?} row {i}: {g} vs {}",
                    -e
                );
            }
        }
        // A bf16 weight under f32 hidden states (a bf16 base): multiplied as stored.
        let w16 = w.to_dtype(DType::BF16)?;
        let got = super::super::row_nll_linear(&h, &w16, &targets, None)?;
        // With the weight's kept panels: the same bits, first use and after.
        let cache = super::PackCache::default();
        for pass in ["first", "kept"] {
            let kept = super::super::row_nll_linear(&h, &w16, &targets, Some(&cache))?;
            assert_eq!(kept, got, "{pass} use of the pack cache");
        }
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            // bf16 keeps 8 bits of mantissa (of h and of the weight): ~0.2% of the value.
            let tol = 5e-3 * (1.0 + e.abs() as f64);
            assert!(
                (g + *e as f64).abs() < tol,
                "bf16 weight row {i}: {g} vs {}",
                -e
            );
        }
        let err = super::super::row_nll_linear(&h, &w, &[v as u32; 300], None).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        Ok(())
    }
}
