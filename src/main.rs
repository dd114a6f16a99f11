//! The `peft-wit` command line: parse, call the library, print errors with their causes.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    // Reuse large tensor buffers instead of faulting in fresh zeroed pages for every op
    // (PEFT_WIT_MALLOC_TUNING=0 keeps glibc's defaults, which return memory more eagerly).
    if std::env::var("PEFT_WIT_MALLOC_TUNING").as_deref() != Ok("0") {
        peft_wit::ops::tune_glibc_malloc();
    }
    peft_wit::ops::limit_candle_spinning();
    match cli::run(args) {
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
