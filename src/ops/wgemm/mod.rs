//! Packed-weight GEMM on AVX-512 for frozen weights: `c = a · op(w)` with f32 activations `a`,
//! f32 accumulation, and the weight in bf16 (`vdpbf16ps`) or f32 (`vfmadd231ps`). Where the CPU
//! has Intel AMX, bf16 products of [`AMX_MIN_ROWS`] rows or more run on its tiles instead
//! (`amx.rs`, same packing and numerics).
//!
//! One framework serves both weight types; a [`Kind`](x86::Kind) supplies only what differs:
//! how a k *step* is packed (bf16: a u32 pair of consecutive k, as `vdpbf16ps` reads it; f32:
//! one k), whether and how activations become steps (bf16: rounded per task, round-to-nearest-
//! even as `half::bf16::from_f32`; f32: read in place), and the micro-kernel's multiply-add on
//! one step. Everything else is shared:
//! - W is packed into column panels of `NR` = 32 columns laid out `[steps][NR]` (two zmm per
//!   step), once per call, in parallel, into the calling thread's scratch (reused across calls:
//!   no page faults), or, for products of few rows (decode steps), once per weight into its
//!   [`PackCache`]. A bf16 odd k is padded with a zero; the last panel's missing columns are
//!   zero. Very wide products (an lm_head) are done in column chunks of ≤ 4 MiB of packed W.
//! - The micro-kernel keeps a 12 × 32 f32 tile of C in 24 zmm accumulators and broadcasts one
//!   step of each of `MR` = 12 A rows, which sit a constant stride apart (packed: `KC`; f32 in
//!   place: k). k is cut into blocks of at most `KC` steps, so a W micro-panel (≤ 24 KiB) stays
//!   in L1 while the A rows of a task stream past it from L2.
//! - Tasks split rows first (a task's A block stays in its core's L2), then columns. A bf16
//!   task packs its A rows one k block at a time into a per-thread buffer.
//!
//! bf16: differences from an exact f32 product of the bf16-rounded inputs are only in f32
//! summation order (bf16 × bf16 products are exact in f32), except that `vdpbf16ps` flushes
//! denormal inputs and outputs to zero (|x| < 1.2e-38). f32: an ordinary f32 GEMM (fused
//! multiply-adds, k in order within each element).

use std::any::TypeId;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::quantized::k_quants::GgmlType;
use candle_core::{bail, Result};
use half::bf16;

/// How the weight operand is laid out relative to the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WeightLayout {
    /// `c = a · wᵀ`, `w` is `[n, k]` row-major (forward of a linear layer `y = x·Wᵀ`).
    Transposed,
    /// `c = a · w`, `w` is `[k, n]` row-major (input gradient `dx = dy·W`).
    Plain,
}

/// True when the CPU can run the bf16 kernel (x86_64 with avx512f + avx512bw + avx512bf16).
/// std caches the CPUID probe, so this is a load and a test after the first call.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        f32_available() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when the CPU can run the f32 kernel (x86_64 with avx512f + avx512bw; the packing is
/// compiled for both). Cached like [`available`].
pub(crate) fn f32_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[m×n]` (row-major f32) `= (accumulate ? c : 0) + a[m×k] · op(w)`, with `a` row-major f32
/// rounded to bf16 (round-to-nearest-even) on the fly, `op(w)` per [`WeightLayout`], and f32
/// accumulation. Parallel over rayon's threads (a few large tasks per thread). Runs on AMX
/// tiles from [`AMX_MIN_ROWS`] rows where [`amx_available`], else on AVX-512 BF16. With a
/// `cache` (the weight's own), products on AVX-512 pack W once and reuse its panels.
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
    cache: Option<&PackCache>,
) -> Result<()> {
    let isa = if m >= AMX_MIN_ROWS && amx_available() {
        Bf16Isa::Amx
    } else {
        Bf16Isa::Avx512
    };
    // Few rows (a decode step): packing W is nearly the whole product. Many rows: packing
    // is a few percent of it, but a training step packs every weight twice (x·Wᵀ forward,
    // dy·W backward), so kept panels made a bf16 training step 2–3% faster. They cost memory
    // (both layouts: twice the weight), within `pack_cache_budget`.
    matmul_bf16_on(isa, c, a, m, k, w, n, layout, accumulate, cache)
}

/// The instruction set a bf16-weight product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bf16Isa {
    /// `vdpbf16ps` (AVX-512 BF16).
    Avx512,
    /// `tdpbf16ps` (AMX-BF16 tiles).
    Amx,
}

/// [`matmul_bf16`] on the given instruction set, at any row count, with the weight's panels
/// from `cache` on AVX-512 (AMX packs per call). Errors where the CPU lacks it.
#[allow(clippy::too_many_arguments)]
fn matmul_bf16_on(
    isa: Bf16Isa,
    c: &mut [f32],
    a: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    layout: WeightLayout,
    accumulate: bool,
    cache: Option<&PackCache>,
) -> Result<()> {
    let (needs, supported) = match isa {
        Bf16Isa::Avx512 => ("avx512f + avx512bw + avx512bf16", available()),
        Bf16Isa::Amx => ("AMX-BF16 tiles usable by this process", amx_available()),
    };
    if prepare(
        "matmul_bf16",
        needs,
        supported,
        c,
        a,
        m,
        k,
        w.len(),
        n,
        accumulate,
    )? {
        #[cfg(target_arch = "x86_64")]
        match isa {
            Bf16Isa::Amx => amx::matmul(c, a, m, k, w, n, layout, accumulate, amx::KC),
            Bf16Isa::Avx512 => {
                x86::matmul::<x86::Bf16, _>(c, a, m, k, w, n, layout, accumulate, cache)
            }
        }
    }
    Ok(())
}

/// Rows from which a bf16-weight product runs on AMX tiles where the CPU has them (a C block
/// is 32 rows; below that the AVX-512 kernel wastes less).
const AMX_MIN_ROWS: usize = 32;

/// True when bf16-weight products with many rows run on AMX tiles (Intel Sapphire Rapids and
/// later, Linux, not turned off with `PEFT_WIT_AMX=0`).
pub(crate) fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The AMX peak probe: `iters` rounds of four independent tile dot products (65,536 FLOPs a
/// round) on the calling thread. `None` where [`amx_available`] is false.
pub(crate) fn amx_probe(iters: u64) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        amx::probe(iters)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = iters;
        None
    }
}

/// FLOPs of one round of [`amx_probe`].
pub(crate) const AMX_PROBE_FLOPS: f64 = 4.0 * 16.0 * 16.0 * 32.0 * 2.0;

/// `c[m×n]` (row-major) `= (accumulate ? c : 0) + a[m×k] · op(w)`, all f32, `op(w)` per
/// [`WeightLayout`]. Parallel over rayon's threads.
///
/// Errors when a slice length does not match its shape, or when [`f32_available`] is false
/// (callers then fall back to the `gemm` crate).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_f32(
    c: &mut [f32],
    a: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    layout: WeightLayout,
    accumulate: bool,
) -> Result<()> {
    let needs = "avx512f + avx512bw";
    if prepare(
        "matmul_f32",
        needs,
        f32_available(),
        c,
        a,
        m,
        k,
        w.len(),
        n,
        accumulate,
    )? {
        #[cfg(target_arch = "x86_64")]
        x86::matmul::<x86::F32, _>(c, a, m, k, w, n, layout, accumulate, None);
    }
    Ok(())
}

/// [`matmul_f32`] for a weight stored as GGUF blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0):
/// `w` is `[n, k]` in blocks along k (`Transposed`) or `[k, n]` in blocks along n (`Plain`),
/// each block dequantised straight into the packed panels. The result is bit for bit that
/// of [`matmul_f32`] on the dequantised weight.
///
/// `Ok(false)`, with `c` untouched, where this path does not apply: another block size, a
/// row length that is not a whole number of blocks, or a CPU without avx512f/bw. Errors when
/// a length does not match its shape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_f32_blocks<B: GgmlType + Sync>(
    c: &mut [f32],
    a: &[f32],
    m: usize,
    k: usize,
    blocks: &[B],
    n: usize,
    layout: WeightLayout,
    accumulate: bool,
) -> Result<bool> {
    let cols = match layout {
        WeightLayout::Transposed => k,
        WeightLayout::Plain => n,
    };
    if B::BLCK_SIZE != QBLOCK || !cols.is_multiple_of(QBLOCK) || !f32_available() {
        return Ok(false);
    }
    let w_len = blocks.len() * QBLOCK;
    if prepare(
        "matmul_f32_blocks",
        "avx512f + avx512bw",
        true,
        c,
        a,
        m,
        k,
        w_len,
        n,
        accumulate,
    )? {
        #[cfg(target_arch = "x86_64")]
        {
            let w = blocks::Blocks(blocks);
            x86::matmul::<x86::F32, _>(c, a, m, k, &w, n, layout, accumulate, None);
        }
    }
    Ok(true)
}

/// The checks and trivial cases shared by the entry points: errors on a shape mismatch or a
/// CPU without the `needs` features (`supported`), handles products with nothing to multiply,
/// and says whether the kernel has work to do.
#[allow(clippy::too_many_arguments)]
fn prepare(
    name: &str,
    needs: &str,
    supported: bool,
    c: &mut [f32],
    a: &[f32],
    m: usize,
    k: usize,
    w_len: usize,
    n: usize,
    accumulate: bool,
) -> Result<bool> {
    let (mk, kn, mn) = match (m.checked_mul(k), k.checked_mul(n), m.checked_mul(n)) {
        (Some(mk), Some(kn), Some(mn)) => (mk, kn, mn),
        _ => bail!("{name}: [{m}×{k}]·[{k}×{n}] overflows usize"),
    };
    if a.len() != mk || w_len != kn || c.len() != mn {
        bail!(
            "{name}: a has {} elements for [{m}×{k}], w {w_len} for {k}×{n}, c {} for [{m}×{n}]",
            a.len(),
            c.len()
        );
    }
    if !supported {
        bail!("{name}: this CPU lacks {needs}");
    }
    if m == 0 || n == 0 {
        return Ok(false);
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return Ok(false);
    }
    Ok(true)
}

/// The packed panels of one frozen weight, kept from its first product to its last. A decode
/// step multiplies every weight by a row or a few, and packing the whole weight for them was
/// most of the step (generation on a bf16 base ran at half its speed). A training step packs
/// every weight in both layouts and the tied output projection too: kept panels made it 2–3%
/// faster (the output projection's another 1–2% on one thread). AMX products pack per call.
///
/// Clones share the panels. The cache belongs to one weight: a weight that replaces it (a
/// merged adapter) comes with a fresh one, and each entry also keys on the weight's address,
/// shape and layout. All caches together hold at most [`pack_cache_budget`] bytes; products
/// past it pack per call as before.
#[derive(Clone, Default)]
pub struct PackCache(Arc<Mutex<Vec<(PanelKey, PanelSlot)>>>);

/// One layout's panels: packed by the first product that needs them (`None` when the budget
/// had no room), waited for by any other that comes meanwhile.
type PanelSlot = Arc<OnceLock<Option<Arc<Panels>>>>;

impl std::fmt::Debug for PackCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries = self.0.lock().map(|e| e.len()).unwrap_or(0);
        write!(f, "PackCache({entries} layouts)")
    }
}

/// What a set of packed panels was packed from and for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PanelKey {
    kind: TypeId,
    weight: usize,
    k: usize,
    n: usize,
    steps: usize,
    layout: WeightLayout,
}

/// Packed panels held by a [`PackCache`], counted against the budget while they live.
pub(crate) struct Panels(Vec<u32>);

impl std::ops::Deref for Panels {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.0
    }
}

impl Drop for Panels {
    fn drop(&mut self) {
        CACHED_BYTES.fetch_sub(4 * self.0.len(), Ordering::Relaxed);
    }
}

/// Bytes held by all [`PackCache`]s.
static CACHED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The most bytes all [`PackCache`]s hold together: `PEFT_WIT_PACK_CACHE_MB` (0 turns caching
/// off), else a quarter of the machine's memory or half of what is available when the first
/// panels are kept (the model is loaded by then), whichever is less; 2 GiB where
/// `/proc/meminfo` cannot be read. A training step keeps both layouts of a bf16 weight,
/// twice its own size: kept panels must not push the machine into swap for a few percent.
pub fn pack_cache_budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        if let Some(mb) = std::env::var("PEFT_WIT_PACK_CACHE_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            return mb.saturating_mul(1 << 20);
        }
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| budget_from_meminfo(&info))
            .unwrap_or(2 << 30)
    })
}

/// [`pack_cache_budget`]'s default from the text of `/proc/meminfo`: min(MemTotal / 4,
/// MemAvailable / 2), or MemTotal / 4 on kernels without MemAvailable.
fn budget_from_meminfo(info: &str) -> Option<usize> {
    let bytes = |key: &str| -> Option<usize> {
        let line = info.lines().find(|l| l.starts_with(key))?;
        let kib: usize = line[key.len()..].split_whitespace().next()?.parse().ok()?;
        Some(kib.saturating_mul(1024))
    };
    let quarter = bytes("MemTotal:")? / 4;
    Some(bytes("MemAvailable:").map_or(quarter, |available| quarter.min(available / 2)))
}

impl PanelKey {
    /// The key of `w` packed as `K` for `layout` with `steps` steps a column.
    fn new<K: 'static>(
        weight: usize,
        k: usize,
        n: usize,
        steps: usize,
        layout: WeightLayout,
    ) -> Self {
        Self {
            kind: TypeId::of::<K>(),
            weight,
            k,
            n,
            steps,
            layout,
        }
    }
}

impl PackCache {
    /// The panels under `key`: `len` u32 written by `pack` on first use, shared after.
    /// `None` when the budget has no room.
    fn panels(
        &self,
        key: PanelKey,
        len: usize,
        pack: impl FnOnce(&mut Vec<u32>),
    ) -> Option<Arc<Panels>> {
        let slot = {
            let mut entries = self
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match entries.iter().find(|(k, _)| *k == key) {
                Some((_, slot)) => slot.clone(),
                None => {
                    let slot = Arc::new(OnceLock::new());
                    entries.push((key, slot.clone()));
                    slot
                }
            }
        };
        // Packing runs outside the lock; a second product of the same layout (another lane)
        // waits for the first instead of packing it twice.
        slot.get_or_init(|| {
            let bytes = 4 * len;
            let budget = pack_cache_budget();
            CACHED_BYTES
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                    held.checked_add(bytes).filter(|&total| total <= budget)
                })
                .ok()?;
            let mut panels = Vec::new();
            pack(&mut panels);
            debug_assert_eq!(panels.len(), len);
            Some(Arc::new(Panels(panels)))
        })
        .clone()
    }

    /// Layouts packed so far (tests).
    #[cfg(test)]
    fn packed(&self) -> usize {
        let entries = self.0.lock().unwrap();
        entries
            .iter()
            .filter(|(_, s)| matches!(s.get(), Some(Some(_))))
            .count()
    }
}

/// Rows of a micro-tile (24 zmm accumulators with `NR` = 32).
const MR: usize = 12;
/// Columns of a packed weight panel (two zmm of f32).
const NR: usize = 32;
/// Most bytes of packed W per column chunk.
const W_CHUNK_BYTES: usize = 4 << 20;
/// Weights per GGUF block that [`matmul_f32_blocks`] takes: one panel's width, so that a block
/// along n is exactly one panel row.
const QBLOCK: usize = 32;
const _: () = assert!(QBLOCK == NR);
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

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod blocks;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn rand_vec(rng: &mut StdRng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn rand_bf16(rng: &mut StdRng, len: usize) -> Vec<bf16> {
        rand_vec(rng, len).into_iter().map(bf16::from_f32).collect()
    }

    /// One weight type under test: how to make its weights, what the kernel computes exactly
    /// (inputs as f64 after any rounding), and the entry point.
    struct Subject<W> {
        name: &'static str,
        available: fn() -> bool,
        weight: fn(f32) -> W,
        w64: fn(W) -> f64,
        a64: fn(f32) -> f64,
        #[allow(clippy::type_complexity)]
        run: fn(&mut [f32], &[f32], usize, usize, &[W], usize, WeightLayout, bool) -> Result<()>,
    }

    const BF16: Subject<bf16> = Subject {
        name: "bf16",
        available,
        weight: bf16::from_f32,
        w64: bf16::to_f64,
        a64: |x| bf16::from_f32(x).to_f64(),
        run: |c, a, m, k, w, n, l, acc| matmul_bf16(c, a, m, k, w, n, l, acc, None),
    };

    const BF16_AVX512: Subject<bf16> = Subject {
        name: "bf16 on AVX-512",
        run: |c, a, m, k, w, n, l, acc| {
            matmul_bf16_on(Bf16Isa::Avx512, c, a, m, k, w, n, l, acc, None)
        },
        ..BF16
    };

    const BF16_AMX: Subject<bf16> = Subject {
        name: "bf16 on AMX",
        available: amx_available,
        run: |c, a, m, k, w, n, l, acc| {
            matmul_bf16_on(Bf16Isa::Amx, c, a, m, k, w, n, l, acc, None)
        },
        ..BF16
    };

    const F32: Subject<f32> = Subject {
        name: "f32",
        available: f32_available,
        weight: |x| x,
        w64: f64::from,
        a64: f64::from,
        run: matmul_f32,
    };

    impl<W: Copy> Subject<W> {
        /// Skips (with a note) when the CPU cannot run this kind.
        fn skip(&self, test: &str) -> bool {
            let skip = !(self.available)();
            if skip {
                eprintln!("skipping {test} for {}: CPU lacks the features", self.name);
            }
            skip
        }

        /// Runs one product on random data (C starting at `c0`, default random) and compares
        /// it with an f64 product of the same inputs: the error must be within 1e-5 of
        /// Σ|a|·|w| (+|c|) per element (the kernel's only difference is f32 arithmetic).
        #[allow(clippy::too_many_arguments)]
        fn check(
            &self,
            rng: &mut StdRng,
            m: usize,
            k: usize,
            n: usize,
            layout: WeightLayout,
            accumulate: bool,
            c0: Option<f32>,
        ) {
            let a = rand_vec(rng, m * k);
            let w: Vec<W> = rand_vec(rng, k * n).into_iter().map(self.weight).collect();
            let c0 = match c0 {
                Some(x) => vec![x; m * n],
                None => rand_vec(rng, m * n),
            };
            let mut c = c0.clone();
            (self.run)(&mut c, &a, m, k, &w, n, layout, accumulate).unwrap();
            let wv = |kk: usize, j: usize| {
                (self.w64)(match layout {
                    WeightLayout::Transposed => w[j * k + kk],
                    WeightLayout::Plain => w[kk * n + j],
                })
            };
            for i in 0..m {
                for j in 0..n {
                    let init = if accumulate {
                        c0[i * n + j] as f64
                    } else {
                        0.0
                    };
                    let (mut want, mut scale) = (init, init.abs());
                    for kk in 0..k {
                        let x = (self.a64)(a[i * k + kk]) * wv(kk, j);
                        want += x;
                        scale += x.abs();
                    }
                    let got = c[i * n + j];
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * scale.max(f64::MIN_POSITIVE),
                        "{} m={m} k={k} n={n} {layout:?} acc={accumulate} at ({i}, {j}): \
                         got {got}, want {want} (scale {scale})",
                        self.name
                    );
                }
            }
        }

        /// Odd shapes (tails in every dimension, one and several k blocks), both layouts,
        /// with and without accumulation.
        fn odd_shapes(&self, seed: u64) {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut cases = 0;
            for &m in &[1usize, 7, 13, 100] {
                for &k in &[1usize, 3, 17, 576, 1536] {
                    for &n in &[1usize, 5, 33, 192, 576] {
                        for layout in [WeightLayout::Transposed, WeightLayout::Plain] {
                            for accumulate in [false, true] {
                                self.check(&mut rng, m, k, n, layout, accumulate, None);
                                cases += 1;
                            }
                        }
                    }
                }
            }
            assert_eq!(cases, 400);
        }

        /// Several row tasks, the 4-row tail panel, three k blocks with an odd last bf16
        /// pair, a column tail; C starts as NaN, so every element must be written.
        fn large_m(&self, seed: u64) {
            let mut rng = StdRng::seed_from_u64(seed);
            for layout in [WeightLayout::Transposed, WeightLayout::Plain] {
                self.check(&mut rng, 1024, 481, 40, layout, false, Some(f32::NAN));
            }
        }
    }

    /// The AMX kernel's k block, A/B measured in interleaved rounds (the machines are noisy):
    /// `cargo test --release --lib amx_k_block -- --ignored --nocapture`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn amx_k_block_throughput() {
        if !amx_available() {
            eprintln!("no AMX here");
            return;
        }
        let mut rng = StdRng::seed_from_u64(9);
        let blocks = [64usize, 128, 256, 512];
        for (m, k, n, layout) in [
            (1024, 576, 576, WeightLayout::Transposed),
            (1024, 576, 1536, WeightLayout::Plain),
            (1024, 1536, 576, WeightLayout::Transposed),
            (256, 576, 49152, WeightLayout::Transposed),
        ] {
            let a = rand_vec(&mut rng, m * k);
            let w = rand_bf16(&mut rng, k * n);
            let mut c = vec![0.0f32; m * n];
            let flops = 2.0 * (m * k * n) as f64;
            let mut rates = vec![Vec::new(); blocks.len()];
            for _ in 0..9 {
                for (b, &kc) in blocks.iter().enumerate() {
                    let t = std::time::Instant::now();
                    for _ in 0..5 {
                        amx::matmul(&mut c, &a, m, k, &w, n, layout, false, kc);
                    }
                    rates[b].push(5.0 * flops / t.elapsed().as_secs_f64() / 1e9);
                }
            }
            let line: Vec<String> = blocks
                .iter()
                .zip(&mut rates)
                .map(|(kc, r)| {
                    r.sort_by(f64::total_cmp);
                    format!("kc {kc}: {:.0}/{:.0}", r[8], r[4])
                })
                .collect();
            println!("m={m} k={k} n={n} {layout:?}: {}", line.join("  "));
        }
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
        if !BF16.skip("bf16_gemm_matches_f64_reference") {
            BF16.odd_shapes(7);
        }
    }

    #[test]
    fn bf16_gemm_on_each_instruction_set_matches_f64_reference() {
        for (subject, seed) in [(BF16_AVX512, 17), (BF16_AMX, 27)] {
            if !subject.skip("bf16_gemm_on_each_instruction_set_matches_f64_reference") {
                subject.odd_shapes(seed);
                subject.large_m(seed + 1);
            }
        }
    }

    /// Where the CPU has AMX, CI must exercise it: a machine that reports the tiles in CPUID
    /// but cannot use them would silently fall back.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn amx_is_used_where_the_cpu_has_it() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let listed = cpuinfo.contains(" amx_bf16") && cpuinfo.contains(" amx_tile");
        let disabled = std::env::var(amx::AMX_ENV).is_ok_and(|v| v.trim() == "0");
        if listed && available() && !disabled {
            assert!(
                amx_available(),
                "the CPU lists AMX but the tiles are not usable"
            );
            let sum = amx_probe(10).expect("AMX probe");
            // 10 rounds of 32 products of 2⁻⁷ · 2⁻⁷ per element.
            assert_eq!(sum, 10.0 * 32.0 / 16384.0);
        } else {
            eprintln!("no usable AMX here (listed {listed}, disabled {disabled})");
            assert_eq!(amx_probe(1), None);
        }
    }

    #[test]
    fn f32_gemm_matches_f64_reference() {
        if !F32.skip("f32_gemm_matches_f64_reference") {
            F32.odd_shapes(8);
        }
    }

    #[test]
    fn bf16_gemm_large_m_tiles_and_k_blocks() {
        if !BF16.skip("bf16_gemm_large_m_tiles_and_k_blocks") {
            BF16.large_m(3);
        }
    }

    #[test]
    fn f32_gemm_large_m_tiles_and_k_blocks() {
        if !F32.skip("f32_gemm_large_m_tiles_and_k_blocks") {
            F32.large_m(4);
        }
    }

    #[test]
    fn cache_budget_is_the_lesser_of_a_quarter_of_memory_and_half_of_what_is_free() {
        let info = |total: usize, available: Option<usize>| {
            let mut text = format!("MemTotal:       {total} kB\nMemFree:         1000 kB\n");
            if let Some(a) = available {
                text += &format!("MemAvailable:   {a} kB\n");
            }
            text
        };
        let gib = 1 << 20; // in kB
        assert_eq!(
            budget_from_meminfo(&info(24 * gib, Some(20 * gib))),
            Some(6 << 30),
            "plenty free: a quarter of the memory"
        );
        assert_eq!(
            budget_from_meminfo(&info(16 * gib, Some(3 * gib))),
            Some(3 << 29),
            "little free: half of it"
        );
        assert_eq!(
            budget_from_meminfo(&info(8 * gib, None)),
            Some(2 << 30),
            "no MemAvailable line"
        );
        assert_eq!(budget_from_meminfo("Cached: 5 kB\n"), None);
    }

    /// A weight's cache packs each layout once, on first use, and later products of any row
    /// count read the same panels, with results bit for bit those of products that pack per
    /// call; another weight through the same cache gets panels of its own.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn cached_panels_are_packed_once_and_change_no_bit() {
        if !available() {
            eprintln!("skipping cached_panels_are_packed_once_and_change_no_bit: no AVX-512 BF16");
            return;
        }
        let mut rng = StdRng::seed_from_u64(11);
        let (k, n) = (95, 70);
        let w = rand_bf16(&mut rng, k * n);
        let w2 = rand_bf16(&mut rng, k * n);
        let cache = PackCache::default();
        let product = |w: &[bf16], m: usize, layout, cache: Option<&PackCache>| {
            let a = rand_vec(&mut StdRng::seed_from_u64(m as u64), m * k);
            let mut c = vec![0.0f32; m * n];
            matmul_bf16(&mut c, &a, m, k, w, n, layout, false, cache).unwrap();
            c
        };
        for layout in [WeightLayout::Transposed, WeightLayout::Plain] {
            for m in [1, 5, 31, 100] {
                let fresh = product(&w, m, layout, None);
                assert_eq!(
                    product(&w, m, layout, Some(&cache)),
                    fresh,
                    "{layout:?} m={m}"
                );
                assert_eq!(
                    product(&w, m, layout, Some(&cache)),
                    fresh,
                    "{layout:?} again"
                );
            }
        }
        assert_eq!(cache.packed(), 2, "one entry per layout");
        let layout = WeightLayout::Plain;
        let fresh = product(&w2, 3, layout, None);
        assert_eq!(
            product(&w2, 3, layout, Some(&cache)),
            fresh,
            "another weight"
        );
        assert_eq!(cache.packed(), 3);
        // Wide enough for several column chunks: each reads its own slice of the panels.
        let wide = 32 * 700 + 5;
        assert!(x86::chunk_cols(wide, k.div_ceil(2)) < wide);
        let ww = rand_bf16(&mut rng, k * wide);
        let a = rand_vec(&mut rng, 3 * k);
        let (mut c, mut fresh) = (vec![0.0f32; 3 * wide], vec![0.0f32; 3 * wide]);
        let layout = WeightLayout::Transposed;
        matmul_bf16(&mut c, &a, 3, k, &ww, wide, layout, false, Some(&cache)).unwrap();
        matmul_bf16(&mut c, &a, 3, k, &ww, wide, layout, false, Some(&cache)).unwrap();
        matmul_bf16(&mut fresh, &a, 3, k, &ww, wide, layout, false, None).unwrap();
        assert_eq!(c, fresh, "a product in column chunks");
        assert_eq!(cache.packed(), 4);
    }

    /// GGUF blocks dequantised straight into the panels give bit for bit the product of the
    /// f32 kernel on candle's dequantised weight, for every 32-weight block type, both
    /// layouts, with and without accumulation; a row that is not whole blocks, or another
    /// block size, is declined with C untouched.
    #[test]
    fn block_panels_equal_the_dequantised_product() {
        use candle_core::quantized::{k_quants, GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        if !f32_available() {
            eprintln!("skipping block_panels_equal_the_dequantised_product: no AVX-512");
            return;
        }
        fn raw<B: k_quants::GgmlType>(q: &QTensor) -> Vec<B> {
            let bytes = q.data().unwrap();
            let count = bytes.len() / std::mem::size_of::<B>();
            // SAFETY: candle's own storage of `count` blocks of `B` (repr(C), any bits valid);
            // read unaligned into an owned Vec.
            (0..count)
                .map(|i| unsafe { bytes.as_ptr().cast::<B>().add(i).read_unaligned() })
                .collect()
        }
        fn check<B: k_quants::GgmlType + Sync>(dtype: GgmlDType) {
            let mut rng = StdRng::seed_from_u64(dtype as u64 + 3);
            // [out, in] = [70, 96] for a·Wᵀ (blocks along k = 96, n = 70 not whole panels),
            // [96, 64] for a·W (blocks along n = 64).
            for (layout, out, inp) in [
                (WeightLayout::Transposed, 70, 96),
                (WeightLayout::Plain, 96, 64),
            ] {
                let w = rand_vec(&mut rng, out * inp);
                let w = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let dense: Vec<f32> = q
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let blocks = raw::<B>(&q);
                let (k, n) = match layout {
                    WeightLayout::Transposed => (inp, out),
                    WeightLayout::Plain => (out, inp),
                };
                for (m, accumulate) in [(13, false), (130, true)] {
                    let a = rand_vec(&mut rng, m * k);
                    let start = rand_vec(&mut rng, m * n);
                    let (mut want, mut got) = (start.clone(), start);
                    matmul_f32(&mut want, &a, m, k, &dense, n, layout, accumulate).unwrap();
                    let took =
                        matmul_f32_blocks(&mut got, &a, m, k, &blocks, n, layout, accumulate)
                            .unwrap();
                    assert!(took, "{dtype:?} {layout:?}");
                    assert_eq!(got, want, "{dtype:?} {layout:?} m={m}");
                }
                // Rows of a·W that are not whole blocks: declined, C untouched.
                if layout == WeightLayout::Plain {
                    let (k, n) = (64, 48);
                    let short = &blocks[..k * n / 32];
                    let mut c = vec![7.0f32; 2 * n];
                    let a = rand_vec(&mut rng, 2 * k);
                    let took =
                        matmul_f32_blocks(&mut c, &a, 2, k, short, n, layout, false).unwrap();
                    assert!(!took && c.iter().all(|&x| x == 7.0));
                }
            }
        }
        check::<k_quants::BlockQ4_0>(GgmlDType::Q4_0);
        check::<k_quants::BlockQ4_1>(GgmlDType::Q4_1);
        check::<k_quants::BlockQ5_0>(GgmlDType::Q5_0);
        check::<k_quants::BlockQ5_1>(GgmlDType::Q5_1);
        check::<k_quants::BlockQ8_0>(GgmlDType::Q8_0);
        // Blocks of 256 (k-quants): declined.
        let mut c = vec![7.0f32];
        let blocks = vec![k_quants::BlockQ4K::zeros(); 1];
        let layout = WeightLayout::Transposed;
        let took = matmul_f32_blocks(&mut c, &[1.0; 256], 1, 256, &blocks, 1, layout, false);
        assert!(!took.unwrap() && c == [7.0]);
        // A block count that does not match the shape is an error.
        let short = vec![k_quants::BlockQ8_0::zeros(); 2];
        let mut c = vec![0.0f32; 4];
        assert!(matmul_f32_blocks(&mut c, &[0.0; 64], 1, 64, &short, 4, layout, false).is_err());
    }

    #[test]
    fn wgemm_rejects_bad_shapes() {
        let (a, mut c) = (vec![0.0f32; 6], vec![0.0f32; 4]);
        let layout = WeightLayout::Plain;
        let wb = vec![bf16::ZERO; 6];
        assert!(matmul_bf16(&mut c, &a, 2, 3, &wb, 3, layout, false, None).is_err()); // c too short
        assert!(matmul_bf16(&mut c, &a[..5], 2, 3, &wb, 2, layout, false, None).is_err());
        assert!(matmul_bf16(&mut c, &a, 2, 3, &wb[..5], 2, layout, false, None).is_err());
        assert_eq!(
            matmul_bf16(&mut c, &a, 2, 3, &wb, 2, layout, false, None).is_ok(),
            available()
        );
        let wf = vec![0.0f32; 6];
        assert!(matmul_f32(&mut c, &a, 2, 3, &wf, 3, layout, false).is_err());
        assert!(matmul_f32(&mut c, &a[..5], 2, 3, &wf, 2, layout, false).is_err());
        assert!(matmul_f32(&mut c, &a, 2, 3, &wf[..5], 2, layout, false).is_err());
        assert_eq!(
            matmul_f32(&mut c, &a, 2, 3, &wf, 2, layout, false).is_ok(),
            f32_available()
        );
    }

    #[test]
    fn wgemm_k_zero() {
        let layout = WeightLayout::Transposed;
        if !BF16.skip("wgemm_k_zero") {
            let mut c = vec![2.0f32; 6];
            matmul_bf16(&mut c, &[], 2, 0, &[], 3, layout, true, None).unwrap();
            assert_eq!(c, vec![2.0; 6]);
            matmul_bf16(&mut c, &[], 2, 0, &[], 3, layout, false, None).unwrap();
            assert_eq!(c, vec![0.0; 6]);
        }
        if !F32.skip("wgemm_k_zero") {
            let mut c = vec![2.0f32; 6];
            matmul_f32(&mut c, &[], 2, 0, &[], 3, layout, true).unwrap();
            assert_eq!(c, vec![2.0; 6]);
            matmul_f32(&mut c, &[], 2, 0, &[], 3, layout, false).unwrap();
            assert_eq!(c, vec![0.0; 6]);
        }
    }

    /// GFLOP/s on the training shapes: f32 (this kernel), f32 (the `gemm` crate through
    /// `ops::gemm`) and bf16 weights, side by side. Run with
    /// `cargo test --release --lib wgemm_throughput -- --ignored --nocapture`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn wgemm_throughput() {
        use crate::ops::gemm::{gemm, View};
        let mut rng = StdRng::seed_from_u64(5);
        let threads = rayon::current_num_threads();
        println!("GFLOP/s, best / median of 15 rounds of ≥ 20 ms, {threads} threads");
        for (m, k, n, layouts) in [
            (
                1024,
                576,
                576,
                &[WeightLayout::Transposed, WeightLayout::Plain][..],
            ),
            (
                1024,
                576,
                1536,
                &[WeightLayout::Transposed, WeightLayout::Plain],
            ),
            (
                1024,
                1536,
                576,
                &[WeightLayout::Transposed, WeightLayout::Plain],
            ),
            (
                1024,
                576,
                192,
                &[WeightLayout::Transposed, WeightLayout::Plain],
            ),
            (256, 576, 49152, &[WeightLayout::Transposed]),
            (256, 49152, 576, &[WeightLayout::Plain]),
            (
                64,
                576,
                576,
                &[WeightLayout::Transposed, WeightLayout::Plain],
            ),
            (
                8,
                576,
                1536,
                &[WeightLayout::Transposed, WeightLayout::Plain],
            ),
        ] {
            let a = rand_vec(&mut rng, m * k);
            let w = rand_vec(&mut rng, k * n);
            let wb: Vec<bf16> = w.iter().map(|x| bf16::from_f32(*x)).collect();
            let mut c = vec![0.0f32; m * n];
            let flops = 2.0 * (m * k * n) as f64;
            for &layout in layouts {
                let mut bench = |run: &mut dyn FnMut(&mut [f32])| -> String {
                    run(&mut c);
                    let iters = ((0.02 * 200e9 / flops) as usize).max(2);
                    let mut rounds: Vec<f64> = (0..15)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            for _ in 0..iters {
                                run(&mut c);
                            }
                            flops * iters as f64 / t.elapsed().as_secs_f64() / 1e9
                        })
                        .collect();
                    rounds.sort_by(f64::total_cmp);
                    format!("{:6.1} /{:6.1}", rounds[14], rounds[7])
                };
                let f32_new = if f32_available() {
                    bench(&mut |c| matmul_f32(c, &a, m, k, &w, n, layout, false).unwrap())
                } else {
                    "   n/a".into()
                };
                let wv = match layout {
                    WeightLayout::Transposed => View::rows(&w, n, k).t(),
                    WeightLayout::Plain => View::rows(&w, k, n),
                };
                let av = View::rows(&a, m, k);
                let f32_crate = bench(&mut |c| gemm(c, av, wv, 1.0, false, true).unwrap());
                let mut bf16_on = |isa: Bf16Isa| {
                    if matches!(
                        (isa, amx_available(), available()),
                        (Bf16Isa::Amx, true, _) | (Bf16Isa::Avx512, _, true)
                    ) {
                        bench(&mut |c| {
                            matmul_bf16_on(isa, c, &a, m, k, &wb, n, layout, false, None).unwrap()
                        })
                    } else {
                        "   n/a".into()
                    }
                };
                let (bf16_avx512, bf16_amx) = (bf16_on(Bf16Isa::Avx512), bf16_on(Bf16Isa::Amx));
                println!(
                    "m={m:5} k={k:5} n={n:5} {layout:>10?}: f32 {f32_new}  gemm crate {f32_crate}  \
                     bf16 AVX-512 {bf16_avx512}  bf16 AMX {bf16_amx}"
                );
            }
        }
    }
}
