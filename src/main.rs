//! The `peft-wit` command line: parse, call the library, print errors with their causes.

mod cli;

use clap::Parser;

/// The system allocator, asking for 2 MiB pages on large blocks (enabled in `main`).
#[global_allocator]
static ALLOC: peft_wit::ops::HugePageAlloc = peft_wit::ops::HugePageAlloc::new();

/// Runs the command on a rayon worker thread rather than on `main`: every parallel region
/// (thousands per training step) then starts by work-stealing from a thread that takes part in
/// it, instead of injecting a job into the pool and putting `main` to sleep until it is done.
fn run_on_worker(args: cli::Cli) -> anyhow::Result<()> {
    match rayon::ThreadPoolBuilder::new()
        // The command's own stack: candle's backward walks the graph recursively.
        .stack_size(64 << 20)
        .build()
    {
        Ok(pool) => pool.install(|| cli::run(args)),
        Err(_) => cli::run(args),
    }
}

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    // Reuse large tensor buffers instead of faulting in fresh zeroed pages for every op
    // (PEFT_WIT_MALLOC_TUNING=0 keeps glibc's defaults, which return memory more eagerly), and
    // back large blocks with 2 MiB pages (PEFT_WIT_HUGE_PAGES=0: 4 KiB pages).
    if std::env::var("PEFT_WIT_MALLOC_TUNING").as_deref() != Ok("0") {
        peft_wit::ops::tune_glibc_malloc();
    }
    if std::env::var("PEFT_WIT_HUGE_PAGES").as_deref() != Ok("0") {
        ALLOC.enable();
    }
    peft_wit::ops::limit_candle_spinning();
    match run_on_worker(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
