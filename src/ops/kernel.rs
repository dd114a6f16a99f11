//! Shared CPU helpers: element trait, vectorisable exp, row chunking, storage access and
//! runtime SIMD dispatch (the crate is built for baseline x86-64, so hot loops are compiled
//! a second time with AVX2+FMA and picked at run time).

use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// Float element types the fused CPU kernels support (f32 for training, f64 for grad checks).
pub(crate) trait Elem: WithDType {
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    /// exp that the compiler can vectorise (f32: Cephes polynomial, ~2 ulp).
    fn vexp(self) -> Self;
    /// The slice as `f32` when `Self` is `f32` (for kernels that exist only in f32).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
    /// Plain `if` max: vectorises (`f32::max` has NaN semantics that do not always).
    #[inline(always)]
    fn vmax(self, o: Self) -> Self {
        if o > self {
            o
        } else {
            self
        }
    }
}

impl Elem for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn vexp(self) -> Self {
        exp_f32(self)
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }
}

impl Elem for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn vexp(self) -> Self {
        self.exp()
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}

/// Branch-free expf (Cephes): round via the 1.5·2^23 trick (no `floor` call, which is a libm
/// call on baseline x86-64), degree-6 polynomial, scale by 2^n built in the exponent bits.
/// Inputs below ln(2^-126) (including -inf) give exactly 0; NaN propagates.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const HI: f32 = 88.376_26;
    const LO: f32 = -87.336_55;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = if x > HI { HI } else { x };
    let xc = if xc < LO { LO } else { xc };
    let z = xc * LOG2E + MAGIC;
    let n = z - MAGIC;
    let ni = (z.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    let out = y * scale;
    if x < LO {
        0.0
    } else {
        out
    }
}

/// Wraps a kernel so it is compiled twice (baseline and AVX2+FMA) and dispatched at run time.
/// The body must be `#[inline(always)]`-able code; `a * b + c` is left as written (no fusion),
/// so results are identical up to vector-width reassociation inside reductions.
macro_rules! simd_fn {
    ($vis:vis fn $name:ident<$T:ident: Elem>($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $vis fn $name<$T: Elem>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp<$T: Elem>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn avx512<$T: Elem>($($arg: $ty),*) $(-> $ret)? { imp::<$T>($($arg),*) }
                if $crate::ops::kernel::has_avx512() {
                    // SAFETY: the CPU supports avx512f/vl, avx2 and fma (checked at run time
                    // just above).
                    return unsafe { avx512::<$T>($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2<$T: Elem>($($arg: $ty),*) $(-> $ret)? { imp::<$T>($($arg),*) }
                if $crate::ops::kernel::has_avx2() {
                    // SAFETY: the CPU supports avx2+fma (checked at run time just above).
                    return unsafe { avx2::<$T>($($arg),*) };
                }
            }
            imp::<$T>($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// AVX-512 F + VL on top of [`has_avx2`]: sixteen f32 lanes per instruction.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512() -> bool {
    has_avx2()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

const LANES: usize = 16;

/// Σ a·b with independent lane accumulators so the loop vectorises.
#[inline(always)]
pub(crate) fn dot<T: Elem>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += xa[l] * xb[l];
        }
    }
    let mut s = T::ZERO;
    for (x, y) in ra.iter().zip(rb) {
        s += *x * *y;
    }
    acc.iter().fold(s, |s, v| s + *v)
}

/// Σ a with lane accumulators.
#[inline(always)]
pub(crate) fn sum<T: Elem>(a: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let ca = a.chunks_exact(LANES);
    let r = ca.remainder();
    for x in ca {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    let s = r.iter().fold(T::ZERO, |s, v| s + *v);
    acc.iter().fold(s, |s, v| s + *v)
}

/// max a with lane accumulators.
#[inline(always)]
pub(crate) fn max<T: Elem>(a: &[T]) -> T {
    let mut acc = [T::NEG_INF; LANES];
    let ca = a.chunks_exact(LANES);
    let r = ca.remainder();
    for x in ca {
        for l in 0..LANES {
            acc[l] = acc[l].vmax(x[l]);
        }
    }
    let m = r.iter().fold(T::NEG_INF, |m, v| m.vmax(*v));
    acc.iter().fold(m, |m, v| m.vmax(*v))
}

/// `row[i] = exp(row[i] − m)` in place; returns Σ of the new values (lane accumulators, so
/// the exp and the sum vectorise together: a plain running sum serialises the loop).
#[inline(always)]
pub(crate) fn exp_shifted_in_place<T: Elem>(row: &mut [T], m: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for x in &mut chunks {
        for l in 0..LANES {
            x[l] = (x[l] - m).vexp();
            acc[l] += x[l];
        }
    }
    let mut s = T::ZERO;
    for x in chunks.into_remainder() {
        *x = (*x - m).vexp();
        s += *x;
    }
    acc.iter().fold(s, |s, v| s + *v)
}

/// Σ exp(row[i] − m), without writing (lane accumulators, as [`exp_shifted_in_place`]).
#[inline(always)]
pub(crate) fn sum_exp_shifted<T: Elem>(row: &[T], m: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = row.chunks_exact(LANES);
    let s = chunks
        .remainder()
        .iter()
        .fold(T::ZERO, |s, x| s + (*x - m).vexp());
    for x in chunks {
        for l in 0..LANES {
            acc[l] += (x[l] - m).vexp();
        }
    }
    acc.iter().fold(s, |s, v| s + *v)
}

/// A buffer of `n` elements with unspecified contents, for outputs the caller overwrites
/// entirely before anything reads them (gemms with `accumulate = false`, elementwise maps).
/// Zeroing instead costs a serial memset (plus page faults) on the calling thread for every
/// activation-sized output: ~5% of a 2-thread training step, with the other core idle.
///
/// # Safety
/// The contents are uninitialised: the caller must write all `n` elements before any of them
/// is read, and must not hand the buffer on (return it, wrap it in a tensor) before then. It
/// may be dropped unread (an error path), since `Elem` types have no drop glue. This is the
/// same contract as candle's `alloc_uninit` for op outputs.
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn output_buffer<T: Elem>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is `n`. `Elem` is implemented only for plain floating-point types
    // (no invalid bit patterns that a write must avoid, no drop glue), and the caller writes
    // all `n` elements before reading any (this function's contract).
    unsafe { v.set_len(n) };
    v
}

/// Runs `f` on this thread's buffer in `kept`, or on a fresh, empty one when it is in use (a
/// nested call: a rayon worker that steals work while waiting).
pub(crate) fn with_thread_buffer<W, R>(
    kept: &'static std::thread::LocalKey<std::cell::RefCell<Vec<W>>>,
    f: impl FnOnce(&mut Vec<W>) -> R,
) -> R {
    kept.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut Vec::new()),
    })
}

/// Runs `f` on a buffer of `n` elements with unspecified contents that this thread keeps for
/// its next call ([`with_thread_buffer`]), for op scratch larger than the malloc heap serves:
/// glibc maps a block above 32 MiB afresh each time and the kernel zeroes every new page,
/// which for the output projection's logits block (512 × 49,152 f32, 100 MB a step) cost ~4%
/// of a real-data training step.
///
/// # Safety
/// As for [`output_buffer`]: `f` must write every element it reads before reading it.
pub(crate) unsafe fn with_scratch<T: Elem, R>(n: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // f64 words: `Elem` is f32 or f64, both plain data aligned to at most 8 bytes.
    const { assert!(std::mem::align_of::<T>() <= std::mem::align_of::<f64>()) };
    let words = (n * std::mem::size_of::<T>()).div_ceil(std::mem::size_of::<f64>());
    with_thread_buffer(&SCRATCH, |buf| {
        if buf.len() < words {
            // SAFETY: contents unspecified, per this function's contract.
            *buf = unsafe { output_buffer(words) };
        }
        // SAFETY: the buffer holds at least `n · size_of::<T>()` bytes, aligned for `T`
        // (checked above), and stays borrowed for the whole call.
        let slice = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<T>(), n) };
        f(slice)
    })
}

/// A copy of `src`, made in parallel (a serial memcpy of an activation leaves the other
/// cores idle).
pub(crate) fn par_copy<T: Elem>(src: &[T]) -> Vec<T> {
    // SAFETY: the chunks of `out` and `src` pair up one to one (same length, same chunk size),
    // and each chunk of `out` is overwritten by `copy_from_slice` before `out` is returned.
    let mut out = unsafe { output_buffer(src.len()) };
    out.par_chunks_mut(1 << 15)
        .zip(src.par_chunks(1 << 15))
        .for_each(|(o, s)| o.copy_from_slice(s));
    out
}

/// `y += x` elementwise, in parallel.
pub(crate) fn add_assign_par<T: Elem>(y: &mut [T], x: &[T]) {
    y.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, x)| *y += *x));
}

/// Rows per rayon task: big enough to amortise scheduling (≥ ~16K elements), small enough to
/// give every thread a few tasks.
pub(crate) fn rows_per_task(n_rows: usize, row_len: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let min_rows = (16 * 1024usize).div_ceil(row_len.max(1));
    let balanced = n_rows.div_ceil(4 * threads);
    balanced.max(min_rows).clamp(1, n_rows.max(1))
}

/// The contiguous data of a CPU storage under `layout`.
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("fused op: input must be contiguous"),
    }
}

/// Runs `f` on the contiguous CPU data of several same-dtype tensors.
pub(crate) fn with_cpu_slices<T: WithDType, R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> Result<R>,
) -> Result<R> {
    let cs = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = cs.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(s, l)| match &**s {
            Storage::Cpu(cpu) => contiguous_slice::<T>(cpu, l),
            _ => bail!("fused op: expected a CPU tensor"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(&slices)
}

/// Builds a CPU tensor from an owned buffer (no copy).
pub(crate) fn tensor_from_vec<T: WithDType>(v: Vec<T>, dims: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, dims, &candle_core::Device::Cpu)
}
