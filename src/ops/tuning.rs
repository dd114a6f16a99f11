//! Process-wide tuning for training loops on CPU: allocator and thread-pool settings.
//!
//! ## glibc malloc
//! By default glibc serves every allocation above 128 KiB (adaptive up to 32 MiB) with a fresh
//! `mmap` and returns it with `munmap` on free, so each candle op output is page-faulted and
//! zeroed by the kernel again. Keeping such blocks in the heap removes most of that cost: the
//! ops benchmark's composed paths and candle's gradient bookkeeping ran ~2× faster with it.
//!
//! ## Huge pages
//! Blocks above 32 MiB (an lm_head's logits) and the heaps of the worker threads' arenas are
//! still mapped afresh, so a training step of SmolLM2-135M took ~60,000 page faults of 4 KiB.
//! [`HugePageAlloc`] asks for 2 MiB pages inside every large block (close to glibc's
//! `glibc.malloc.hugetlb=1` tunable, which a running process cannot set): 61% fewer faults in
//! `bench train`, and 512× fewer TLB entries where the products stride across rows. The rest
//! are blocks under 2 MiB and the edges of blocks, which share pages with their neighbours.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// Raises glibc's mmap threshold to its maximum (32 MiB) and stops heap trimming, so freed
/// tensor buffers are reused instead of unmapped. Call once at start-up, before heavy work.
/// Returns false where unsupported (non-glibc targets) or if glibc rejected a setting.
/// Trade-off: peak RSS stays at its high-water mark (memory is not handed back to the OS).
pub fn tune_glibc_malloc() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator parameters; the values are within glibc's
        // documented ranges (mmap threshold ≤ HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit).
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1
                && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1
                && mallopt(M_TOP_PAD, 256 * 1024 * 1024) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The spin count after which candle's elementwise worker threads park (candle reads it once,
/// when its pool starts).
const CANDLE_SPIN_LIMIT: &str = "1000";

/// Makes candle's elementwise thread pool park its workers soon after each op instead of
/// spinning for ~25k iterations. Training alternates candle elementwise ops with our rayon
/// kernels and gemms, so on a machine with few cores a spinning candle worker steals a core
/// from the matmul that runs next. Keeps a value the user set in
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT`. Call at start-up, before any tensor op and before other
/// threads exist (it sets an environment variable).
pub fn limit_candle_spinning() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Called from `main` before any thread is spawned, so nothing reads the environment
        // concurrently.
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
}

/// A transparent huge page; also the smallest block that can hold one whole.
const HUGE_PAGE: usize = 2 << 20;

/// The system allocator, plus transparent-huge-page advice (`MADV_HUGEPAGE`) on the whole
/// 2 MiB pages inside every block of at least 2 MiB, once [`HugePageAlloc::enable`] was called.
/// Install it in a binary with `#[global_allocator]`. Advice only: where the kernel has no
/// transparent huge pages (or they are off system-wide) nothing changes. (Placing large blocks
/// on 2 MiB boundaries as well, so that whole pages cover more of each, grew the peak RSS of
/// `bench train` by a quarter through fragmentation and saved few faults: not done.)
pub struct HugePageAlloc {
    enabled: AtomicBool,
}

impl HugePageAlloc {
    /// Not advising until [`HugePageAlloc::enable`], so that a binary can read its settings
    /// first.
    pub const fn new() -> Self {
        Self {
            enabled: AtomicBool::new(false),
        }
    }

    /// Starts advising large blocks allocated from now on.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    fn advise(&self, ptr: *mut u8, size: usize) {
        if !ptr.is_null() && size >= HUGE_PAGE && self.enabled.load(Ordering::Relaxed) {
            advise_huge_pages(ptr, size);
        }
    }
}

impl Default for HugePageAlloc {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every block comes from `System` with the caller's layout and goes back to it
// unchanged; the advice touches no byte of it.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc(layout) };
        self.advise(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        self.advise(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on (the block came from `System`).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on (the block came from `System`).
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        self.advise(new, new_size);
        new
    }
}

/// `MADV_HUGEPAGE` on the whole 2 MiB pages inside `[ptr, ptr + len)`, if any. Refusals
/// (no transparent huge pages in this kernel) are ignored: the block works the same.
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize).saturating_add(len) / HUGE_PAGE * HUGE_PAGE;
    #[cfg(target_os = "linux")]
    if end > start {
        // SAFETY: the range lies inside one live block (start ≥ ptr, end ≤ ptr + len);
        // MADV_HUGEPAGE changes how its pages are backed, never their contents or validity.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, end);
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The VmFlags of the mapping that holds `addr`, from /proc/self/smaps.
    fn vm_flags_at(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.trim().to_string();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn large_blocks_are_advised_to_use_huge_pages_and_small_ones_not() {
        let thp_built = std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists();
        let alloc = HugePageAlloc::new();
        let big = Layout::from_size_align(8 << 20, 64).unwrap();
        let small = Layout::from_size_align(1 << 20, 64).unwrap();
        // SAFETY: non-zero layouts; each block is freed below with its own layout.
        let (off, on, zeroed, tiny) = unsafe {
            let off = alloc.alloc(big);
            alloc.enable();
            (
                off,
                alloc.alloc(big),
                alloc.alloc_zeroed(big),
                alloc.alloc(small),
            )
        };
        let middle = |p: *mut u8, l: Layout| p as usize + l.size() / 2;
        let advised = |p, l| vm_flags_at(middle(p, l)).split(' ').any(|f| f == "hg");
        assert_eq!(advised(on, big), thp_built, "enabled, 8 MiB");
        assert_eq!(advised(zeroed, big), thp_built, "enabled, zeroed 8 MiB");
        assert!(!advised(off, big), "allocated before enable");
        assert!(!advised(tiny, small), "1 MiB block");
        // SAFETY: the bytes of a zeroed block read as zero; all four blocks came from `alloc`.
        unsafe {
            assert!(std::slice::from_raw_parts(zeroed, big.size())
                .iter()
                .all(|&b| b == 0));
            for (p, l) in [(off, big), (on, big), (zeroed, big), (tiny, small)] {
                alloc.dealloc(p, l);
            }
        }
    }
}
