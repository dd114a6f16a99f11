//! bf16 × bf16 → f32 matrix product on AVX-512 BF16 (`vdpbf16ps`), for frozen bf16 weights.
//!
//! `vdpbf16ps` adds, per f32 lane, `a0·b0 + a1·b1` over a *pair* of consecutive k, so both
//! operands are packed as u32 pairs of bf16:
//! - A (f32 activations) is rounded to bf16 (round-to-nearest-even, as `half::bf16::from_f32`)
//!   into micro-panels of `MR` = 12 rows, one per k block, laid out `[MR][KC_PAIRS]`: row r of
//!   the panel sits at a constant offset from one pointer, and the kernel broadcasts one u32
//!   (a pair) per row. (Row-major, so packing is a contiguous, vectorised conversion.)
//! - W is packed into column panels of `NR` = 32 columns laid out `[k/2][NR]` (two zmm per pair).
//!   Odd k is padded with a zero bf16; the last panel's missing columns are zero.
//!
//! The micro-kernel keeps a 12 × 32 f32 tile of C in 24 zmm accumulators. k is cut into blocks
//! of at most `KC_PAIRS` pairs, so a B micro-panel (≤ 20 KiB) stays in L1 while the A
//! micro-panels of a task stream past it from L2. Both operands are packed once per call, in
//! parallel, into the calling thread's scratch buffers, reused across calls (no page faults);
//! packing is O(m·k + k·n) against O(m·k·n) compute.
//!
//! Differences from an exact f32 product of the bf16-rounded inputs are only in f32 summation
//! order (bf16 × bf16 products are exact in f32), except that `vdpbf16ps` flushes denormal
//! inputs and outputs to zero (|x| < 1.2e-38).

// Wired into the LoRA linear by a separate change; until then only the tests call it.
#![cfg_attr(not(test), allow(dead_code))]

use candle_core::{bail, Result};
use half::bf16;

/// How the bf16 weight operand is laid out relative to the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WeightLayout {
    /// `c = a · wᵀ`, `w` is `[n, k]` row-major (forward of a linear layer `y = x·Wᵀ`).
    Transposed,
    /// `c = a · w`, `w` is `[k, n]` row-major (input gradient `dx = dy·W`).
    Plain,
}

/// True when the CPU can run the kernel (x86_64 with avx512f + avx512bw + avx512bf16).
/// std caches the CPUID probe, so this is a load and a test after the first call.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[m×n]` (row-major f32) `= (accumulate ? c : 0) + a[m×k] · op(w)`, with `a` row-major f32
/// rounded to bf16 (round-to-nearest-even) on the fly, `op(w)` per [`WeightLayout`], and f32
/// accumulation. Parallel over rayon's threads (a few large tasks per thread).
///
/// Errors when a slice length does not match its shape, or when [`available`] is false.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_bf16(
    c: &mut [f32],
    a: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    layout: WeightLayout,
    accumulate: bool,
) -> Result<()> {
    let (mk, kn, mn) = match (m.checked_mul(k), k.checked_mul(n), m.checked_mul(n)) {
        (Some(mk), Some(kn), Some(mn)) => (mk, kn, mn),
        _ => bail!("matmul_bf16: [{m}×{k}]·[{k}×{n}] overflows usize"),
    };
    if a.len() != mk || w.len() != kn || c.len() != mn {
        bail!(
            "matmul_bf16: a has {} elements for [{m}×{k}], w {} for {k}×{n}, c {} for [{m}×{n}]",
            a.len(),
            w.len(),
            c.len()
        );
    }
    if !available() {
        bail!("matmul_bf16: this CPU lacks avx512f + avx512bw + avx512bf16");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    x86::matmul(c, a, m, k, w, n, layout, accumulate);
    Ok(())
}

/// Rows of a micro-tile (24 zmm accumulators with `NR` = 32).
const MR: usize = 12;
/// Columns of a packed weight panel (two zmm of f32).
const NR: usize = 32;
/// Most k pairs per cache block: a B micro-panel is `KC_PAIRS · NR · 4` = 20 KiB (L1).
const KC_PAIRS: usize = 160;
/// Compute tasks per rayon thread.
const TASKS_PER_THREAD: usize = 4;

/// f32 → bf16 bits, round-to-nearest-even; NaN stays (quiet) NaN. Same as `bf16::from_f32`,
/// written branch-free so that it vectorises.
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x40;
    if (b & 0x7fff_ffff) > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// A u32 holding the bf16 pair (lo = even k, hi = odd k) as `vdpbf16ps` reads it.
#[inline(always)]
fn pair(lo: u32, hi: u32) -> u32 {
    lo | (hi << 16)
}

/// Rounds `src` (f32, `2·dst.len()` or one less) to bf16 pairs.
#[inline(always)]
fn to_pairs(dst: &mut [u32], src: &[f32]) {
    let pairs = src.chunks_exact(2);
    let tail = pairs.remainder();
    for (d, s) in dst.iter_mut().zip(pairs) {
        *d = pair(bf16_bits(s[0]), bf16_bits(s[1]));
    }
    if let ([.., d], [x]) = (&mut *dst, tail) {
        *d = bf16_bits(*x);
    }
}

/// Packs A rows `[rows × k]` (f32, rows ≤ MR) into one micro-panel per k block: block `b`
/// holds row `r`'s pairs `b·kc ..` at `dst[(b·MR + r)·KC_PAIRS ..]`, so the kernel reads row r
/// at a constant offset from one pointer.
#[inline(always)]
fn pack_a_panel(dst: &mut [u32], src: &[f32], rows: usize, k: usize, kc: usize) {
    for (r, row) in src.chunks_exact(k).take(rows).enumerate() {
        for (b, seg) in row.chunks(2 * kc).enumerate() {
            let d = &mut dst[(b * MR + r) * KC_PAIRS..][..seg.len().div_ceil(2)];
            to_pairs(d, seg);
        }
    }
}

/// Packs weight columns `j0 .. j0 + NR` (missing ones as zeros) into `[kp][NR]` bf16 pairs.
#[inline(always)]
fn pack_b_panel(dst: &mut [u32], w: &[bf16], k: usize, n: usize, j0: usize, layout: WeightLayout) {
    let kp = k.div_ceil(2);
    let cols = NR.min(n - j0);
    let bits = |x: bf16| u32::from(x.to_bits());
    match layout {
        WeightLayout::Transposed => {
            // Column j of op(w) is row j of w: a pair is two adjacent elements of that row.
            // Transposed 16 pairs at a time so the writes stay within 2 KiB.
            const PB: usize = 16;
            for p0 in (0..kp).step_by(PB) {
                let np = PB.min(kp - p0);
                let d = &mut dst[p0 * NR..(p0 + np) * NR];
                for c in 0..cols {
                    let row = &w[(j0 + c) * k..(j0 + c + 1) * k];
                    let seg = &row[2 * p0..(2 * (p0 + np)).min(k)];
                    let pairs = seg.chunks_exact(2);
                    if let [x] = pairs.remainder() {
                        d[(np - 1) * NR + c] = bits(*x);
                    }
                    for (q, s) in pairs.enumerate() {
                        d[q * NR + c] = pair(bits(s[0]), bits(s[1]));
                    }
                }
                if cols < NR {
                    for q in 0..np {
                        d[q * NR + cols..(q + 1) * NR].fill(0);
                    }
                }
            }
        }
        WeightLayout::Plain => {
            // Interleave rows 2p and 2p+1 of w.
            for p in 0..kp {
                let d = &mut dst[p * NR..(p + 1) * NR];
                let lo = &w[2 * p * n + j0..2 * p * n + j0 + cols];
                if 2 * p + 1 < k {
                    let hi = &w[(2 * p + 1) * n + j0..(2 * p + 1) * n + j0 + cols];
                    for ((d, l), h) in d.iter_mut().zip(lo).zip(hi) {
                        *d = pair(bits(*l), bits(*h));
                    }
                } else {
                    for (d, l) in d.iter_mut().zip(lo) {
                        *d = bits(*l);
                    }
                }
                d[cols..].fill(0);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{pack_a_panel, pack_b_panel, WeightLayout, KC_PAIRS, MR, NR, TASKS_PER_THREAD};
    use half::bf16;
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    thread_local! {
        /// Packed A and B of the last call on this thread, kept to avoid re-faulting pages.
        static SCRATCH: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// The caller's C, shared by tasks that write disjoint tiles of it.
    #[derive(Clone, Copy)]
    struct CPtr(*mut f32);
    // SAFETY: tasks only write disjoint (row range × column range) rectangles of C (see
    // `matmul`), so sharing the pointer between threads creates no data race.
    unsafe impl Send for CPtr {}
    unsafe impl Sync for CPtr {}

    impl CPtr {
        /// A method, so that closures capture the whole (Sync) wrapper, not the raw field.
        fn get(self) -> *mut f32 {
            self.0
        }
    }

    /// Shapes were checked by the caller: `a.len() == m·k`, `w.len() == k·n`,
    /// `c.len() == m·n`, all of m, k, n > 0, and the CPU has avx512f/bw/bf16.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul(
        c: &mut [f32],
        a: &[f32],
        m: usize,
        k: usize,
        w: &[bf16],
        n: usize,
        layout: WeightLayout,
        accumulate: bool,
    ) {
        let kp = k.div_ceil(2);
        let row_panels = m.div_ceil(MR);
        let col_panels = n.div_ceil(NR);
        let k_blocks = kp.div_ceil(KC_PAIRS);
        let kc = kp.div_ceil(k_blocks);
        let a_panel = k_blocks * MR * KC_PAIRS;
        let fresh = || (Vec::new(), Vec::new());
        SCRATCH.with(|s| {
            // A nested call on this thread (a rayon worker stealing work) gets its own buffers.
            let mut guard = s.try_borrow_mut().ok();
            let mut own = fresh();
            let (pa, pb) = match guard.as_deref_mut() {
                Some(bufs) => (&mut bufs.0, &mut bufs.1),
                None => (&mut own.0, &mut own.1),
            };
            // Packing writes every element the kernel reads (the pair padding of A's row blocks
            // and the missing rows of its last panel keep stale values that are never read).
            pa.resize(row_panels * a_panel, 0);
            pb.resize(col_panels * NR * kp, 0);
            rayon::join(
                || {
                    pa.par_chunks_mut(a_panel)
                        .zip(a.par_chunks(MR * k))
                        // SAFETY: the CPU has avx512f/bw (checked by `matmul_bf16`).
                        .for_each(|(dst, src)| unsafe { pack_a(dst, src, k, kc) })
                },
                || {
                    pb.par_chunks_mut(NR * kp)
                        .enumerate()
                        // SAFETY: as above.
                        .for_each(|(j, dst)| unsafe { pack_b(dst, w, k, n, j * NR, layout) })
                },
            );
            let (pa, pb) = (&pa[..], &pb[..]);

            // Task grid: rows first (each task's A panels then stay in its core's L2), columns
            // only when there are too few row panels to occupy the threads.
            let target = rayon::current_num_threads().max(1) * TASKS_PER_THREAD;
            let row_tasks = row_panels.min(target);
            let col_tasks = col_panels.min(target.div_ceil(row_tasks));
            let cptr = CPtr(c.as_mut_ptr());
            (0..row_tasks * col_tasks).into_par_iter().for_each(|t| {
                let (ti, tj) = (t / col_tasks, t % col_tasks);
                let (i0, i1) = (
                    ti * row_panels / row_tasks,
                    (ti + 1) * row_panels / row_tasks,
                );
                let (j0, j1) = (
                    tj * col_panels / col_tasks,
                    (tj + 1) * col_panels / col_tasks,
                );
                for (blk, p0) in (0..kp).step_by(kc).enumerate() {
                    let pairs = kc.min(kp - p0);
                    let load = accumulate || p0 > 0;
                    for j in j0..j1 {
                        let cols = NR.min(n - j * NR);
                        let b = &pb[j * NR * kp + p0 * NR..][..pairs * NR];
                        for i in i0..i1 {
                            let rows = MR.min(m - i * MR);
                            let a = &pa[i * a_panel + blk * MR * KC_PAIRS..][..MR * KC_PAIRS];
                            // SAFETY: the CPU has avx512f/bw/bf16 (checked by `matmul_bf16`);
                            // the tile rows i·MR .. +rows, columns j·NR .. +cols lie inside
                            // C (m × n, row-major) and belong to this task only (tasks split
                            // row and column panel ranges without overlap).
                            unsafe {
                                tile(
                                    rows,
                                    a,
                                    b,
                                    pairs,
                                    cptr.get().add(i * MR * n + j * NR),
                                    n,
                                    cols,
                                    load,
                                )
                            };
                        }
                    }
                }
            });
        });
    }

    /// [`pack_a_panel`] compiled for AVX-512.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn pack_a(dst: &mut [u32], src: &[f32], k: usize, kc: usize) {
        pack_a_panel(dst, src, src.len() / k, k, kc)
    }

    /// [`pack_b_panel`] compiled for AVX-512.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn pack_b(dst: &mut [u32], w: &[bf16], k: usize, n: usize, j0: usize, layout: WeightLayout) {
        pack_b_panel(dst, w, k, n, j0, layout)
    }

    /// Dispatches to the micro-kernel compiled for `rows` (1 ..= MR).
    ///
    /// # Safety
    /// As for [`kernel`].
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile(
        rows: usize,
        a: &[u32],
        b: &[u32],
        pairs: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        load: bool,
    ) {
        macro_rules! by_rows {
            ($($r:literal)*) => {
                match rows {
                    $($r => unsafe { kernel::<$r>(a, b, pairs, c, ldc, cols, load) },)*
                    _ => unreachable!("micro-tile rows {rows} > {MR}"),
                }
            };
        }
        by_rows!(12 11 10 9 8 7 6 5 4 3 2 1)
    }

    /// `C[R × cols] = (load ? C : 0) + A·B` over `pairs` k-pairs, where row r of A is
    /// `a[r·KC_PAIRS ..][..pairs]` and `b` is `[pairs][NR]` (u32 bf16 pairs), and C's row r
    /// starts at `c + r·ldc`.
    ///
    /// # Safety
    /// The CPU supports avx512f, avx512bw and avx512bf16; `c + r·ldc + j` for r < R,
    /// j < cols ≤ NR is valid for reads and writes and not accessed by anyone else meanwhile.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn kernel<const R: usize>(
        a: &[u32],
        b: &[u32],
        pairs: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        load: bool,
    ) {
        assert!(pairs <= KC_PAIRS && a.len() >= R * KC_PAIRS && b.len() >= pairs * NR);
        assert!(cols <= NR);
        let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
        let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(16)));
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if load {
            for (r, acc) in acc.iter_mut().enumerate() {
                // Masked-off lanes are never accessed, so the pointers may run past C.
                let row = c.wrapping_add(r * ldc);
                // SAFETY: only lanes j < cols are read (see the function's contract).
                unsafe {
                    acc[0] = _mm512_maskz_loadu_ps(m0, row);
                    acc[1] = _mm512_maskz_loadu_ps(m1, row.wrapping_add(16));
                }
            }
        }
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for p in 0..pairs {
            // SAFETY: p < pairs ≤ KC_PAIRS, `b` holds pairs·NR elements and `a` R·KC_PAIRS.
            let (b0, b1, acol) = unsafe {
                let bq = bp.add(p * NR);
                (
                    as_bh(_mm512_loadu_si512(bq.cast())),
                    as_bh(_mm512_loadu_si512(bq.add(16).cast())),
                    ap.add(p),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: r < R (see above).
                let av = as_bh(_mm512_set1_epi32(
                    unsafe { acol.add(r * KC_PAIRS).read() } as i32
                ));
                // Broadcast operand last: the slot that may take a `{1to16}` memory operand.
                acc[0] = _mm512_dpbf16_ps(acc[0], b0, av);
                acc[1] = _mm512_dpbf16_ps(acc[1], b1, av);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let row = c.wrapping_add(r * ldc);
            // SAFETY: only lanes j < cols are written (see the function's contract).
            unsafe {
                _mm512_mask_storeu_ps(row, m0, acc[0]);
                _mm512_mask_storeu_ps(row.wrapping_add(16), m1, acc[1]);
            }
        }
    }

    /// Reinterprets 32 packed bf16 (as 16 u32) for `vdpbf16ps`.
    #[inline(always)]
    fn as_bh(v: __m512i) -> __m512bh {
        // SAFETY: both are plain 64-byte SIMD vectors; every bit pattern is valid for both.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn rand_vec(rng: &mut StdRng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// f64 product of the bf16-rounded inputs, and Σ|a|·|w| (+|c|) per element for the error
    /// scale (the kernel's only difference is f32 summation order).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        c0: &[f32],
        a: &[f32],
        m: usize,
        k: usize,
        w: &[bf16],
        n: usize,
        layout: WeightLayout,
        accumulate: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let ar: Vec<f64> = a.iter().map(|x| bf16::from_f32(*x).to_f64()).collect();
        let wv = |kk: usize, j: usize| match layout {
            WeightLayout::Transposed => w[j * k + kk].to_f64(),
            WeightLayout::Plain => w[kk * n + j].to_f64(),
        };
        let (mut out, mut scale) = (vec![0.0; m * n], vec![0.0; m * n]);
        for i in 0..m {
            for j in 0..n {
                let init = if accumulate {
                    c0[i * n + j] as f64
                } else {
                    0.0
                };
                let (mut s, mut abs) = (init, init.abs());
                for kk in 0..k {
                    let x = ar[i * k + kk] * wv(kk, j);
                    s += x;
                    abs += x.abs();
                }
                out[i * n + j] = s;
                scale[i * n + j] = abs;
            }
        }
        (out, scale)
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            1.0 + f32::EPSILON,
            1.003_906_3, // exactly halfway between two bf16, even below
            1.011_718_8, // exactly halfway, even above
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let mut rng = StdRng::seed_from_u64(1);
        let randoms = (0..10_000).map(|_| f32::from_bits(rng.random::<u32>()));
        for x in specials.into_iter().chain(randoms) {
            let want = bf16::from_f32(x);
            let got = bf16::from_bits(bf16_bits(x) as u16);
            if x.is_nan() {
                assert!(got.is_nan(), "{x:e}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{x:e}");
            }
        }
    }

    #[test]
    fn bf16_gemm_matches_f64_reference() {
        if !available() {
            eprintln!("skipping bf16_gemm_matches_f64_reference: no avx512bf16 on this CPU");
            return;
        }
        let mut rng = StdRng::seed_from_u64(7);
        let mut cases = 0;
        for &m in &[1usize, 7, 13, 100] {
            for &k in &[1usize, 3, 17, 576, 1536] {
                for &n in &[1usize, 5, 33, 192, 576] {
                    for layout in [WeightLayout::Transposed, WeightLayout::Plain] {
                        for accumulate in [false, true] {
                            let a = rand_vec(&mut rng, m * k);
                            let w: Vec<bf16> = rand_vec(&mut rng, k * n)
                                .into_iter()
                                .map(bf16::from_f32)
                                .collect();
                            let c0 = rand_vec(&mut rng, m * n);
                            let mut c = c0.clone();
                            matmul_bf16(&mut c, &a, m, k, &w, n, layout, accumulate).unwrap();
                            let (want, scale) = reference(&c0, &a, m, k, &w, n, layout, accumulate);
                            for (idx, ((g, r), s)) in c.iter().zip(&want).zip(&scale).enumerate() {
                                let err = (*g as f64 - r).abs();
                                assert!(
                                    err <= 1e-5 * s.max(f64::MIN_POSITIVE),
                                    "m={m} k={k} n={n} {layout:?} acc={accumulate} \
                                     at ({}, {}): got {g}, want {r} (scale {s})",
                                    idx / n,
                                    idx % n
                                );
                            }
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 400);
    }

    #[test]
    fn bf16_gemm_large_m_tiles_and_k_blocks() {
        // Several row tasks, the 4-row tail panel, three k blocks with an odd last pair.
        if !available() {
            eprintln!("skipping bf16_gemm_large_m_tiles_and_k_blocks: no avx512bf16");
            return;
        }
        let (m, k, n) = (1024, 481, 40);
        let mut rng = StdRng::seed_from_u64(3);
        let a = rand_vec(&mut rng, m * k);
        let w: Vec<bf16> = rand_vec(&mut rng, k * n)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        for layout in [WeightLayout::Transposed, WeightLayout::Plain] {
            let mut c = vec![f32::NAN; m * n];
            matmul_bf16(&mut c, &a, m, k, &w, n, layout, false).unwrap();
            let (want, scale) = reference(&c, &a, m, k, &w, n, layout, false);
            for ((g, r), s) in c.iter().zip(&want).zip(&scale) {
                assert!((*g as f64 - r).abs() <= 1e-5 * s, "{layout:?}: {g} vs {r}");
            }
        }
    }

    #[test]
    fn bf16_gemm_rejects_bad_shapes() {
        let w = vec![bf16::ZERO; 6];
        let mut c = vec![0.0f32; 4];
        let a = vec![0.0f32; 6];
        let layout = WeightLayout::Plain;
        assert!(matmul_bf16(&mut c, &a, 2, 3, &w, 3, layout, false).is_err()); // c too short
        assert!(matmul_bf16(&mut c, &a[..5], 2, 3, &w, 2, layout, false).is_err());
        assert!(matmul_bf16(&mut c, &a, 2, 3, &w[..5], 2, layout, false).is_err());
        assert_eq!(
            matmul_bf16(&mut c, &a, 2, 3, &w, 2, layout, false).is_ok(),
            available()
        );
    }

    #[test]
    fn bf16_gemm_k_zero() {
        if !available() {
            eprintln!("skipping bf16_gemm_k_zero: no avx512bf16");
            return;
        }
        let mut c = vec![2.0f32; 6];
        matmul_bf16(&mut c, &[], 2, 0, &[], 3, WeightLayout::Transposed, true).unwrap();
        assert_eq!(c, vec![2.0; 6]);
        matmul_bf16(&mut c, &[], 2, 0, &[], 3, WeightLayout::Transposed, false).unwrap();
        assert_eq!(c, vec![0.0; 6]);
    }

    /// GFLOP/s on the training shapes. Run with
    /// `cargo test --release --lib bf16_gemm_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bf16_gemm_throughput() {
        if !available() {
            eprintln!("skipping bf16_gemm_throughput: no avx512bf16");
            return;
        }
        let mut rng = StdRng::seed_from_u64(5);
        let threads = rayon::current_num_threads();
        for (m, k, n) in [
            (1024, 576, 576),
            (1024, 576, 1536),
            (1024, 1536, 576),
            (1024, 576, 192),
        ] {
            let a = rand_vec(&mut rng, m * k);
            let w: Vec<bf16> = rand_vec(&mut rng, k * n)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let mut c = vec![0.0f32; m * n];
            for layout in [WeightLayout::Transposed, WeightLayout::Plain] {
                let flops = 2.0 * (m * k * n) as f64;
                let run = |c: &mut [f32]| matmul_bf16(c, &a, m, k, &w, n, layout, false).unwrap();
                run(&mut c);
                // Best of 15 rounds of ~20 ms: the fastest round is the one least disturbed
                // by other processes on a shared machine.
                let iters = ((0.02 * 300e9 / flops) as usize).max(2);
                let mut best = f64::INFINITY;
                for _ in 0..15 {
                    let t = std::time::Instant::now();
                    for _ in 0..iters {
                        run(&mut c);
                    }
                    best = best.min(t.elapsed().as_secs_f64() / iters as f64);
                }
                println!(
                    "bf16 gemm m={m:5} k={k:5} n={n:5} {layout:>10?}: {:6.1} GFLOP/s ({:.3} ms, {threads} threads)",
                    flops / best / 1e9,
                    best * 1e3
                );
            }
        }
    }
}
