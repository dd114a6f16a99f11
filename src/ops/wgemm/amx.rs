//! The bf16-weight product on Intel AMX tiles (`tdpbf16ps`), for CPUs that have them
//! (Sapphire Rapids and later). One `tdpbf16ps` multiplies a 16 × 32 bf16 tile of A by a
//! 32 × 16 tile of W into 16 × 16 f32 sums: 16,384 FLOPs per instruction, about 14× what
//! AVX-512 FMA does per core.
//!
//! Same operands and numerics as the `vdpbf16ps` kernel in [`super::x86`] (activations rounded
//! to bf16, round-to-nearest-even; exact bf16 products summed in f32; denormals flushed), only
//! the summation order differs. The layout is the same as well, so the packing is shared:
//! - W is packed into `[steps][NR]` panels (a step = a bf16 pair), zero-padded to a multiple
//!   of 16 steps. Two B tiles (columns 0–15 and 16–31) load straight from a panel with a
//!   128-byte row stride.
//! - A task rounds its rows one k block at a time into a buffer of `kc` steps per row (zero
//!   past k and past m), from which an A tile loads 16 rows a `kc · 4` byte stride apart.
//! - The micro-kernel holds a 32 × 32 block of C in four tiles (tmm0–3), streams A through
//!   tmm4–5 and W through tmm6–7; C loads and stores straight from the caller's rows when the
//!   block is whole, through a scratch block at the edges.
//!
//! Linux only: a process must ask the kernel for the tile state (`arch_prctl`) before using
//! it. [`available`] does that once; everything here runs only after it said yes.

use super::x86::{for_each_task, Bf16, Task};
use super::{to_pairs, WeightLayout, NR};
use half::bf16;
use std::arch::asm;
use std::sync::OnceLock;

/// Steps (bf16 pairs) in one tile row: 64 bytes.
const TS: usize = 16;
/// Rows of a C block: two A tiles of 16 rows.
const BM: usize = 32;
/// Most steps per k block: the A block of a task (~128 rows) stays in L2 and a W panel's
/// block (32 KiB) in L1 while the task's rows stream past it.
pub(super) const KC: usize = 256;

/// Environment variable that turns the AMX path off (`0`), to compare it with AVX-512 BF16.
pub(crate) const AMX_ENV: &str = "PEFT_WIT_AMX";

/// True when this CPU has AMX-TILE and AMX-BF16, the kernel granted this process the tile
/// state, the AVX-512 BF16 packing can run, and [`AMX_ENV`] is not `0`. Probed once.
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var(AMX_ENV).map_or(true, |v| v.trim() != "0")
            && super::available()
            && cpu_has_amx_bf16()
            && request_tile_state()
    })
}

/// CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
fn cpu_has_amx_bf16() -> bool {
    // CPUID exists on every x86_64 CPU; leaf 7 reads as zeros where absent.
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0
}

/// Asks Linux for permission to use the tile data state (`ARCH_REQ_XCOMP_PERM`,
/// `XFEATURE_XTILEDATA`); without it the first tile instruction raises SIGILL.
fn request_tile_state() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes this process's permitted
        // XSAVE features; it touches no memory of ours.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The 64-byte tile configuration: palette 1, all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const fn tile_config() -> TileConfig {
    let mut cfg = [0u8; 64];
    cfg[0] = 1;
    let mut t = 0;
    while t < 8 {
        cfg[16 + 2 * t] = 64; // bytes per row (u16, little endian)
        cfg[48 + t] = 16; // rows
        t += 1;
    }
    TileConfig(cfg)
}

static CONFIG: TileConfig = tile_config();

/// The tiles of this thread, configured while it lives; released (back to the init state,
/// so context switches need not save them) when dropped.
struct Tiles;

impl Tiles {
    /// # Safety
    /// [`available`] returned true.
    unsafe fn configure() -> Self {
        // SAFETY: AMX is usable (the contract); CONFIG is a valid 64-byte palette-1 config.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: a `Tiles` exists only after `configure`, so AMX is usable.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// `c[m×n] = (accumulate ? c : 0) + a[m×k] · op(w)` on AMX tiles, k in blocks of at most
/// `kc_max` steps ([`KC`] but to tune; rounded to 16). Shapes were checked by the caller (as
/// for [`super::x86::matmul`]: lengths match, m, k, n > 0) and [`available`] is true.
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
    kc_max: usize,
) {
    let ks = k.div_ceil(2);
    let ksp = ks.next_multiple_of(TS);
    let kc = (ksp / TS).div_ceil(ksp.div_ceil(kc_max.max(TS))) * TS;
    let row_blocks = m.div_ceil(BM);
    for_each_task::<Bf16, _>(c, w, k, n, ksp, layout, None, row_blocks, |task, pa| {
        let Task {
            rows: (i0, i1),
            panels: (j0, j1),
            jlo,
            pb,
            c: cptr,
        } = task;
        pa.resize((i1 - i0) * BM * kc, 0);
        // SAFETY: `available` (the caller's contract).
        let _tiles = unsafe { Tiles::configure() };
        for p0 in (0..ksp).step_by(kc) {
            let steps = kc.min(ksp - p0);
            // SAFETY: the CPU has avx512f/bw (`available` checked it).
            unsafe { pack_rows(pa, a, m, k, i0 * BM, 2 * p0, kc, steps) };
            let load = accumulate || p0 > 0;
            for j in j0..j1 {
                let cols = NR.min(n - jlo - j * NR);
                let b = &pb[j * NR * ksp + p0 * NR..][..steps * NR];
                for i in i0..i1 {
                    let block = &pa[(i - i0) * BM * kc..][..BM * kc];
                    // SAFETY: tiles configured above; rows i·BM .. +BM (those
                    // < m), columns jlo + j·NR .. + cols lie inside C (m × n) and
                    // belong to this task alone (tasks split row and column
                    // ranges without overlap).
                    unsafe {
                        c_block(CBlock {
                            a: block,
                            lda: kc,
                            b,
                            steps,
                            c: cptr.get().add(i * BM * n + jlo + j * NR),
                            ldc: n,
                            rows: BM.min(m - i * BM),
                            cols,
                            load,
                        })
                    };
                }
            }
        }
    });
}

/// Rounds columns `k0 .. k0 + 2·steps` of rows `r0 ..` of `a` (`[m × k]`) into bf16 pairs,
/// row r of the task at `dst[r·kc ..][..steps]`: zeros past k and for rows past m, so the
/// padded steps and rows add nothing. Compiled for AVX-512 so that the rounding vectorises
/// 16 wide (as SSE2 it was 5% of a training step).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
fn pack_rows(
    dst: &mut [u32],
    a: &[f32],
    m: usize,
    k: usize,
    r0: usize,
    k0: usize,
    kc: usize,
    steps: usize,
) {
    let len = (2 * steps).min(k.saturating_sub(k0));
    for (r, d) in dst.chunks_exact_mut(kc).enumerate() {
        let d = &mut d[..steps];
        let row = r0 + r;
        let filled = if row < m {
            to_pairs(&mut d[..len.div_ceil(2)], &a[row * k + k0..][..len]);
            len.div_ceil(2)
        } else {
            0
        };
        d[filled..].fill(0);
    }
}

/// One C block's operands: `C[rows × cols] = (load ? C : 0) + A·B` over `steps` (a multiple
/// of 16), where A is `BM` rows `lda` steps apart, B a `[steps][NR]` panel, and C's row r
/// starts at `c + r·ldc`.
struct CBlock<'a> {
    a: &'a [u32],
    lda: usize,
    b: &'a [u32],
    steps: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    load: bool,
}

/// A C block at the matrix edge, as the tiles read and write it.
#[repr(C, align(64))]
struct EdgeBlock([f32; BM * NR]);

/// The product of one [`CBlock`].
///
/// # Safety
/// The tiles are configured ([`Tiles`]); `c + r·ldc + j` for r < rows, j < cols is valid for
/// reads and writes and not accessed by anyone else meanwhile.
#[inline(always)]
unsafe fn c_block(blk: CBlock<'_>) {
    let CBlock {
        a,
        lda,
        b,
        steps,
        c,
        ldc,
        rows,
        cols,
        load,
    } = blk;
    assert!(steps.is_multiple_of(TS) && a.len() >= (BM - 1) * lda + steps && b.len() >= steps * NR);
    assert!(rows <= BM && cols <= NR);
    let whole = rows == BM && cols == NR;
    // Zeroed only at the edges: clearing 4 KiB for every block showed as 6% of a step.
    let mut edge = std::mem::MaybeUninit::<EdgeBlock>::uninit();
    let (cp, ldc_bytes) = if whole {
        (c, ldc * 4)
    } else {
        let edge = edge.write(EdgeBlock([0.0; BM * NR]));
        if load {
            for r in 0..rows {
                // SAFETY: row r < rows, columns < cols of C (the contract).
                let src = unsafe { std::slice::from_raw_parts(c.add(r * ldc), cols) };
                edge.0[r * NR..][..cols].copy_from_slice(src);
            }
        }
        (edge.0.as_mut_ptr(), NR * 4)
    };
    // C tiles: tmm0 rows 0–15 × columns 0–15, tmm1 rows 0–15 × 16–31, tmm2 rows 16–31 ×
    // 0–15, tmm3 rows 16–31 × 16–31.
    let c_lo = cp.wrapping_add(16 * ldc_bytes / 4);
    // SAFETY: tiles configured (the contract). Each tile load/store touches 16 rows of 64
    // bytes from its pointer at the given stride: inside C's whole block, or inside `edge`.
    unsafe {
        if load {
            asm!(
                "tileloadd tmm0, [{c} + {s}*1]",
                "tileloadd tmm1, [{c} + {s}*1 + 64]",
                "tileloadd tmm2, [{d} + {s}*1]",
                "tileloadd tmm3, [{d} + {s}*1 + 64]",
                c = in(reg) cp, d = in(reg) c_lo, s = in(reg) ldc_bytes,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
    }
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for s in (0..steps).step_by(TS) {
        // SAFETY: tiles configured. A tiles read rows 0–15 and 16–31 of A, steps s .. s+16
        // (s + 16 ≤ steps, rows ≤ BM: asserted above); B tiles read steps s .. s+16 of the
        // panel, 16 columns each.
        unsafe {
            asm!(
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm6, [{b} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a2} + {lda}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a = in(reg) ap.add(s),
                a2 = in(reg) ap.add(16 * lda + s),
                b = in(reg) bp.add(s * NR),
                lda = in(reg) lda * 4,
                ldb = in(reg) NR * 4,
                options(nostack, readonly),
            );
        }
    }
    // SAFETY: as for the loads above.
    unsafe {
        asm!(
            "tilestored [{c} + {s}*1], tmm0",
            "tilestored [{c} + {s}*1 + 64], tmm1",
            "tilestored [{d} + {s}*1], tmm2",
            "tilestored [{d} + {s}*1 + 64], tmm3",
            c = in(reg) cp, d = in(reg) c_lo, s = in(reg) ldc_bytes,
            options(nostack),
        );
    }
    if !whole {
        // SAFETY: written above (not whole), then by the tile stores.
        let edge = unsafe { edge.assume_init_ref() };
        for r in 0..rows {
            // SAFETY: row r < rows, columns < cols of C (the contract).
            let dst = unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), cols) };
            dst.copy_from_slice(&edge.0[r * NR..][..cols]);
        }
    }
}

/// The peak probe: `iters` rounds of four independent `tdpbf16ps` (65,536 FLOPs a round) on
/// this thread; returns a sum so the work cannot be optimised away. `None` where
/// [`available`] is false.
pub(super) fn probe(iters: u64) -> Option<f32> {
    if !available() {
        return None;
    }
    let ones = [0x3c00_3c00u32; TS * TS]; // bf16 pairs of 2⁻⁷
    let mut out = EdgeBlock([0.0; BM * NR]);
    // SAFETY: `available`; the tiles load 16 rows × 64 bytes of `ones` (stride 64) and store
    // 16 rows × 64 bytes into `out` (stride 128 ≤ its 4 KiB).
    unsafe {
        let _tiles = Tiles::configure();
        asm!(
            "tileloadd tmm4, [{a} + {s}*1]",
            "tileloadd tmm6, [{a} + {s}*1]",
            a = in(reg) ones.as_ptr(), s = in(reg) 64usize,
            options(nostack, readonly),
        );
        for _ in 0..iters {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm4, tmm6",
                "tdpbf16ps tmm3, tmm4, tmm6",
                options(nostack, nomem),
            );
        }
        asm!(
            "tilestored [{c} + {s}*1], tmm0",
            c = in(reg) out.0.as_mut_ptr(), s = in(reg) NR * 4,
            options(nostack),
        );
    }
    Some(out.0[0])
}
