//! `peft-wit generate`: a quick look at what a base model (plus adapter) says.

use std::io::Write;

use anyhow::Context;
use peft_wit::data::{ChatTemplate, Message, Role};
use peft_wit::generate::{generate, GenerationConfig};
use peft_wit::lora::peft::load_peft;

use super::common::{open_registry, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Registry name or PEFT adapter directory.
    #[arg(long)]
    adapter: Option<String>,
    #[arg(long)]
    registry: Option<std::path::PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Render the model's chat template with the prompt as the user turn.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let base = args.model.load()?;
    let adapter = match &args.adapter {
        None => None,
        Some(spec) => {
            let registry = open_registry(args.registry.as_deref())?;
            let dir = registry.resolve(spec)?;
            let adapter = load_peft(
                &dir,
                &base.decoder.config,
                candle_core::DType::F32,
                base.decoder.device(),
            )
            .with_context(|| format!("loading adapter {}", dir.display()))?;
            eprintln!(
                "adapter {} (r={}, {} parameters)",
                dir.display(),
                adapter.config.r,
                adapter.num_parameters()
            );
            Some(adapter)
        }
    };
    let tokenizer = base.tokenizer()?;
    let text = if args.chat {
        let source = base
            .chat_template
            .as_deref()
            .context("the model has no chat template; drop --chat")?;
        let template = ChatTemplate::new(
            source,
            base.bos_token.as_deref().unwrap_or(""),
            base.eos_token.as_deref().unwrap_or(""),
        )?;
        template.render(&[Message::new(Role::User, args.prompt.clone())], true)?
    } else {
        args.prompt.clone()
    };
    let ids = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
        .get_ids()
        .to_vec();
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop_ids: base.decoder.config.eos_token_id.into_iter().collect(),
    };
    let mut printed = String::new();
    let mut all = Vec::new();
    let mut stdout = std::io::stdout();
    generate(&base.decoder, adapter.as_ref(), &ids, &config, |id| {
        // Stream: decode everything so far and print what is new (multi-byte tokens stay whole).
        all.push(id);
        if let Ok(text) = tokenizer.decode(&all, true) {
            if text.len() > printed.len() && text.starts_with(&printed) {
                let _ = write!(stdout, "{}", &text[printed.len()..]);
                let _ = stdout.flush();
                printed = text;
            }
        }
    })?;
    println!();
    Ok(())
}
