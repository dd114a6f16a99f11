//! `peft-wit bench train`: tokens/s and peak RSS of the training step (plus forward-only eval
//! and generation) on a fixed workload; compare with `benches/torch_peft.py`.

use peft_wit::bench::{run as run_bench, BenchSpec};

use super::common::ModelArgs;

#[derive(clap::Subcommand)]
pub enum Args {
    /// Benchmark LoRA training steps on random tokens.
    Train(TrainArgs),
}

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Tokens to generate for the generation figure (0 skips it).
    #[arg(long, default_value_t = 32)]
    generate_tokens: usize,
    /// Run every op as its own graph node instead of one fused node per decoder block (to
    /// measure what the fusion gives).
    #[arg(long)]
    unfused_blocks: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Args::Train(args) = args;
    let mut base = args.model.load()?;
    base.decoder.set_block_fusion(!args.unfused_blocks);
    let spec = BenchSpec {
        batch_size: args.batch_size,
        seq_len: args.seq_len,
        rank: args.rank,
        steps: args.steps,
        warmup: args.warmup,
        generate_tokens: args.generate_tokens,
    };
    let result = run_bench(&base, &spec, |phase, rate| {
        eprintln!("{phase}: {rate:.1} tokens/s")
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!(
            "peft-wit {} base on {}, batch {}x{}, LoRA r{} on 7 projections, {} threads:",
            result.base_dtype,
            result.device,
            spec.batch_size,
            spec.seq_len,
            spec.rank,
            result.threads
        );
        let peak_name = match (result.base_dtype.as_str(), result.peak.amx_bf16_gflops) {
            ("bf16", Some(_)) => "bf16 AMX",
            ("bf16", None) => "bf16",
            _ => "f32",
        };
        let share = |s: Option<f64>| {
            s.map(|s| format!(", {:.0}% of the {peak_name} peak", 100.0 * s))
                .unwrap_or_default()
        };
        println!(
            "  train step (fwd+bwd+AdamW): {:.1} tokens/s (median of {}){}",
            result.train_tokens_per_s,
            spec.steps,
            share(result.train_share_of_peak)
        );
        let phases = &result.train_phase_s;
        println!(
            "    forward + loss {:.2} s, backward {:.2} s, optimizer {:.3} s",
            phases.forward, phases.backward, phases.optimizer
        );
        println!(
            "  forward-only eval:          {:.1} tokens/s ({:.1}x training, which costs {:.2}x its FLOPs){}",
            result.eval_tokens_per_s,
            result.eval_tokens_per_s / result.train_tokens_per_s,
            result.train_flops_per_token / result.eval_flops_per_token,
            share(result.eval_share_of_peak)
        );
        match result.generate_tokens_per_s {
            Some(rate) => println!("  generation (KV cache):      {rate:.1} tokens/s"),
            None => println!("  generation (KV cache):      skipped"),
        }
        println!(
            "  peak RSS:                   {:.0} MB",
            result.peak_rss_mb.unwrap_or(f64::NAN)
        );
        let gflops = |g: Option<f64>| g.map_or("n/a".to_string(), |g| format!("{g:.0} GFLOP/s"));
        if result.device != "cpu" {
            println!(
                "  the step does {:.3} GFLOP a token (the CPU peak probe is skipped on {})",
                result.train_flops_per_token / 1e9,
                result.device
            );
            return Ok(());
        }
        println!(
            "  machine peak ({} threads):   f32 FMA {}, bf16 dot {}, bf16 AMX tiles {}; the step does {:.3} GFLOP a token",
            result.peak.threads,
            gflops(result.peak.f32_gflops),
            gflops(result.peak.bf16_gflops),
            gflops(result.peak.amx_bf16_gflops),
            result.train_flops_per_token / 1e9
        );
    }
    Ok(())
}
