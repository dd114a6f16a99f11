//! Bad input gets a typed error naming the file or tensor, never a panic.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::reference_dir;
use peft_wit::lora::peft::load_peft;
use peft_wit::model::load::{load_gguf, load_hf_dir, BaseDType};
use peft_wit::model::resolve_model;
use peft_wit::Error;

fn tiny(arch: &str) -> std::path::PathBuf {
    reference_dir().join("tiny").join(arch)
}

/// A copy of a tiny model dir whose files the test may damage.
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &dst.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
        }
    }
}

#[test]
fn missing_model_is_a_clear_error() {
    let err = resolve_model(Some("/definitely/not/here.gguf")).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound(_)), "{err}");
    let err = load_gguf(
        Path::new("/definitely/not/here.gguf"),
        BaseDType::F32,
        &Device::Cpu,
    )
    .err()
    .expect("must fail");
    assert!(
        err.to_string().contains("/definitely/not/here.gguf"),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_names_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&tiny("llama"), tmp.path());
    let weights = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_hf_dir(tmp.path(), BaseDType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
}

#[test]
fn truncated_and_garbage_gguf_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let garbage = tmp.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all").unwrap();
    let err = load_gguf(&garbage, BaseDType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("garbage.gguf"), "{err}");
    let Some(real) = common::real_model() else {
        return;
    };
    let bytes = std::fs::read(real).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1_000_000]).unwrap();
    let err = load_gguf(&cut, BaseDType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn unknown_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&tiny("llama"), tmp.path());
    let config = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(&config, text).unwrap();
    let err = load_hf_dir(tmp.path(), BaseDType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("gpt_neox"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&tiny("llama"), tmp.path());
    // Rewrite the weights without one tensor.
    let path = tmp.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.remove("model.layers.1.mlp.up_proj.weight").unwrap();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_hf_dir(tmp.path(), BaseDType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    match &err {
        Error::MissingTensor { name, .. } => assert_eq!(name, "model.layers.1.mlp.up_proj.weight"),
        other => panic!("expected MissingTensor, got {other}"),
    }
}

#[test]
fn adapter_for_another_base_is_refused() {
    // The tiny llama adapter against the real-size config of a different model shape.
    let model = load_hf_dir(&tiny("llama"), BaseDType::F32, &Device::Cpu).unwrap();
    let mut other = model.decoder.config.clone();
    other.hidden_size = 96;
    let err = load_peft(
        &tiny("llama").join("lora_r4"),
        &other,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(matches!(err, Error::AdapterMismatch { .. }), "{err}");
    assert!(err.to_string().contains("another base model"), "{err}");
    let mut fewer_layers = model.decoder.config.clone();
    fewer_layers.num_hidden_layers = 1;
    let err = load_peft(
        &tiny("llama").join("lora_r4"),
        &fewer_layers,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(err.to_string().contains("layer 1"), "{err}");
}

#[test]
fn malformed_or_unsupported_adapter_config_is_refused() {
    let model = load_hf_dir(&tiny("llama"), BaseDType::F32, &Device::Cpu).unwrap();
    let cfg = &model.decoder.config;
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&tiny("llama").join("lora_r4"), tmp.path());
    let path = tmp.path().join("adapter_config.json");
    let original = std::fs::read_to_string(&path).unwrap();

    std::fs::write(&path, "{ not json").unwrap();
    let err = load_peft(tmp.path(), cfg, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Json { .. }), "{err}");
    assert!(err.to_string().contains("adapter_config.json"), "{err}");

    std::fs::write(
        &path,
        original.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let err = load_peft(tmp.path(), cfg, DType::F32, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("DoRA"), "{err}");

    std::fs::write(
        &path,
        original.replace(
            "\"init_lora_weights\": true",
            "\"init_lora_weights\": \"pissa\"",
        ),
    )
    .unwrap();
    let err = load_peft(tmp.path(), cfg, DType::F32, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("pissa"), "{err}");

    std::fs::write(&path, &original).unwrap();
    std::fs::remove_file(tmp.path().join("adapter_model.safetensors")).unwrap();
    let err = load_peft(tmp.path(), cfg, DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("adapter_model.safetensors"),
        "{err}"
    );
}

#[test]
fn shipped_configs_parse_and_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = peft_wit::train::TrainConfig::from_toml_file(&path)
                .unwrap_or_else(|e| panic!("{e}"));
            cfg.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 2);
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "rank = \"sixteen\"\n").unwrap();
    let err = peft_wit::train::TrainConfig::from_toml_file(&bad).unwrap_err();
    assert!(
        err.to_string().contains("bad.toml") && err.to_string().contains("rank"),
        "{err}"
    );
}
