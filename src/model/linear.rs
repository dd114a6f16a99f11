//! A LoRA-adapted frozen linear layer as ONE autograd node:
//! `y = x·Wᵀ + bias + scale · ((x ⊙ mask)·Aᵀ)·Bᵀ`.
//!
//! Composed from candle ops this is ~11 graph nodes (reshapes, transposes, three matmuls, a
//! scale, an add), and candle's backward pays a `zeros_like` + `add` of a full-size gradient at
//! every node, and keeps the base output, the delta and their sum alive until backward. The
//! fused CPU op keeps only `y` (plus the rank-r `x·Aᵀ`), accumulates the low-rank product
//! straight into `y` inside the gemm, and in backward computes `dx` (skipped when `x` cannot
//! reach a trainable variable, e.g. below the lowest adapted layer), `dA` and `dB` with four
//! gemms. Other devices and dtypes take the composed path.

use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, Var};

use super::dropout::DropoutMask;
use super::frozen::FrozenWeight;
use crate::ops::gemm::{gemm, View};
use crate::ops::kernel::{contiguous_slice, output_buffer, tensor_from_vec, with_cpu_slices, Elem};
use crate::Result;

/// One trainable pair: `A: [r, in]`, `B: [out, r]`, applied as `scale · B·A·x`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

impl LoraPair {
    /// `scale · (x·Aᵀ)·Bᵀ` for `x: [..., in]`. The scale is applied to the rank-r intermediate,
    /// and `x` is flattened to 2-D, so no full-width elementwise op or broadcast-sum is added.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        self.delta_through(self.a.as_tensor(), self.b.as_tensor(), x)
    }

    /// [`Self::delta`] through the factors' values alone: no gradient reaches A or B, and an
    /// `x` outside any graph gives a result outside it too.
    pub fn delta_no_grad(&self, x: &Tensor) -> Result<Tensor> {
        self.delta_through(
            &self.a.as_detached_tensor(),
            &self.b.as_detached_tensor(),
            x,
        )
    }

    fn delta_through(&self, a: &Tensor, b: &Tensor, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let (lead, last) = dims.split_at(dims.len() - 1);
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, last[0]))?;
        let low = (x2.matmul(&a.t()?)? * self.scale)?;
        let out = low.matmul(&b.t()?)?;
        let mut out_dims = lead.to_vec();
        out_dims.push(out.dim(1)?);
        Ok(out.reshape(out_dims)?)
    }

    pub fn rank(&self) -> Result<usize> {
        Ok(self.a.as_tensor().dim(0)?)
    }
}

/// `x·Wᵀ (+ bias) + scale·((x ⊙ dropout_mask)·Aᵀ)·Bᵀ` for `x: [..., in]`.
///
/// `dropout` applies to the LoRA branch only, as PEFT's `lora_dropout`. Gradients: to `x` and
/// to the pair's A and B.
pub fn lora_linear(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    pair: &LoraPair,
    dropout: Option<DropoutMask>,
) -> Result<Tensor> {
    let (a, b) = (pair.a.as_tensor(), pair.b.as_tensor());
    let dtype = x.dtype();
    let fusable = x.device().is_cpu()
        && matches!(dtype, DType::F32 | DType::F64)
        && [a, b]
            .iter()
            .all(|t| t.dtype() == dtype && t.device().is_cpu())
        && bias.is_none_or(|t| t.dtype() == dtype && t.device().is_cpu());
    if !fusable {
        return composed(x, weight, bias, pair, dropout);
    }
    let op = LoraLinearOp {
        weight: weight.clone(),
        bias: bias.cloned(),
        scale: pair.scale,
        mask: dropout,
        low: OnceLock::new(),
    };
    Ok(x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?)
}

/// The same function from candle ops (any device and dtype; the reference in tests).
fn composed(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    pair: &LoraPair,
    dropout: Option<DropoutMask>,
) -> Result<Tensor> {
    let mut y = weight.forward(x)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(bias)?;
    }
    let input = match dropout {
        Some(mask) => {
            let factors = (0..x.elem_count()).map(|i| mask.factor(i)).collect();
            let mask = Tensor::from_vec(factors, x.shape(), x.device())?.to_dtype(x.dtype())?;
            (x * mask)?
        }
        None => x.clone(),
    };
    Ok((y + pair.delta(&input)?)?)
}

struct LoraLinearOp {
    weight: FrozenWeight,
    bias: Option<Tensor>,
    scale: f64,
    mask: Option<DropoutMask>,
    /// `(x ⊙ mask)·Aᵀ` (`[rows, r]`) from the forward pass: backward needs it for dB.
    low: OnceLock<Tensor>,
}

/// Shapes of one call: `rows × k` input, rank `r`, `n` outputs.
struct Dims {
    rows: usize,
    k: usize,
    r: usize,
    n: usize,
}

impl LoraLinearOp {
    fn dims(&self, x: &[usize], a: &[usize], b: &[usize]) -> candle_core::Result<Dims> {
        let (Some(&k), [r, ka], [n, rb]) = (x.last(), a, b) else {
            bail!("lora_linear: x {x:?}, A {a:?}, B {b:?} must be [.., in], [r, in], [out, r]");
        };
        let (wn, wk) = self
            .weight
            .dims()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if *ka != k || rb != r || wk != k || wn != *n {
            bail!("lora_linear: x {x:?}, A {a:?}, B {b:?} do not fit a [{wn}, {wk}] weight");
        }
        if let Some(bias) = &self.bias {
            if bias.dims() != [*n] {
                bail!("lora_linear: bias {:?} for {n} outputs", bias.dims());
            }
        }
        let rows = x[..x.len() - 1].iter().product();
        Ok(Dims {
            rows,
            k,
            r: *r,
            n: *n,
        })
    }

    fn branch<'a, T: Elem>(&self, a: &'a [T], b: &'a [T], r: usize) -> Branch<'a, T> {
        Branch {
            a,
            b,
            r,
            scale: self.scale,
            mask: self.mask,
        }
    }

    /// Forward on CPU storages `[(x), (A), (B)]`.
    fn fwd<T: Elem>(
        &self,
        [(xs, xl), (a_s, al), (bs, bl)]: [(&CpuStorage, &Layout); 3],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Dims { rows, k, r, n } = self.dims(xl.dims(), al.dims(), bl.dims())?;
        let x = contiguous_slice::<T>(xs, xl)?;
        let a = contiguous_slice::<T>(a_s, al)?;
        let b = contiguous_slice::<T>(bs, bl)?;
        // Filled with the bias, or left for the base product to overwrite.
        // SAFETY: every element is written before it is read: the bias (checked `[n]` in
        // `dims`) fills every row, or `cpu_product` without accumulation overwrites the whole
        // [rows, n] product; the branch then accumulates.
        let mut y = unsafe { output_buffer(rows * n) };
        let has_bias = match &self.bias {
            Some(bias) => {
                let bias = bias.to_vec1::<T>()?;
                y.chunks_exact_mut(n)
                    .for_each(|row| row.copy_from_slice(&bias));
                true
            }
            None => false,
        };
        self.weight.cpu_product(&mut y, x, rows, true, has_bias)?;
        let low = self.branch(a, b, r).forward(&mut y, x, rows, k, n)?;
        let _ = self.low.set(tensor_from_vec(low, &[rows, r])?);
        let mut out_dims = xl.dims().to_vec();
        *out_dims.last_mut().expect("checked non-empty") = n;
        Ok((T::to_cpu_storage_owned(y), Shape::from(out_dims)))
    }

    fn bwd_t<T: Elem>(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Dims { rows, k, r, n } = self.dims(x.dims(), a.dims(), b.dims())?;
        let low = self.low.get().ok_or_else(|| {
            candle_core::Error::Msg("lora_linear: backward before forward".into())
        })?;
        let need_dx = x.track_op();
        with_cpu_slices::<T, _>(&[x, a, b, dy, low], |s| {
            let (x, a, b, dy, low) = (s[0], s[1], s[2], s[3], s[4]);
            // SAFETY: `Branch::backward` overwrites dA ([r, k]) and dB ([n, r]) whole, by
            // gemms without accumulation, before anything reads them.
            let (mut da, mut db) = unsafe { (output_buffer(r * k), output_buffer(n * r)) };
            let dx = match need_dx {
                false => None,
                true => {
                    // dx = dy·W, then the branch adds its part.
                    // SAFETY: `cpu_product` without accumulation overwrites the whole
                    // [rows, k] product `dy·W` before the branch accumulates into it.
                    let mut dx = unsafe { output_buffer(rows * k) };
                    self.weight.cpu_product(&mut dx, dy, rows, false, false)?;
                    Some(dx)
                }
            };
            let mut dx = dx;
            self.branch(a, b, r).backward(
                dy,
                x,
                low,
                rows,
                k,
                n,
                &mut da,
                &mut db,
                dx.as_deref_mut(),
            )?;
            Ok((
                dx.map(|dx| tensor_from_vec(dx, &[rows, k])).transpose()?,
                Some(tensor_from_vec(da, &[r, k])?),
                Some(tensor_from_vec(db, &[n, r])?),
            ))
        })
        .and_then(|(dx, da, db)| {
            let dx = dx.map(|t| t.reshape(x.dims())).transpose()?;
            Ok((dx, da, db))
        })
    }
}

/// One LoRA branch on CPU slices, `scale · ((x ⊙ mask)·Aᵀ)·Bᵀ` with `A: [r, k]`, `B: [n, r]`
/// row-major: the shared arithmetic of [`lora_linear`]'s op and the fused decoder block.
pub(crate) struct Branch<'a, T> {
    pub a: &'a [T],
    pub b: &'a [T],
    pub r: usize,
    pub scale: f64,
    pub mask: Option<DropoutMask>,
}

impl<T: Elem> Branch<'_, T> {
    /// `x ⊙ mask`, or `x` itself without dropout.
    fn masked<'x>(&self, x: &'x [T]) -> Cow<'x, [T]> {
        match &self.mask {
            None => Cow::Borrowed(x),
            Some(mask) => Cow::Owned(mask.masked_copy(x)),
        }
    }

    /// `y[rows, n] += scale · low · Bᵀ`; returns `low = (x ⊙ mask)·Aᵀ` (`[rows, r]`), which
    /// [`Branch::backward`] needs.
    pub fn forward(
        &self,
        y: &mut [T],
        x: &[T],
        rows: usize,
        k: usize,
        n: usize,
    ) -> candle_core::Result<Vec<T>> {
        let r = self.r;
        let xin = self.masked(x);
        // SAFETY: the gemm below (no accumulation) overwrites all [rows, r] elements.
        let mut low = unsafe { output_buffer(rows * r) };
        gemm(
            &mut low,
            View::rows(&xin, rows, k),
            View::rows(self.a, r, k).t(),
            T::ONE,
            false,
            true,
        )?;
        gemm(
            y,
            View::rows(&low, rows, r),
            View::rows(self.b, n, r).t(),
            T::from_f64(self.scale),
            true,
            true,
        )?;
        Ok(low)
    }

    /// Writes `dA` (`[r, k]`) and `dB` (`[n, r]`) for the output gradient `dy` (`[rows, n]`),
    /// and adds the branch's part of the input gradient into `dx` when given.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dy: &[T],
        x: &[T],
        low: &[T],
        rows: usize,
        k: usize,
        n: usize,
        da: &mut [T],
        db: &mut [T],
        dx: Option<&mut [T]>,
    ) -> candle_core::Result<()> {
        let (r, scale) = (self.r, T::from_f64(self.scale));
        let dy = View::rows(dy, rows, n);
        // dlow = scale · dy·B   [rows, r]
        // SAFETY: the gemm below (no accumulation) overwrites all [rows, r] elements.
        let mut dlow = unsafe { output_buffer(rows * r) };
        gemm(&mut dlow, dy, View::rows(self.b, n, r), scale, false, true)?;
        // dB = scale · dyᵀ·low   [n, r]
        gemm(db, dy.t(), View::rows(low, rows, r), scale, false, true)?;
        // dA = dlowᵀ·(x ⊙ mask)   [r, k]
        let xin = self.masked(x);
        let dlow_v = View::rows(&dlow, rows, r);
        gemm(
            da,
            dlow_v.t(),
            View::rows(&xin, rows, k),
            T::ONE,
            false,
            true,
        )?;
        if let Some(dx) = dx {
            // dx += (dlow·A) ⊙ mask
            let a_v = View::rows(self.a, r, k);
            match &self.mask {
                None => gemm(dx, dlow_v, a_v, T::ONE, true, true)?,
                Some(mask) => {
                    // SAFETY: the gemm below (no accumulation) overwrites all [rows, k]
                    // elements before the mask and the sum read them.
                    let mut dxin = unsafe { output_buffer(rows * k) };
                    gemm(&mut dxin, dlow_v, a_v, T::ONE, false, true)?;
                    mask.add_masked(dx, &dxin);
                }
            }
        }
        Ok(())
    }
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "peft-lora-linear"
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
            _ => bail!("lora_linear: the fused op supports f32 and f64"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.bwd_t::<f32>(x, a, b, dy),
            DType::F64 => self.bwd_t::<f64>(x, a, b, dy),
            dt => bail!("lora_linear: no fused backward for {dt:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Var};
    use std::sync::Arc;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn tensor(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
        let n = dims.iter().product();
        Tensor::from_vec(values(n, seed), dims, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    struct Case {
        x: Var,
        pair: LoraPair,
        weight: FrozenWeight,
        bias: Option<Tensor>,
        mask: Option<DropoutMask>,
        /// Random cotangent, so every output element matters.
        r: Tensor,
    }

    /// `x: [2, 5, 12]`, rank 3, 7 outputs.
    fn case(dtype: DType, bias: bool, dropout: bool, quantized: bool) -> Case {
        let (k, n, r) = (32, 7, 3);
        let w = tensor(&[n, k], 1, DType::F32);
        let weight = if quantized {
            FrozenWeight::Quantized(Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()))
        } else {
            FrozenWeight::dense(w.to_dtype(dtype).unwrap())
        };
        let mask = dropout.then_some(DropoutMask { seed: 9, keep: 0.6 });
        Case {
            x: Var::from_tensor(&tensor(&[2, 5, k], 2, dtype)).unwrap(),
            pair: LoraPair {
                a: Var::from_tensor(&tensor(&[r, k], 3, dtype)).unwrap(),
                b: Var::from_tensor(&tensor(&[n, r], 4, dtype)).unwrap(),
                scale: 1.7,
            },
            weight,
            bias: bias.then(|| tensor(&[n], 5, dtype)),
            mask,
            r: tensor(&[2, 5, n], 6, dtype),
        }
    }

    type Linear = fn(
        &Tensor,
        &FrozenWeight,
        Option<&Tensor>,
        &LoraPair,
        Option<DropoutMask>,
    ) -> Result<Tensor>;

    /// Output and the gradients of Σ y·r for x, A, B.
    fn run(c: &Case, f: Linear) -> (Vec<f64>, [Vec<f64>; 3]) {
        let y = f(c.x.as_tensor(), &c.weight, c.bias.as_ref(), &c.pair, c.mask).unwrap();
        let grads = (&y * &c.r).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| -> Vec<f64> {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let g = |v: &Var| flat(grads.get(v.as_tensor()).expect("gradient"));
        (flat(&y), [g(&c.x), g(&c.pair.a), g(&c.pair.b)])
    }

    fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
        let scale = b.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / scale)
            .fold(0.0, f64::max)
    }

    #[test]
    fn fused_matches_composed_values_and_gradients() {
        for (bias, dropout, quantized) in [
            (false, false, false),
            (true, false, false),
            (false, true, false),
            (true, true, true),
        ] {
            let c = case(DType::F32, bias, dropout, quantized);
            let (yf, gf) = run(&c, lora_linear);
            let (yc, gc) = run(&c, composed);
            let what = format!("bias {bias}, dropout {dropout}, quantized {quantized}");
            assert!(max_rel_diff(&yf, &yc) < 1e-5, "{what}: output");
            for (name, (f, r)) in ["x", "A", "B"].iter().zip(gf.iter().zip(&gc)) {
                assert!(max_rel_diff(f, r) < 1e-5, "{what}: d{name}");
            }
        }
    }

    #[test]
    fn bf16_weight_matches_its_f32_values() {
        // A bf16 base under f32 activations: the weight is multiplied as stored (AVX-512 BF16
        // where the CPU has it, which also rounds x to bf16), against the same weight values
        // in f32 through the composed path.
        let mut c = case(DType::F32, true, true, false);
        let FrozenWeight::Dense(w, _) = &c.weight else {
            unreachable!("dense case")
        };
        let w16 = w.to_dtype(DType::BF16).unwrap();
        c.weight = FrozenWeight::dense(w16.to_dtype(DType::F32).unwrap());
        let (yc, gc) = run(&c, composed);
        c.weight = FrozenWeight::dense(w16);
        let (yf, gf) = run(&c, lora_linear);
        assert!(max_rel_diff(&yf, &yc) < 1e-2, "output");
        for (name, (f, r)) in ["x", "A", "B"].iter().zip(gf.iter().zip(&gc)) {
            assert!(max_rel_diff(f, r) < 1e-2, "d{name}");
        }
    }

    #[test]
    fn gradients_match_finite_differences_f64() {
        let c = case(DType::F64, true, true, false);
        let (_, grads) = run(&c, lora_linear);
        let loss = |x: &Tensor, a: &Tensor, b: &Tensor| -> f64 {
            let pair = LoraPair {
                a: Var::from_tensor(a).unwrap(),
                b: Var::from_tensor(b).unwrap(),
                scale: c.pair.scale,
            };
            let y = lora_linear(x, &c.weight, c.bias.as_ref(), &pair, c.mask).unwrap();
            (&y * &c.r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let inputs = [
            c.x.as_tensor().clone(),
            c.pair.a.as_tensor().clone(),
            c.pair.b.as_tensor().clone(),
        ];
        for (which, analytic) in grads.iter().enumerate() {
            let base = inputs[which]
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for idx in (0..base.len()).step_by(base.len() / 9 + 1) {
                let h = 1e-6;
                let shifted = |d: f64| {
                    let mut v = base.clone();
                    v[idx] += d;
                    let mut ins = inputs.clone();
                    ins[which] = Tensor::from_vec(v, inputs[which].dims(), &Device::Cpu).unwrap();
                    loss(&ins[0], &ins[1], &ins[2])
                };
                let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
                let err = (numeric - analytic[idx]).abs() / analytic[idx].abs().max(1.0);
                assert!(
                    err < 1e-7,
                    "input {which}[{idx}]: {numeric} vs {}",
                    analytic[idx]
                );
            }
        }
    }

    #[test]
    fn no_input_gradient_below_the_adapted_layers() {
        // x is a plain tensor (e.g. embeddings): backward must still give dA and dB.
        let c = case(DType::F32, false, false, false);
        let x = c.x.as_tensor().detach();
        let y = lora_linear(&x, &c.weight, None, &c.pair, None).unwrap();
        let grads = (&y * &c.r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(c.pair.a.as_tensor()).is_some());
        assert!(grads.get(c.pair.b.as_tensor()).is_some());
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let c = case(DType::F32, false, false, false);
        let x = Tensor::zeros((3, 31), DType::F32, &Device::Cpu).unwrap();
        let err = lora_linear(&x, &c.weight, None, &c.pair, None).unwrap_err();
        assert!(err.to_string().contains("lora_linear"), "{err}");
    }
}
