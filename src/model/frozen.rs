//! The frozen base weight of a linear layer, dense or kept as GGUF quantized blocks, and the
//! matmul through it.
//!
//! Both kinds go through one custom op, `FrozenMatmul`, because candle's own paths are wrong for
//! training: `QMatMul` has no backward (gradients silently stop) and quantizes activations to Q8_1,
//! and a plain `matmul` also computes (and keeps) the gradient of the frozen weight, which nobody
//! needs. The op computes `x·Wᵀ` forward and only `dL/dx = dL/dy·W` backward. A quantized weight is
//! never kept dense: blocks of 32 go straight into the packed kernel's panels where it takes the
//! product (`x·Wᵀ` of many rows), and otherwise the weight is dequantized one tensor at a time
//! into a scratch buffer that is dropped after the matmul.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::QTensor;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, MetalStorage, Shape, Storage, Tensor,
};

use crate::ops::gemm::{bf16_supported, packed_f32_suits, weight_product, with_weight_data};
use crate::ops::kernel::{contiguous_slice, Elem};
use crate::ops::wgemm::{self, WeightLayout};
use crate::ops::PackCache;
use crate::Result;

/// A frozen `[out, in]` weight. Never a `Var`: no gradient, no optimizer state.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// A dense tensor in its storage dtype (f32, f16 or bf16), and the CPU kernels' packed
    /// copies of it, made on first use (make one with [`FrozenWeight::dense`]).
    Dense(Tensor, PackCache),
    /// GGUF blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, ...), dequantized on the fly.
    Quantized(Arc<QTensor>),
}

impl FrozenWeight {
    /// A dense weight with an empty pack cache.
    pub fn dense(weight: Tensor) -> Self {
        Self::Dense(weight, PackCache::default())
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        let dims = match self {
            Self::Dense(t, _) => t.dims2()?,
            Self::Quantized(q) => q.shape().dims2()?,
        };
        Ok(dims)
    }

    /// Whether the weight lives in CPU memory.
    pub fn is_cpu(&self) -> bool {
        match self {
            Self::Dense(t, _) => t.device().is_cpu(),
            Self::Quantized(q) => q.device().is_cpu(),
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Quantized(_))
    }

    /// The weight as a dense tensor of `dtype` (a copy for quantized or other-dtype weights).
    pub fn to_dense(&self, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let dense = match self {
            Self::Dense(t, _) => t.clone(),
            Self::Quantized(q) if device.is_cpu() => match dequantize_cpu(q) {
                Some(dense) => dense?,
                None => q.dequantize(device)?,
            },
            Self::Quantized(q) => q.dequantize(device)?,
        };
        dense.to_dtype(dtype)
    }

    /// `c (+)= a · Wᵀ` (`transposed`, `a: [m, in]`) or `a · W` (`a: [m, out]`) into a row-major
    /// `c` on the CPU, through the weight in its stored form where a kernel exists for it
    /// (same-dtype dense; bf16 with f32 activations on AVX-512 BF16), else through a dense
    /// scratch copy that lives for this one product (quantized blocks, other dtypes).
    pub(crate) fn cpu_product<T: Elem>(
        &self,
        c: &mut [T],
        a: &[T],
        m: usize,
        transposed: bool,
        accumulate: bool,
    ) -> candle_core::Result<()> {
        let (out, inp) = self
            .dims()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (dense, cache) = match self {
            Self::Dense(t, cache)
                if t.dtype() == T::DTYPE || (t.dtype() == DType::BF16 && bf16_supported::<T>()) =>
            {
                (t.clone(), crate::ops::kept_panels(t, Some(cache)))
            }
            Self::Quantized(q) if quantized_product(q, c, a, m, transposed, accumulate)? => {
                return Ok(());
            }
            // A scratch copy lives for this product only: nothing to keep.
            w => (w.to_dense(T::DTYPE, &Device::Cpu)?, None),
        };
        with_weight_data::<T, _>(&dense, |w| {
            weight_product(c, a, m, w, cache, out, inp, transposed, accumulate)
        })
    }

    /// `x · Wᵀ` for `x` of shape `[..., in]`, differentiable in `x` only.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(frozen_matmul(x, self, true)?)
    }
}

/// `x · Wᵀ` (`transpose`) or `x · W`, for `x: [..., k]`.
fn frozen_matmul(
    x: &Tensor,
    weight: &FrozenWeight,
    transpose: bool,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let (lead, k) = dims.split_at(dims.len().saturating_sub(1));
    let rows: usize = lead.iter().product();
    let x2 = x.contiguous()?.reshape((rows, k[0]))?;
    let op = FrozenMatmul {
        weight: weight.clone(),
        transpose,
    };
    let y = x2.apply_op1(op)?;
    let n = y.dim(1)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(n);
    y.reshape(out_dims)
}

/// The custom op behind [`FrozenWeight::forward`]; its backward is the same op un-transposed.
struct FrozenMatmul {
    weight: FrozenWeight,
    transpose: bool,
}

impl FrozenMatmul {
    /// Runs the matmul on any backend through `BackendStorage::matmul`, so the op exists wherever
    /// candle has a matmul kernel (CPU, CUDA, Metal) without a kernel of our own.
    fn fwd<S: BackendStorage>(
        &self,
        x: &S,
        x_layout: &Layout,
        device: &Device,
        unwrap: impl Fn(&Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let w = self.weight.to_dense(x.dtype(), device)?;
        let (out, inp) = w.dims2()?;
        let (w_storage, w_layout) = w.storage_and_layout();
        let w_storage = unwrap(&w_storage)
            .ok_or_else(|| candle_core::Error::Msg("frozen weight on another device".into()))?;
        let (rhs_layout, n, expected_k) = if self.transpose {
            (w_layout.transpose(0, 1)?, out, inp)
        } else {
            (w_layout.clone(), inp, out)
        };
        if k != expected_k {
            return Err(candle_core::Error::Msg(format!(
                "frozen matmul: input has {k} features, weight expects {expected_k}"
            )));
        }
        let y = x.matmul(w_storage, (1, m, n, k), x_layout, &rhs_layout)?;
        Ok((y, Shape::from((m, n))))
    }
}

impl FrozenMatmul {
    /// The CPU path for f32/f64 activations: [`FrozenWeight::cpu_product`].
    fn cpu<T: Elem>(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let (out, inp) = self
            .weight
            .dims()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (expected_k, n) = if self.transpose {
            (inp, out)
        } else {
            (out, inp)
        };
        if k != expected_k {
            candle_core::bail!(
                "frozen matmul: input has {k} features, weight expects {expected_k}"
            );
        }
        let x = contiguous_slice::<T>(s, l)?;
        let mut y = vec![T::ZERO; m * n];
        self.weight
            .cpu_product(&mut y, x, m, self.transpose, false)?;
        Ok((T::to_cpu_storage_owned(y), Shape::from((m, n))))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(_) => self.cpu::<f32>(s, l),
            CpuStorage::F64(_) => self.cpu::<f64>(s, l),
            _ => self.fwd(s, l, &Device::Cpu, |st| match st {
                Storage::Cpu(s) => Some(s),
                _ => None,
            }),
        }
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = Device::Cuda(s.device().clone());
        self.fwd(s, l, &device, |st| match st {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn metal_fwd(
        &self,
        s: &MetalStorage,
        l: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        let device = Device::Metal(s.device().clone());
        self.fwd(s, l, &device, |st| match st {
            Storage::Metal(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(frozen_matmul(grad_y, &self.weight, !self.transpose)?))
    }
}

/// GGUF blocks to f32 on the CPU, in parallel over block runs: candle's CPU path zero-fills the
/// output and converts in one serial pass, which with the base kept quantized ran twice per
/// projection per step (forward and backward) with the other core idle. `None` for a block
/// type this does not cover (the caller then uses candle's path).
fn dequantize_cpu(q: &QTensor) -> Option<candle_core::Result<Tensor>> {
    use candle_core::quantized::k_quants::*;
    use candle_core::quantized::GgmlDType as Q;
    let n = q.shape().elem_count();
    let bytes = q.data().ok()?;
    let out = match q.dtype() {
        Q::Q4_0 => dequantize_blocks::<BlockQ4_0>(&bytes, n),
        Q::Q4_1 => dequantize_blocks::<BlockQ4_1>(&bytes, n),
        Q::Q5_0 => dequantize_blocks::<BlockQ5_0>(&bytes, n),
        Q::Q5_1 => dequantize_blocks::<BlockQ5_1>(&bytes, n),
        Q::Q8_0 => dequantize_blocks::<BlockQ8_0>(&bytes, n),
        Q::Q2K => dequantize_blocks::<BlockQ2K>(&bytes, n),
        Q::Q3K => dequantize_blocks::<BlockQ3K>(&bytes, n),
        Q::Q4K => dequantize_blocks::<BlockQ4K>(&bytes, n),
        Q::Q5K => dequantize_blocks::<BlockQ5K>(&bytes, n),
        Q::Q6K => dequantize_blocks::<BlockQ6K>(&bytes, n),
        _ => None,
    }?;
    Some(Tensor::from_vec(out, q.shape(), &Device::Cpu))
}

/// `c (+)= a · Wᵀ` (`transposed`) or `a · W` for f32 activations straight from the GGUF
/// blocks of `q`, where they are blocks of 32 and the packed f32 kernel takes the product
/// (`gemm::packed_f32_suits`); `Ok(false)`, with `c` untouched, elsewhere.
fn quantized_product<T: Elem>(
    q: &QTensor,
    c: &mut [T],
    a: &[T],
    m: usize,
    transposed: bool,
    accumulate: bool,
) -> candle_core::Result<bool> {
    use candle_core::quantized::k_quants::*;
    use candle_core::quantized::GgmlDType as Q;
    let (Some(c), Some(a)) = (T::as_f32_mut(c), T::as_f32(a)) else {
        return Ok(false);
    };
    let (out, inp) = q.shape().dims2()?;
    let (k, n) = if transposed { (inp, out) } else { (out, inp) };
    if !q.device().is_cpu() || !packed_f32_suits(m, n, transposed) {
        return Ok(false);
    }
    let bytes = q.data()?;
    fn run<B: GgmlType + Sync>(
        bytes: &[u8],
        c: &mut [f32],
        a: &[f32],
        (m, k, n): (usize, usize, usize),
        transposed: bool,
        accumulate: bool,
    ) -> candle_core::Result<bool> {
        let Some(blocks) = block_slice::<B>(bytes, k * n) else {
            return Ok(false);
        };
        let layout = if transposed {
            WeightLayout::Transposed
        } else {
            WeightLayout::Plain
        };
        let (c, a) = (&mut c[..m * n], &a[..m * k]);
        wgemm::matmul_f32_blocks(c, a, m, k, blocks, n, layout, accumulate)
    }
    let shape = (m, k, n);
    match q.dtype() {
        Q::Q4_0 => run::<BlockQ4_0>(&bytes, c, a, shape, transposed, accumulate),
        Q::Q4_1 => run::<BlockQ4_1>(&bytes, c, a, shape, transposed, accumulate),
        Q::Q5_0 => run::<BlockQ5_0>(&bytes, c, a, shape, transposed, accumulate),
        Q::Q5_1 => run::<BlockQ5_1>(&bytes, c, a, shape, transposed, accumulate),
        Q::Q8_0 => run::<BlockQ8_0>(&bytes, c, a, shape, transposed, accumulate),
        _ => Ok(false),
    }
}

/// The raw bytes of one block type as its `n / B::BLCK_SIZE` blocks; `None` if they are not
/// exactly that many, aligned.
fn block_slice<B: candle_core::quantized::k_quants::GgmlType>(
    bytes: &[u8],
    n: usize,
) -> Option<&[B]> {
    let size = std::mem::size_of::<B>();
    let count = bytes.len() / size;
    let aligned = (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>());
    if !aligned || count * size != bytes.len() || count * B::BLCK_SIZE != n {
        return None;
    }
    // SAFETY: length and alignment checked above; the block types are `repr(C)` structs of
    // integers and f16, valid for any bits (candle reads them the same way from GGUF files,
    // and these bytes are its own storage of them).
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), count) })
}

/// `n` f32 values from the raw blocks of one type; `None` if the bytes are not exactly
/// `n / B::BLCK_SIZE` aligned blocks.
fn dequantize_blocks<B: candle_core::quantized::k_quants::GgmlType>(
    bytes: &[u8],
    n: usize,
) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    let blocks = block_slice::<B>(bytes, n)?;
    // SAFETY: every element is written before `out` is returned: `blocks.len() · BLCK_SIZE
    // = n` (`block_slice` checked it), so the chunks of `out` pair one to one with runs of blocks, and
    // `to_float` fills a chunk of exactly its blocks' length.
    let mut out = unsafe { crate::ops::kernel::output_buffer(n) };
    const BLOCKS_PER_TASK: usize = 256;
    out.par_chunks_mut(BLOCKS_PER_TASK * B::BLCK_SIZE)
        .zip(blocks.par_chunks(BLOCKS_PER_TASK))
        .for_each(|(o, b)| B::to_float(b, o));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// The parallel dequantisation gives candle's values bit for bit, for every block type it
    /// covers (several task-sized runs of blocks plus a partial one).
    #[test]
    fn parallel_dequantize_matches_candle() {
        let n = 386 * 512; // 6176 Q4_0 blocks: 24 full runs of 256 and a partial one
        let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 2.0).collect();
        let w = Tensor::from_vec(values, (n / 512, 512), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let ours = dequantize_cpu(&q)
                .unwrap_or_else(|| panic!("{dtype:?} not covered"))
                .unwrap();
            let theirs = q.dequantize(&Device::Cpu).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let (a, b): (Vec<f32>, Vec<f32>) = (
                ours.flatten_all().unwrap().to_vec1().unwrap(),
                theirs.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{dtype:?}"
            );
        }
    }
}
