//! Command definitions; each subcommand lives in its own module and turns flags into a
//! validated library call.

mod adapters;
mod bench;
mod common;
mod dpo;
mod eval;
mod export;
mod generate;
mod merge;
mod quickstart;
mod suggest;
mod sweep;
mod tasks;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "peft-wit",
    version,
    about = "LoRA fine-tuning under the weighted instruction-tuning (WIT) loss"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch the default model, train standard / IM / WIT adapters on the built-in tasks, compare.
    Quickstart(quickstart::Args),
    /// Train one LoRA adapter into the registry.
    Train(Box<train::Args>),
    /// Suggest a starting (λp, λr) and a grid to sweep, from the data's token statistics, the
    /// published findings and the registry's past sweeps.
    Suggest(suggest::Args),
    /// Continue a registry adapter under the DPO loss on preference pairs (a new adapter).
    Dpo(Box<dpo::Args>),
    /// Train one adapter per (λp, λr) cell of a grid, then compare them in a table and heatmap.
    Sweep(Box<sweep::Args>),
    /// Evaluate adapters (and the base) side by side on one loaded base.
    Eval(Box<eval::Args>),
    /// Generate text with a base model and optionally an adapter.
    Generate(generate::Args),
    /// List, show, remove, import and compare the registry's adapters.
    Adapters(adapters::Args),
    /// Throughput and memory benchmarks.
    #[command(subcommand)]
    Bench(bench::Args),
    /// Merge an adapter into its base: a Hugging Face directory or a GGUF file.
    Merge(Box<merge::Args>),
    /// Export an adapter: llama.cpp LoRA GGUF (gguf-lora) or a clean PEFT directory (peft).
    Export(export::Args),
    /// Combine weighted adapters (`a:0.5,b:0.5`) into a new registry adapter.
    MergeAdapters(merge::CombineArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Quickstart(args) => quickstart::run(args),
        Command::Train(args) => train::run(*args),
        Command::Suggest(args) => suggest::run(args),
        Command::Dpo(args) => dpo::run(*args),
        Command::Sweep(args) => sweep::run(*args),
        Command::Eval(args) => eval::run(*args),
        Command::Generate(args) => generate::run(args),
        Command::Adapters(args) => adapters::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Merge(args) => merge::run(*args),
        Command::Export(args) => export::run(args),
        Command::MergeAdapters(args) => merge::run_combine(args),
    }
}
