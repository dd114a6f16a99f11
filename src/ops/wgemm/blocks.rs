//! GGUF blocks of 32 weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) as a source of f32 weight panels.
//!
//! A quantized base used to be dequantised whole into a dense f32 scratch copy for every
//! product, which the packing then read again: two passes over four bytes a weight, and fresh
//! pages to fault in. Here each block goes straight from its bytes into the packed panel,
//! through candle's own `to_float`, so the panels hold bit for bit the values of a dequantised
//! copy and the product is unchanged.

use candle_core::quantized::k_quants::GgmlType;

use super::{WeightLayout, NR, QBLOCK as BLOCK};

/// A weight stored row-major in blocks of [`BLOCK`] along each row (a row a whole number
/// of blocks).
pub(crate) struct Blocks<'a, B>(pub &'a [B]);

impl<B: GgmlType> Blocks<'_, B> {
    /// The 32 values of block `index`.
    #[inline]
    fn values(&self, index: usize) -> [f32; BLOCK] {
        let mut out = [0f32; BLOCK];
        B::to_float(&self.0[index..index + 1], &mut out);
        out
    }
}

impl<B: GgmlType + Sync> super::x86::WeightSource<super::x86::F32> for Blocks<'_, B> {
    fn address(&self) -> usize {
        self.0.as_ptr() as usize
    }

    /// The panel of columns `j0 .. j0 + NR` of `op(w)` (`[k, n]`) as f32 bits, `[k][NR]`,
    /// missing columns zero. Transposed (`w` is `[n, k]`, blocks along k): column j is row
    /// j of `w`, each block filling 32 steps of one panel column. Plain (`w` is `[k, n]`,
    /// blocks along n): step p is row p's block at j0, which is exactly one panel row
    /// (`NR` = [`BLOCK`], and `j0` is a multiple of it).
    unsafe fn pack_panel(
        &self,
        dst: &mut [u32],
        k: usize,
        n: usize,
        j0: usize,
        layout: WeightLayout,
    ) {
        let dst = &mut dst[..k * NR];
        match layout {
            WeightLayout::Transposed => {
                let cols = NR.min(n - j0);
                let per_row = k / BLOCK;
                for b in 0..per_row {
                    // 32 steps × NR columns: 4 KiB that stay in L1 while every column fills.
                    let steps = &mut dst[b * BLOCK * NR..(b + 1) * BLOCK * NR];
                    for c in 0..cols {
                        let values = self.values((j0 + c) * per_row + b);
                        for (t, v) in values.into_iter().enumerate() {
                            steps[t * NR + c] = v.to_bits();
                        }
                    }
                    if cols < NR {
                        for row in steps.chunks_exact_mut(NR) {
                            row[cols..].fill(0);
                        }
                    }
                }
            }
            WeightLayout::Plain => {
                let per_row = n / BLOCK;
                for (p, row) in dst.chunks_exact_mut(NR).enumerate() {
                    let values = self.values(p * per_row + j0 / BLOCK);
                    for (d, v) in row.iter_mut().zip(values) {
                        *d = v.to_bits();
                    }
                }
            }
        }
    }
}
