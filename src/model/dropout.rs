//! Inverted dropout on LoRA inputs, from a seed rather than a stored mask.
//!
//! Forward and backward of every adapted projection regenerate the mask (three passes over
//! the input per projection and step), so the hash is computed eight lanes at a time where
//! the CPU has AVX-512 DQ: it cost 14% of a real-data training step as scalar code.

use crate::ops::kernel::{output_buffer, Elem};
use rayon::prelude::*;

/// An inverted-dropout keep mask over the elements of one input, computed from a seed rather
/// than stored: element `i` is kept (and scaled by `1/keep`) when a hash of `(seed, i)` falls
/// below `keep`. Forward and backward regenerate it in parallel, so no mask-sized buffer is
/// held between them, and the result does not depend on the thread count.
#[derive(Debug, Clone, Copy)]
pub struct DropoutMask {
    pub seed: u64,
    /// Keep probability `1 − p`, in (0, 1].
    pub keep: f32,
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

impl DropoutMask {
    /// `1/keep` for a kept element, 0 for a dropped one.
    #[inline(always)]
    pub fn factor(&self, i: usize) -> f32 {
        // splitmix64 finaliser of (seed, index): well mixed, no state, trivially parallel.
        let mut z = self
            .seed
            .wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 24 uniform bits → [0, 1), exactly representable in f32.
        let u = (z >> 40) as u32 as f32 * (1.0 / (1u64 << 24) as f32);
        if u < self.keep {
            1.0 / self.keep
        } else {
            0.0
        }
    }

    /// `x ⊙ mask` as a new buffer, in one pass.
    pub(crate) fn masked_copy<T: Elem>(&self, x: &[T]) -> Vec<T> {
        // SAFETY: `combine` overwrites every element of `out` (ADD = false writes, not reads).
        let mut out = unsafe { output_buffer(x.len()) };
        self.combine::<T, false>(&mut out, x);
        out
    }

    /// `y[i] += x[i] · factor(i)` in parallel, in one pass (over the shorter of the two).
    pub(crate) fn add_masked<T: Elem>(&self, y: &mut [T], x: &[T]) {
        self.combine::<T, true>(y, x);
    }

    /// `dst[i] = (ADD ? dst[i] : 0) + src[i] · factor(i)`, in parallel chunks.
    fn combine<T: Elem, const ADD: bool>(&self, dst: &mut [T], src: &[T]) {
        let n = dst.len().min(src.len());
        dst[..n]
            .par_chunks_mut(CHUNK)
            .zip(src[..n].par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (dst, src))| self.combine_chunk::<T, ADD>(c * CHUNK, dst, src));
    }

    /// [`Self::combine`] on one chunk starting at element `start`, vectorised where the CPU
    /// has AVX-512 DQ (64-bit lane multiplies for the hash).
    fn combine_chunk<T: Elem, const ADD: bool>(&self, start: usize, dst: &mut [T], src: &[T]) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
            fn avx512<T: Elem, const ADD: bool>(
                mask: &DropoutMask,
                start: usize,
                dst: &mut [T],
                src: &[T],
            ) {
                combine_imp::<T, ADD>(mask, start, dst, src)
            }
            if std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                // SAFETY: the CPU has avx512f/dq/vl (dq and vl imply f; checked just above).
                return unsafe { avx512::<T, ADD>(self, start, dst, src) };
            }
        }
        combine_imp::<T, ADD>(self, start, dst, src)
    }
}

#[inline(always)]
fn combine_imp<T: Elem, const ADD: bool>(
    mask: &DropoutMask,
    start: usize,
    dst: &mut [T],
    src: &[T],
) {
    for (j, (d, s)) in dst.iter_mut().zip(src).enumerate() {
        // f32 → f64 → T is exact (and folds away for f32).
        let v = *s * T::from_f64(mask.factor(start + j) as f64);
        *d = if ADD { *d + v } else { v };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_mask_keeps_the_right_fraction_deterministically() {
        let mask = DropoutMask {
            seed: 42,
            keep: 0.95,
        };
        let n = 200_000;
        let ones = mask.masked_copy(&vec![1f32; n]);
        let kept = ones.iter().filter(|v| **v != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.95).abs() < 0.003, "kept {kept}");
        assert!(ones
            .iter()
            .all(|v| *v == 0.0 || (*v - 1.0 / 0.95).abs() < 1e-6));
        // The same seed gives the same mask (forward and backward agree); another seed differs.
        assert!((0..n).all(|i| mask.factor(i) == ones[i]));
        let other = DropoutMask { seed: 43, ..mask };
        assert!((0..n).any(|i| other.factor(i) != ones[i]));
    }

    /// The vectorised f32 chunks equal the scalar hash element for element, at lengths that end
    /// inside a vector and inside a chunk, and the masked copy and sum equal their definitions.
    #[test]
    fn vectorised_mask_equals_the_scalar_hash() {
        let mask = DropoutMask {
            seed: 0x5eed,
            keep: 0.8,
        };
        for n in [1, 7, 515, CHUNK - 1, CHUNK + 5, 3 * CHUNK + 1] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let expected: Vec<f32> = (0..n).map(|i| x[i] * mask.factor(i)).collect();
            assert_eq!(mask.masked_copy(&x), expected, "masked copy, n = {n}");
            let mut y: Vec<f32> = (0..n).map(|i| i as f32).collect();
            mask.add_masked(&mut y, &x);
            let summed: Vec<f32> = (0..n).map(|i| i as f32 + expected[i]).collect();
            assert_eq!(y, summed, "add, n = {n}");
            // f64 (the gradient checks' dtype) gets the same mask.
            let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
            let expected64: Vec<f64> = (0..n).map(|i| x64[i] * mask.factor(i) as f64).collect();
            assert_eq!(mask.masked_copy(&x64), expected64, "f64, n = {n}");
        }
    }
}
