//! Process-wide tuning for training loops on CPU: allocator and thread-pool settings.
//!
//! ## glibc malloc
//! By default glibc serves every allocation above 128 KiB (adaptive up to 32 MiB) with a fresh
//! `mmap` and returns it with `munmap` on free, so each candle op output is page-faulted and
//! zeroed by the kernel again. Keeping such blocks in the heap removes most of that cost: the
//! ops benchmark's composed paths and candle's gradient bookkeeping ran ~2× faster with it.

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
