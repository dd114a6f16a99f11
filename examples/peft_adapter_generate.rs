//! Load a LoRA adapter trained elsewhere (a PEFT directory: adapter_config.json +
//! adapter_model.safetensors, e.g. from Python's `model.save_pretrained`) onto its base and
//! generate with it. The adapter is read by the same reader every peft-wit command uses, so a
//! PEFT variant peft-wit cannot compute faithfully (DoRA, lora_bias, ...) is refused, not
//! silently approximated.
//!
//! `cargo run --release --example peft_adapter_generate -- MODEL ADAPTER_DIR "PROMPT"`

use peft_wit::generate::{generate_text, GenerationConfig};
use peft_wit::lora::peft::load_peft;
use peft_wit::model::{resolve_model, BaseDType, BaseModel};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, adapter_dir, prompt] = args.as_slice() else {
        anyhow::bail!("usage: peft_adapter_generate MODEL ADAPTER_DIR PROMPT");
    };
    let device = candle_core::Device::Cpu;
    let base = BaseModel::load(&resolve_model(Some(model))?, BaseDType::F32, &device)?;
    let adapter = load_peft(
        std::path::Path::new(adapter_dir),
        &base.decoder.config,
        candle_core::DType::F32,
        &device,
    )?;
    println!(
        "adapter: r = {}, {} parameters on {:?}",
        adapter.config.r,
        adapter.num_parameters(),
        adapter.target_names()
    );
    let config = GenerationConfig {
        max_new_tokens: 32,
        ..GenerationConfig::default()
    };
    let chat = base.chat_template.is_some();
    for (label, with) in [("base", None), ("adapter", Some(&adapter))] {
        let text = generate_text(&base, with, prompt, chat, &config, |_| {})?;
        println!("[{label}] {}", text.trim());
    }
    Ok(())
}
