//! Inverted dropout on LoRA inputs, from a seed rather than a stored mask.
//!
//! Forward and backward of every adapted projection regenerate the mask (three passes over
//! the input per projection and step), so the hash is a 32-bit one computed sixteen lanes
//! at a time where the CPU has AVX-512: as scalar 64-bit code it cost 14% of a real-data
//! training step.

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
        self.factor_in(self.keys((i as u64 >> 32) as u32), i as u32)
    }

    /// The hash's two 32-bit keys for the block of 2³² elements numbered `block`: the seed
    /// through splitmix64's finaliser, once per block rather than once per element.
    #[inline(always)]
    fn keys(&self, block: u32) -> [u32; 2] {
        let mut z = self
            .seed
            .wrapping_add((block as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        [z as u32, (z >> 32) as u32]
    }

    /// [`Self::factor`] of the element at `low` within the block whose keys are given: two
    /// keyed rounds of a 32-bit integer hash, 32-bit multiplies only, so that sixteen elements
    /// go through one AVX-512 register (a 64-bit hash took 5% of a training step).
    #[inline(always)]
    fn factor_in(&self, keys: [u32; 2], low: u32) -> f32 {
        let h = mix32(mix32(low ^ keys[0]) ^ keys[1]);
        // 24 uniform bits → [0, 1), exactly representable in f32.
        let u = (h >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
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
    /// has AVX-512.
    fn combine_chunk<T: Elem, const ADD: bool>(&self, start: usize, dst: &mut [T], src: &[T]) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512vl")]
            fn avx512<T: Elem, const ADD: bool>(
                mask: &DropoutMask,
                start: usize,
                dst: &mut [T],
                src: &[T],
            ) {
                combine_imp::<T, ADD>(mask, start, dst, src)
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                // SAFETY: the CPU has avx512f/vl (checked just above).
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
    // A chunk never straddles two blocks of 2³² elements (CHUNK divides 2³²), so the keys
    // are the chunk's and the element's number within its block fits 32 bits.
    let keys = mask.keys((start as u64 >> 32) as u32);
    let low = start as u32;
    for (j, (d, s)) in dst.iter_mut().zip(src).enumerate() {
        // f32 → f64 → T is exact (and folds away for f32).
        let factor = mask.factor_in(keys, low.wrapping_add(j as u32));
        let v = *s * T::from_f64(factor as f64);
        *d = if ADD { *d + v } else { v };
    }
}

/// Chris Wellons' `lowbias32` integer hash (a bijection of u32 with near-ideal avalanche).
#[inline(always)]
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
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

    /// Masks of neighbouring seeds are independent of each other and of a shifted copy of
    /// themselves, and elements past 2³² (another block's keys) go through the chunk path too.
    #[test]
    fn masks_of_nearby_seeds_and_blocks_are_independent() {
        let keep = 0.5;
        let n = 100_000;
        let a = DropoutMask { seed: 7, keep };
        let b = DropoutMask { seed: 8, keep };
        let agree = |f: &dyn Fn(usize) -> bool| (0..n).filter(|&i| f(i)).count() as f64 / n as f64;
        // Independent fair masks agree on half the elements (± 4 standard deviations).
        let tol = 4.0 * (0.25 / n as f64).sqrt();
        for (what, share) in [
            ("seeds 7 and 8", agree(&|i| a.factor(i) == b.factor(i))),
            ("shifted by one", agree(&|i| a.factor(i) == a.factor(i + 1))),
            ("seed 8 shifted", agree(&|i| a.factor(i) == b.factor(i + 1))),
            (
                "blocks 0 and 1",
                agree(&|i| a.factor(i) == a.factor(i + (1 << 32))),
            ),
        ] {
            assert!((share - 0.5).abs() < tol, "{what}: agree on {share}");
        }
        let start = (3usize << 32) + CHUNK;
        let src = vec![1f32; 1000];
        let mut dst = vec![0f32; 1000];
        a.combine_chunk::<f32, false>(start, &mut dst, &src);
        assert!((0..1000).all(|j| dst[j] == a.factor(start + j)));
    }
}
