//! The AVX-512 implementation behind [`super`]: the [`Kind`]s (bf16, f32), weight and activation
//! packing, the 12 × 32 micro-kernel and the task split. Compiled only on x86_64; every
//! `#[target_feature]` function is reached only after the CPUID checks in the parent module.

use super::super::kernel::with_thread_buffer;
use super::{to_pairs, PackCache, PanelKey, WeightLayout, MR, NR, TASKS_PER_THREAD, W_CHUNK_BYTES};
use half::bf16;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// What differs between weight element types. A packed k *step* is one u32 for both: a
/// bf16 pair or the bits of one f32.
pub(super) trait Kind: 'static {
    /// The weight element.
    type W: Copy + Sync;
    /// k values per step.
    const KU: usize;
    /// Most steps per k block: a W micro-panel is `KC · NR · 4` bytes (L1).
    const KC: usize;

    /// Whether A is packed (converted) per task and k block; when false the kernel reads
    /// the caller's rows in place (f32 bits), `k` apart.
    const PACK_A: bool;

    /// The weight's bits, placed in a step at `32 / KU · u` for the u-th k of the step.
    fn bits(w: Self::W) -> u32;

    /// Packs a segment of an activation row (`KU·dst.len()` f32 or fewer) into steps.
    fn pack_a(dst: &mut [u32], src: &[f32]);

    /// Packs rows `j0 .. j0 + cols` (≤ NR) of a `[n, k]` weight as the columns of a
    /// `[steps][NR]` panel (missing columns zero): a transposition.
    ///
    /// # Safety
    /// The CPU has avx512f/bw; only called inlined into code compiled for them.
    unsafe fn pack_w_transposed(dst: &mut [u32], w: &[Self::W], k: usize, j0: usize, cols: usize);

    /// Packs columns `j0 .. j0 + cols` (≤ NR) of a `[k, n]` weight into a `[steps][NR]` panel
    /// (missing columns zero): step p interleaves rows `KU·p ..` of those columns.
    ///
    /// # Safety
    /// The CPU has avx512f/bw; only called inlined into code compiled for them.
    #[inline(always)]
    unsafe fn pack_w_plain(
        dst: &mut [u32],
        w: &[Self::W],
        k: usize,
        n: usize,
        j0: usize,
        cols: usize,
    ) where
        Self: Sized,
    {
        interleave_scalar::<Self>(dst, w, k, n, j0, cols)
    }

    /// `acc += a · b` on one step: `a` (one step of an A row) broadcast against the two
    /// zmm `b` of the W panel.
    ///
    /// # Safety
    /// The CPU has the features of [`Kind::tile`]; only called inlined into it.
    unsafe fn madd(acc: &mut [__m512; 2], b: [__m512i; 2], a: u32);

    /// [`tile_rows`] compiled with the instructions [`Kind::madd`] needs.
    ///
    /// # Safety
    /// As for [`kernel`]; the CPU has this kind's features.
    unsafe fn tile(t: Tile<'_>);
}

/// bf16 weights, activations rounded to bf16: `vdpbf16ps` on k pairs.
pub(super) struct Bf16;

impl Kind for Bf16 {
    type W = bf16;
    const KU: usize = 2;
    const KC: usize = 160;
    const PACK_A: bool = true;

    #[inline(always)]
    fn bits(w: bf16) -> u32 {
        u32::from(w.to_bits())
    }

    #[inline(always)]
    fn pack_a(dst: &mut [u32], src: &[f32]) {
        to_pairs(dst, src)
    }

    /// With k even a step is one aligned u32 of a weight row, so packing is the f32
    /// transposition on u32 (the scalar default cost 20% of a training step's time on AMX).
    #[inline(always)]
    unsafe fn pack_w_transposed(dst: &mut [u32], w: &[bf16], k: usize, j0: usize, cols: usize) {
        if k.is_multiple_of(2) {
            assert!(w.len() >= (j0 + cols) * k);
            // SAFETY: rows j0 .. j0 + cols of k / 2 bf16 pairs lie inside `w` (asserted); the
            // loads are unaligned; avx512f per the contract.
            unsafe { transpose_panel(dst, w.as_ptr().cast(), k / 2, j0, cols) }
        } else {
            transpose_scalar::<Self>(dst, w, k, j0, cols)
        }
    }

    /// Two rows' 32 columns interleaved in registers, each step written once (the scalar
    /// default writes every step twice, a read-modify-write: ~2% of a bf16 training step).
    #[inline(always)]
    unsafe fn pack_w_plain(
        dst: &mut [u32],
        w: &[bf16],
        k: usize,
        n: usize,
        j0: usize,
        cols: usize,
    ) {
        let steps = k.div_ceil(2);
        assert!(cols <= NR && j0 + cols <= n && w.len() >= k * n && dst.len() >= steps * NR);
        // Word 2i of a half is column i of the even row, word 2i + 1 column i of the odd row
        // (index bit 5 picks the second source).
        let (lo, hi): ([i16; 32], [i16; 32]) = (
            std::array::from_fn(|t| (t / 2 + 32 * (t % 2)) as i16),
            std::array::from_fn(|t| (16 + t / 2 + 32 * (t % 2)) as i16),
        );
        let mask: __mmask32 = if cols == 32 { !0 } else { (1u32 << cols) - 1 };
        // SAFETY: avx512f/bw (the contract). Loads read columns j0 .. j0 + cols (masked) of
        // rows < k, inside `w` (asserted); stores write steps·NR u32 of `dst` (asserted).
        unsafe {
            let (lo, hi) = (
                _mm512_loadu_si512(lo.as_ptr().cast()),
                _mm512_loadu_si512(hi.as_ptr().cast()),
            );
            let row = |r: usize| _mm512_maskz_loadu_epi16(mask, w.as_ptr().add(r * n + j0).cast());
            for p in 0..steps {
                // The rows are n apart: the hardware prefetchers do not follow them across
                // pages, so fetch 8 steps ahead (prefetches never fault).
                let ahead = w.as_ptr().wrapping_add((2 * p + 16) * n + j0).cast::<i8>();
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(2 * n));
                let even = row(2 * p);
                let odd = if 2 * p + 1 < k {
                    row(2 * p + 1)
                } else {
                    _mm512_setzero_si512()
                };
                let d = dst.as_mut_ptr().add(p * NR);
                _mm512_storeu_si512(d.cast(), _mm512_permutex2var_epi16(even, lo, odd));
                _mm512_storeu_si512(d.add(16).cast(), _mm512_permutex2var_epi16(even, hi, odd));
            }
        }
    }

    #[inline(always)]
    unsafe fn madd(acc: &mut [__m512; 2], b: [__m512i; 2], a: u32) {
        let av = as_bh(_mm512_set1_epi32(a as i32));
        // Broadcast operand last: the slot that may take a `{1to16}` memory operand.
        acc[0] = _mm512_dpbf16_ps(acc[0], as_bh(b[0]), av);
        acc[1] = _mm512_dpbf16_ps(acc[1], as_bh(b[1]), av);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile(t: Tile<'_>) {
        // SAFETY: forwarded contract; the features are enabled here.
        unsafe { tile_rows::<Self>(t) }
    }
}

/// f32 weights and activations: `vfmadd231ps` on single k.
pub(super) struct F32;

impl Kind for F32 {
    type W = f32;
    const KU: usize = 1;
    /// 24 KiB panels: 128 and 256 measured 2–6% slower on the 1024-row products.
    const KC: usize = 192;
    const PACK_A: bool = false;

    #[inline(always)]
    fn bits(w: f32) -> u32 {
        w.to_bits()
    }

    #[inline(always)]
    fn pack_a(dst: &mut [u32], src: &[f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_bits();
        }
    }

    /// In 16 × 16 blocks transposed in registers (the scalar transposition of the default
    /// costs ~7 cycles an element, which showed as 13% of a 1024×576×576 product).
    #[inline(always)]
    unsafe fn pack_w_transposed(dst: &mut [u32], w: &[f32], k: usize, j0: usize, cols: usize) {
        assert!(w.len() >= (j0 + cols) * k);
        // SAFETY: rows j0 .. j0 + cols of k f32 each lie inside `w` (asserted); avx512f per
        // the contract.
        unsafe { transpose_panel(dst, w.as_ptr().cast(), k, j0, cols) }
    }

    #[inline(always)]
    unsafe fn madd(acc: &mut [__m512; 2], b: [__m512i; 2], a: u32) {
        let av = _mm512_set1_ps(f32::from_bits(a));
        acc[0] = _mm512_fmadd_ps(_mm512_castsi512_ps(b[0]), av, acc[0]);
        acc[1] = _mm512_fmadd_ps(_mm512_castsi512_ps(b[1]), av, acc[1]);
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn tile(t: Tile<'_>) {
        // SAFETY: forwarded contract; the features are enabled here.
        unsafe { tile_rows::<Self>(t) }
    }
}

thread_local! {
    /// The packed W of the last call made on this thread, and the A block of the last task
    /// run on it: kept to avoid re-faulting pages.
    static W_SCRATCH: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static A_SCRATCH: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Where a product's weight panels come from: a dense weight of the kind's element type
/// (packed by [`pack_b`]), or GGUF blocks dequantised straight into the panels
/// (`super::blocks`).
pub(super) trait WeightSource<K: Kind>: Sync {
    /// The weight's address, which keys its kept panels.
    fn address(&self) -> usize;

    /// Writes the `[⌈k / KU⌉][NR]` steps of the panel of columns `j0 .. j0 + NR` of
    /// `op(w)` (`[k, n]`; columns past n zero) into `dst`.
    ///
    /// # Safety
    /// The CPU has avx512f/bw.
    unsafe fn pack_panel(
        &self,
        dst: &mut [u32],
        k: usize,
        n: usize,
        j0: usize,
        layout: WeightLayout,
    );
}

impl<K: Kind> WeightSource<K> for [K::W] {
    fn address(&self) -> usize {
        self.as_ptr() as usize
    }

    unsafe fn pack_panel(
        &self,
        dst: &mut [u32],
        k: usize,
        n: usize,
        j0: usize,
        layout: WeightLayout,
    ) {
        // SAFETY: forwarded contract.
        unsafe { pack_b::<K>(dst, self, k, n, j0, layout) }
    }
}

/// The caller's C, shared by tasks that write disjoint tiles of it.
#[derive(Clone, Copy)]
pub(super) struct CPtr(*mut f32);
// SAFETY: tasks only write disjoint (row range × column range) rectangles of C (see
// `matmul`), so sharing the pointer between threads creates no data race.
unsafe impl Send for CPtr {}
// SAFETY: as for `Send`: the tiles written through a shared `CPtr` never overlap.
unsafe impl Sync for CPtr {}

impl CPtr {
    /// A method, so that closures capture the whole (Sync) wrapper, not the raw field.
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Shapes were checked by the caller: `a.len() == m·k`, `w.len() == k·n`,
/// `c.len() == m·n`, all of m, k, n > 0, and the CPU has `K`'s features.
///
/// W (or a column chunk of it) is packed whole, in parallel, before the tasks start (every
/// task reads all of it). A is not packed up front: that cost 4–8% of an f32 product in
/// memory traffic. A bf16 task rounds its own rows one k block at a time into a buffer
/// that stays in its core's L2; f32 reads A in place (1–2% faster again than that).
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul<K: Kind, S: WeightSource<K> + ?Sized>(
    c: &mut [f32],
    a: &[f32],
    m: usize,
    k: usize,
    w: &S,
    n: usize,
    layout: WeightLayout,
    accumulate: bool,
    cache: Option<&PackCache>,
) {
    let ks = k.div_ceil(K::KU);
    let row_panels = m.div_ceil(MR);
    let kc = ks.div_ceil(ks.div_ceil(K::KC));
    // SAFETY: f32 and u32 have the same size and alignment, and every bit pattern is valid
    // for both.
    let a_bits: &[u32] = unsafe { std::slice::from_raw_parts(a.as_ptr().cast(), a.len()) };
    for_each_task::<K, S>(c, w, k, n, ks, layout, cache, row_panels, |task, pa| {
        let Task {
            rows: (i0, i1),
            panels: (j0, j1),
            jlo,
            pb,
            c: cptr,
        } = task;
        let rows = &a[i0 * MR * k..(i1 * MR).min(m) * k];
        // Row r of the block at pa[r·KC ..]; rows past m are never read.
        if K::PACK_A {
            pa.resize((i1 - i0) * MR * K::KC, 0);
        }
        for p0 in (0..ks).step_by(kc) {
            let steps = kc.min(ks - p0);
            let k0 = K::KU * p0;
            if K::PACK_A {
                // SAFETY: the CPU has avx512f/bw (checked by the caller).
                unsafe { pack_a::<K>(pa, rows, k, k0, (K::KU * steps).min(k - k0)) };
            }
            let load = accumulate || p0 > 0;
            for j in j0..j1 {
                let cols = NR.min(n - jlo - j * NR);
                let b = &pb[j * NR * ks + p0 * NR..][..steps * NR];
                for i in i0..i1 {
                    let rows = MR.min(m - i * MR);
                    let (a, lda) = if K::PACK_A {
                        (&pa[(i - i0) * MR * K::KC..][..MR * K::KC], K::KC)
                    } else {
                        (
                            &a_bits[i * MR * k + k0..(i * MR + rows - 1) * k + k0 + steps],
                            k,
                        )
                    };
                    // SAFETY: the CPU has K's features (checked by the caller);
                    // the tile rows i·MR .. +rows, columns j·NR .. +cols lie
                    // inside C (m × n, row-major) and belong to this task only
                    // (tasks split row and column panel ranges without overlap).
                    unsafe {
                        K::tile(Tile {
                            rows,
                            a,
                            lda,
                            b,
                            steps,
                            c: cptr.get().add(i * MR * n + jlo + j * NR),
                            ldc: n,
                            cols,
                            load,
                        })
                    };
                }
            }
        }
    });
}

/// One parallel task of a product, as [`for_each_task`] hands it out: row units `i0 .. i1`
/// (`rows`) and column panels `j0 .. j1` (`panels`) of the column chunk that starts at `jlo`,
/// whose packed panels are `pb`, and the caller's C.
pub(super) struct Task<'p> {
    pub(super) rows: (usize, usize),
    pub(super) panels: (usize, usize),
    pub(super) jlo: usize,
    pub(super) pb: &'p [u32],
    pub(super) c: CPtr,
}

/// The frame both kernels share: W packed chunk by chunk ([`chunk_cols`], [`pack_panels`]
/// with `ksp` steps a column) into this thread's scratch, or taken from the weight's `cache`
/// (packed whole on first use), then `task` run in parallel on each chunk's [`TaskGrid`] over
/// `row_units`, with the running thread's A scratch.
#[allow(clippy::too_many_arguments)]
pub(super) fn for_each_task<K: Kind, S: WeightSource<K> + ?Sized>(
    c: &mut [f32],
    w: &S,
    k: usize,
    n: usize,
    ksp: usize,
    layout: WeightLayout,
    cache: Option<&PackCache>,
    row_units: usize,
    task: impl Fn(Task<'_>, &mut Vec<u32>) + Sync,
) {
    let chunk_cols = chunk_cols(n, ksp);
    let cptr = CPtr(c.as_mut_ptr());
    let all_panels = n.div_ceil(NR);
    let cached = cache.and_then(|cache| {
        let key = PanelKey::new::<K>(w.address(), k, n, ksp, layout);
        cache.panels(key, all_panels * NR * ksp, |pb| {
            pack_panels::<K, S>(pb, w, k, n, 0, all_panels, ksp, layout);
        })
    });
    with_thread_buffer(&W_SCRATCH, |scratch| {
        for jlo in (0..n).step_by(chunk_cols) {
            let col_panels = chunk_cols.min(n - jlo).div_ceil(NR);
            // Chunks start on a panel boundary (`chunk_cols` is a multiple of NR, or n).
            let pb: &[u32] = match &cached {
                Some(panels) => &panels[jlo / NR * NR * ksp..][..col_panels * NR * ksp],
                None => pack_panels::<K, S>(scratch, w, k, n, jlo, col_panels, ksp, layout),
            };
            let grid = TaskGrid::new(row_units, col_panels);
            (0..grid.len()).into_par_iter().for_each(|t| {
                let (rows, panels) = grid.task(t);
                let c = cptr;
                with_thread_buffer(&A_SCRATCH, |pa| {
                    task(
                        Task {
                            rows,
                            panels,
                            jlo,
                            pb,
                            c,
                        },
                        pa,
                    )
                });
            });
        }
    });
}

/// Columns per chunk of a wide product (an lm_head): a chunk's packed W (`ksp` steps a
/// column) stays in cache, unless a chunk would be so narrow that re-reading A for each costs
/// more (long k); then all `n` at once.
pub(super) fn chunk_cols(n: usize, ksp: usize) -> usize {
    let chunk_panels = W_CHUNK_BYTES / (4 * NR * ksp);
    if chunk_panels >= 4 {
        chunk_panels * NR
    } else {
        n
    }
}

/// Packs `col_panels` panels of W's columns from `jlo` into `pb`, in parallel, each
/// `[ksp][NR]` with the steps past k (up to `ksp` ≥ ⌈k / KU⌉) zero, and returns them.
/// Packing writes every element the kernels read.
#[allow(clippy::too_many_arguments)]
fn pack_panels<'p, K: Kind, S: WeightSource<K> + ?Sized>(
    pb: &'p mut Vec<u32>,
    w: &S,
    k: usize,
    n: usize,
    jlo: usize,
    col_panels: usize,
    ksp: usize,
    layout: WeightLayout,
) -> &'p [u32] {
    let ks = k.div_ceil(K::KU);
    pb.resize(col_panels * NR * ksp, 0);
    pb.par_chunks_mut(NR * ksp)
        .enumerate()
        .for_each(|(j, dst)| {
            let (steps, pad) = dst.split_at_mut(NR * ks);
            // SAFETY: the CPU has avx512f/bw (every caller checked it).
            unsafe { w.pack_panel(steps, k, n, jlo + j * NR, layout) };
            pad.fill(0);
        });
    &pb[..]
}

/// How a product is cut into parallel tasks: rows first (each task's A block then stays in
/// its core's L2), columns only when there are too few row units to occupy the threads.
#[derive(Clone, Copy)]
struct TaskGrid {
    row_units: usize,
    col_panels: usize,
    row_tasks: usize,
    col_tasks: usize,
}

impl TaskGrid {
    fn new(row_units: usize, col_panels: usize) -> Self {
        let target = rayon::current_num_threads().max(1) * TASKS_PER_THREAD;
        let row_tasks = row_units.min(target);
        let col_tasks = col_panels.min(target.div_ceil(row_tasks));
        Self {
            row_units,
            col_panels,
            row_tasks,
            col_tasks,
        }
    }

    fn len(&self) -> usize {
        self.row_tasks * self.col_tasks
    }

    /// Task `t`'s row units `i0 .. i1` and column panels `j0 .. j1`: tasks never overlap.
    fn task(&self, t: usize) -> ((usize, usize), (usize, usize)) {
        let (ti, tj) = (t / self.col_tasks, t % self.col_tasks);
        let split =
            |i: usize, parts: usize, total: usize| (i * total / parts, (i + 1) * total / parts);
        (
            split(ti, self.row_tasks, self.row_units),
            split(tj, self.col_tasks, self.col_panels),
        )
    }
}

/// Packs columns `k0 .. k0 + len` of the A rows `src` (`[rows × k]` f32) into steps, row
/// `r` at `dst[r·KC ..]`: the kernel reads row r of a panel at a constant offset from one
/// pointer.
#[target_feature(enable = "avx512f,avx512bw")]
fn pack_a<K: Kind>(dst: &mut [u32], src: &[f32], k: usize, k0: usize, len: usize) {
    for (r, row) in src.chunks_exact(k).enumerate() {
        K::pack_a(
            &mut dst[r * K::KC..][..len.div_ceil(K::KU)],
            &row[k0..k0 + len],
        );
    }
}

/// Packs weight columns `j0 .. j0 + NR` (missing ones as zeros) into `[steps][NR]`.
#[target_feature(enable = "avx512f,avx512bw")]
fn pack_b<K: Kind>(
    dst: &mut [u32],
    w: &[K::W],
    k: usize,
    n: usize,
    j0: usize,
    layout: WeightLayout,
) {
    let cols = NR.min(n - j0);
    match layout {
        // Column j of op(w) is row j of w: a step is KU adjacent elements of that row.
        // SAFETY: this function is compiled for avx512f/bw.
        WeightLayout::Transposed => unsafe { K::pack_w_transposed(dst, w, k, j0, cols) },
        // SAFETY: this function is compiled for avx512f/bw.
        WeightLayout::Plain => unsafe { K::pack_w_plain(dst, w, k, n, j0, cols) },
    }
}

/// [`Kind::pack_w_plain`] element by element: any kind.
#[inline(always)]
fn interleave_scalar<K: Kind>(
    dst: &mut [u32],
    w: &[K::W],
    k: usize,
    n: usize,
    j0: usize,
    cols: usize,
) {
    let shift = 32 / K::KU;
    for p in 0..k.div_ceil(K::KU) {
        let d = &mut dst[p * NR..(p + 1) * NR];
        for u in 0..K::KU.min(k - K::KU * p) {
            let row = (K::KU * p + u) * n + j0;
            let src = &w[row..row + cols];
            if u == 0 {
                for (d, x) in d.iter_mut().zip(src) {
                    *d = K::bits(*x);
                }
            } else {
                for (d, x) in d.iter_mut().zip(src) {
                    *d |= K::bits(*x) << (shift * u);
                }
            }
        }
        d[cols..].fill(0);
    }
}

/// [`Kind::pack_w_transposed`] element by element, 16 steps at a time so that the writes
/// stay within 2 KiB: any k.
#[inline(always)]
fn transpose_scalar<K: Kind>(dst: &mut [u32], w: &[K::W], k: usize, j0: usize, cols: usize) {
    const PB: usize = 16;
    let ks = k.div_ceil(K::KU);
    let shift = 32 / K::KU;
    for p0 in (0..ks).step_by(PB) {
        let np = PB.min(ks - p0);
        let d = &mut dst[p0 * NR..(p0 + np) * NR];
        for c in 0..cols {
            let row = &w[(j0 + c) * k..(j0 + c + 1) * k];
            let seg = &row[K::KU * p0..(K::KU * (p0 + np)).min(k)];
            for (q, s) in seg.chunks(K::KU).enumerate() {
                d[q * NR + c] = s
                    .iter()
                    .enumerate()
                    .fold(0, |v, (u, x)| v | (K::bits(*x) << (shift * u)));
            }
        }
        if cols < NR {
            for q in 0..np {
                d[q * NR + cols..(q + 1) * NR].fill(0);
            }
        }
    }
}

/// Packs rows `j0 .. j0 + cols` (≤ NR) of a `[rows, ks]` matrix of u32 steps (row stride
/// `ks`) as the columns of a `[ks][NR]` panel, missing columns zero: 16 × 16 blocks
/// transposed in registers.
///
/// # Safety
/// The CPU has avx512f; `src + (j0 + c)·ks + p` for c < cols, p < ks is readable (it need not
/// be aligned).
#[inline(always)]
unsafe fn transpose_panel(dst: &mut [u32], src: *const f32, ks: usize, j0: usize, cols: usize) {
    assert!(cols <= NR && dst.len() >= ks * NR);
    for g in 0..NR / 16 {
        let rows = cols.saturating_sub(16 * g).min(16);
        for k0 in (0..ks).step_by(16) {
            let kn = 16.min(ks - k0);
            // SAFETY: (intrinsics) avx512f, per the contract. Loads read lanes k0 .. k0 + kn
            // of rows j0 + 16g + i < j0 + cols (readable per the contract); stores write steps
            // k0 .. k0 + kn < ks of the panel (checked above).
            unsafe {
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, r) in r.iter_mut().enumerate().take(rows) {
                    let row = src.add((j0 + 16 * g + i) * ks + k0);
                    *r = _mm512_maskz_loadu_ps(lanes(kn), row);
                }
                let r = transpose16(r);
                for (q, r) in r.iter().enumerate().take(kn) {
                    let d = dst.as_mut_ptr().add((k0 + q) * NR + 16 * g);
                    _mm512_storeu_ps(d.cast(), *r);
                }
            }
        }
    }
}

/// One micro-tile product's operands: `C[rows × cols] = (load ? C : 0) + A·B` over `steps`
/// k steps, where row r of A is `a[r·lda ..][..steps]` (lda = KC when A is packed), `b`
/// is `[steps][NR]`, and C's row r starts at `c + r·ldc`.
pub(super) struct Tile<'a> {
    rows: usize,
    a: &'a [u32],
    lda: usize,
    b: &'a [u32],
    steps: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    load: bool,
}

/// Dispatches to the micro-kernel compiled for `t.rows` (1 ..= MR).
///
/// # Safety
/// As for [`kernel`].
#[inline(always)]
unsafe fn tile_rows<K: Kind>(t: Tile<'_>) {
    macro_rules! by_rows {
        ($($r:literal)*) => {
            match t.rows {
                $(
                    // SAFETY: forwarded contract.
                    $r => unsafe { kernel::<K, $r>(t) },
                )*
                rows => unreachable!("micro-tile rows {rows} > {MR}"),
            }
        };
    }
    by_rows!(12 11 10 9 8 7 6 5 4 3 2 1)
}

/// The product of [`Tile`] `t` for `t.rows == R`.
///
/// # Safety
/// Inlined into [`Kind::tile`] only (the CPU has K's features); `c + r·ldc + j` for r < R,
/// j < cols ≤ NR is valid for reads and writes and not accessed by anyone else meanwhile.
#[inline(always)]
unsafe fn kernel<K: Kind, const R: usize>(t: Tile<'_>) {
    let Tile {
        a,
        lda,
        b,
        steps,
        c,
        ldc,
        cols,
        load,
        ..
    } = t;
    // Packed A: a constant row stride, so each row is a fixed displacement.
    let lda = if K::PACK_A { K::KC } else { lda };
    assert!(steps <= K::KC && a.len() >= (R - 1) * lda + steps && b.len() >= steps * NR);
    assert!(cols <= NR);
    let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(16)));
    // SAFETY: (all intrinsics below) the CPU has avx512f (see the function's contract).
    let mut acc = [[unsafe { _mm512_setzero_ps() }; 2]; R];
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
    for p in 0..steps {
        // SAFETY: p < steps ≤ KC, `b` holds steps·NR elements and `a` ·lda + steps.
        let (bv, acol) = unsafe {
            let bq = bp.add(p * NR);
            (
                [
                    _mm512_loadu_si512(bq.cast()),
                    _mm512_loadu_si512(bq.add(16).cast()),
                ],
                ap.add(p),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: r < R (see above); features as above.
            unsafe { K::madd(acc, bv, acol.add(r * lda).read()) };
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

/// Mask of the first `n.min(16)` lanes.
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as __mmask16
}

/// Transposes a 16 × 16 f32 matrix held as 16 rows.
///
/// # Safety
/// The CPU has avx512f; only called inlined into code compiled for it.
#[inline(always)]
unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // SAFETY: avx512f, per the contract.
    unsafe {
        let (pd, ps) = (_mm512_castps_pd, _mm512_castpd_ps);
        // t[2i], t[2i+1]: rows 2i, 2i+1 interleaved (lo and hi halves of each 128-bit lane).
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4b + c], 128-bit lane l: column 4l + c of rows 4b .. 4b + 4.
        let mut u = [_mm512_setzero_ps(); 16];
        for b in 0..4 {
            let (t0, t1, t2, t3) = (
                pd(t[4 * b]),
                pd(t[4 * b + 1]),
                pd(t[4 * b + 2]),
                pd(t[4 * b + 3]),
            );
            u[4 * b] = ps(_mm512_unpacklo_pd(t0, t2));
            u[4 * b + 1] = ps(_mm512_unpackhi_pd(t0, t2));
            u[4 * b + 2] = ps(_mm512_unpacklo_pd(t1, t3));
            u[4 * b + 3] = ps(_mm512_unpackhi_pd(t1, t3));
        }
        // Gather lane l of u[c], u[4 + c], u[8 + c], u[12 + c] into output row 4l + c.
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]); // lanes 0, 2
            let v1 = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]); // lanes 1, 3
            let x0 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let x1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(v0, x0);
            out[4 + c] = _mm512_shuffle_f32x4::<0x88>(v1, x1);
            out[8 + c] = _mm512_shuffle_f32x4::<0xdd>(v0, x0);
            out[12 + c] = _mm512_shuffle_f32x4::<0xdd>(v1, x1);
        }
        out
    }
}

/// Reinterprets 32 packed bf16 (as 16 u32) for `vdpbf16ps`.
#[inline(always)]
fn as_bh(v: __m512i) -> __m512bh {
    // SAFETY: both are plain 64-byte SIMD vectors; every bit pattern is valid for both.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}
