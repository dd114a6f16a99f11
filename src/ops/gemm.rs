//! One checked entry point to the `gemm` crate for the fused CPU kernels.
//!
//! The fused ops pass slices of candle storages and scratch buffers; this wrapper turns
//! (data, shape, strides) views into the raw-pointer call after checking every index it will
//! touch, so the kernels themselves stay free of `unsafe`.

use super::kernel::{with_cpu_slices, Elem};
use super::wgemm::{self, PackCache, WeightLayout};
use candle_core::{bail, Result};
use half::bf16;

/// A strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> View<'a, T> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `c = (accumulate ? c : 0) + scale · a · b` for a contiguous row-major `c` of
/// `a.rows × b.cols`. `parallel` spreads the product over rayon's threads (for large
/// products; kernels that are already parallel outside pass `false`).
pub(crate) fn gemm<T: Elem>(
    c: &mut [T],
    a: View<'_, T>,
    b: View<'_, T>,
    scale: T,
    accumulate: bool,
    parallel: bool,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || c.len() < m * n || !a.in_bounds() || !b.in_bounds() {
        bail!(
            "internal gemm: [{m}×{k}]·[{}×{n}] into {} elements",
            b.rows,
            c.len()
        );
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
    // SAFETY: every index of `a`, `b` and `c[..m·n]` was checked above; `c` is a distinct
    // mutable borrow, so it aliases neither input.
    unsafe { gemm_raw(c.as_mut_ptr(), n, a, b, scale, accumulate, parallel) };
    Ok(())
}

/// The `gemm` crate call behind [`gemm`], for callers that write into a strided or shared output
/// (`c` element `(i, j)` at `c + i·c_rs + j`).
///
/// # Safety
/// `a` and `b` must be in bounds ([`View`] rows/cols/strides inside their slices), `k ≥ 1`, and
/// `c` valid for reads and writes at every `(i, j)` with `i < a.rows`, `j < b.cols`, not
/// aliasing `a` or `b` nor anything another thread touches meanwhile.
pub(crate) unsafe fn gemm_raw<T: Elem>(
    c: *mut T,
    c_rs: usize,
    a: View<'_, T>,
    b: View<'_, T>,
    scale: T,
    accumulate: bool,
    parallel: bool,
) {
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            c,
            1,
            c_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// A dense `[out, in]` row-major weight as stored: in the activations' dtype, or bf16 under f32
/// activations (multiplied by the AVX-512 BF16 kernel; see [`bf16_supported`]).
#[derive(Clone, Copy)]
pub(crate) enum WeightData<'a, T> {
    Same(&'a [T]),
    Bf16(&'a [bf16]),
}

/// Rows from which `a·Wᵀ` in f32 goes through [`wgemm::matmul_f32`] (below, packing the weight
/// costs about as much as the product), and the widest output it takes (the crate is ahead on
/// vocabulary-wide products: 191 vs 171 GFLOP/s at 256×576×49152).
const PACKED_F32_MIN_ROWS: usize = 128;
const PACKED_F32_MAX_COLS: usize = 8192;

fn layout_of(transposed: bool) -> WeightLayout {
    if transposed {
        WeightLayout::Transposed
    } else {
        WeightLayout::Plain
    }
}

impl<T> WeightData<'_, T> {
    pub fn len(&self) -> usize {
        match self {
            Self::Same(w) => w.len(),
            Self::Bf16(w) => w.len(),
        }
    }
}

/// Runs `f` on a dense CPU weight tensor's data: bf16 as stored, any other dtype as `T` (which
/// it must already be).
pub(crate) fn with_weight_data<T: Elem, R>(
    w: &candle_core::Tensor,
    f: impl FnOnce(WeightData<'_, T>) -> Result<R>,
) -> Result<R> {
    if w.dtype() == candle_core::DType::BF16 && T::DTYPE != candle_core::DType::BF16 {
        with_cpu_slices::<bf16, _>(&[w], |s| f(WeightData::Bf16(s[0])))
    } else {
        with_cpu_slices::<T, _>(&[w], |s| f(WeightData::Same(s[0])))
    }
}

/// Whether an f32 weight product of `m` rows into `n` columns goes through the packed
/// kernel ([`wgemm::matmul_f32`]) rather than the `gemm` crate.
pub(crate) fn packed_f32_suits(m: usize, n: usize, transposed: bool) -> bool {
    transposed && m >= PACKED_F32_MIN_ROWS && n <= PACKED_F32_MAX_COLS
}

/// True when bf16 weights can be multiplied as they are stored with `T` activations.
pub(crate) fn bf16_supported<T: Elem>() -> bool {
    T::DTYPE == candle_core::DType::F32 && wgemm::available()
}

/// `c (+)= a · Wᵀ` (`transposed`, `a: [m, in]`, `c: [m, out]`) or `a · W` (`a: [m, out]`,
/// `c: [m, in]`) for a weight `W: [out, in]`, in parallel. `cache` is the weight's own: the
/// packed kernels keep its panels there between products.
#[allow(clippy::too_many_arguments)]
pub(crate) fn weight_product<T: Elem>(
    c: &mut [T],
    a: &[T],
    m: usize,
    w: WeightData<'_, T>,
    cache: Option<&PackCache>,
    out: usize,
    inp: usize,
    transposed: bool,
    accumulate: bool,
) -> Result<()> {
    let (k, n) = if transposed { (inp, out) } else { (out, inp) };
    if c.len() < m * n || a.len() < m * k {
        bail!(
            "internal weight product: [{m}×{k}] into {} elements",
            c.len()
        );
    }
    match w {
        WeightData::Same(w) => {
            // Our packed AVX-512 kernel beats the gemm crate on `a·Wᵀ` with many rows (0–16%,
            // most at k = 1536); the crate stays ahead on `a·W` and on few rows.
            if packed_f32_suits(m, n, transposed) && wgemm::f32_available() {
                if let (Some(c), Some(a), Some(w)) = (T::as_f32_mut(c), T::as_f32(a), T::as_f32(w))
                {
                    let (c, a) = (&mut c[..m * n], &a[..m * k]);
                    return wgemm::matmul_f32(c, a, m, k, w, n, layout_of(transposed), accumulate);
                }
            }
            let w = View::rows(w, out, inp);
            let w = if transposed { w.t() } else { w };
            gemm(c, View::rows(a, m, k), w, T::ONE, accumulate, true)
        }
        WeightData::Bf16(w) => {
            let (Some(c), Some(a)) = (T::as_f32_mut(c), T::as_f32(a)) else {
                bail!("bf16 weights need f32 activations");
            };
            let layout = layout_of(transposed);
            let c_len = m * n;
            if c.len() < c_len || a.len() < m * k {
                bail!(
                    "internal weight product: [{m}×{k}] into {} elements",
                    c.len()
                );
            }
            let (c, a) = (&mut c[..c_len], &a[..m * k]);
            wgemm::matmul_bf16(c, a, m, k, w, n, layout, accumulate, cache)
        }
    }
}
