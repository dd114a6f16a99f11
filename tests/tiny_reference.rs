//! Parity with transformers + PEFT on the tiny random llama (llama3 rope scaling), qwen2 (q/k/v
//! bias, tied embeddings) and mistral models in `../shared/reference/tiny/`, on the CPU or on
//! `PEFT_WIT_TEST_DEVICE` (see `common::test_device`).

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::*;
use peft_wit::lora::peft::load_peft;
use peft_wit::model::decoder::ForwardContext;
use peft_wit::model::load::{load_hf_dir, BaseDType};

const ARCHS: [&str; 3] = ["llama", "qwen2", "mistral"];

struct Fixture {
    reference: serde_json::Value,
    inputs: ReferenceBatch,
    mask: Vec<u8>,
}

fn tiny_dir(arch: &str) -> PathBuf {
    reference_dir().join("tiny").join(arch)
}

fn fixture(arch: &str) -> Fixture {
    let reference = read_json(tiny_dir(arch).join("reference.json"));
    let mask: Vec<u8> = reference["attention_mask"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| u32s(r).into_iter().map(|x| x as u8))
        .collect();
    Fixture {
        inputs: ReferenceBatch::from_json(&reference),
        mask,
        reference,
    }
}

impl Fixture {
    /// The input ids and the attention mask, `[batch, seq]` tensors on `dev`.
    fn tensors(&self, dev: &Device) -> (Tensor, Tensor) {
        let shape = (self.inputs.rows, self.inputs.seq);
        (
            Tensor::from_slice(&self.inputs.ids, shape, dev).unwrap(),
            Tensor::from_slice(&self.mask, shape, dev).unwrap(),
        )
    }
}

fn rows_of(logits: &Tensor, row: usize, take: usize) -> Vec<f32> {
    logits
        .get(row)
        .unwrap()
        .narrow(0, 0, take)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn flat(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().flat_map(f32s).collect()
}

#[test]
fn base_logits_match_transformers() {
    let dev = test_device();
    let slack = gpu_slack(&dev, false);
    for arch in ARCHS {
        let f = fixture(arch);
        let model = load_hf_dir(&tiny_dir(arch), BaseDType::F32, &dev).unwrap();
        let (ids, mask) = f.tensors(&dev);
        let logits = model
            .decoder
            .forward(&ids, Some(&mask), &mut ForwardContext::default())
            .unwrap();
        let d0 = max_abs_diff(&rows_of(&logits, 0, 12), &flat(&f.reference["logits_row0"]));
        let d1 = max_abs_diff(
            &rows_of(&logits, 1, 7),
            &flat(&f.reference["logits_row1_first7"]),
        );
        eprintln!("{arch}: max |Δlogit| row0 {d0:.2e}, row1 {d1:.2e}");
        let tol = 1e-3 * slack as f32;
        assert!(d0 < tol && d1 < tol, "{arch}: logits differ: {d0} {d1}");
    }
}

#[test]
fn peft_adapter_logits_loss_and_gradients_match() {
    let dev = test_device();
    let slack = gpu_slack(&dev, false);
    for arch in ARCHS {
        let f = fixture(arch);
        let dir = tiny_dir(arch);
        let model = load_hf_dir(&dir, BaseDType::F32, &dev).unwrap();
        let adapter = load_peft(
            &dir.join("lora_r4"),
            &model.decoder.config,
            candle_core::DType::F32,
            &dev,
        )
        .unwrap();
        let (ids, mask) = f.tensors(&dev);
        let mut ctx = ForwardContext {
            adapter: Some(&adapter),
            ..Default::default()
        };
        let logits = model.decoder.forward(&ids, Some(&mask), &mut ctx).unwrap();
        let d = max_abs_diff(
            &rows_of(&logits, 0, 12),
            &flat(&f.reference["lora_r4"]["logits_row0"]),
        );
        assert!(
            d < 1e-3 * slack as f32,
            "{arch}: adapted logits differ by {d}"
        );

        for case in f.reference["lora_r4"]["wit"].as_array().unwrap() {
            let (lp, lr) = (
                case["prompt_weight"].as_f64().unwrap() as f32,
                case["response_weight"].as_f64().unwrap() as f32,
            );
            let (loss, count, gn, _) =
                wit_loss_and_grad_norms(&model.decoder, &adapter, &f.inputs.wit_batch(lp, lr));
            let (el, ec, eg) = (
                case["loss"].as_f64().unwrap(),
                case["token_count"].as_u64().unwrap() as usize,
                case["lora_grad_global_l2"].as_f64().unwrap(),
            );
            eprintln!("{arch} ({lp},{lr}): loss {loss:.6} vs {el}, count {count} vs {ec}, grad {gn:.6} vs {eg}");
            assert_eq!(count, ec, "{arch}: token count");
            assert!(
                rel_err(loss, el) < 1e-4 * slack,
                "{arch}: loss {loss} vs {el}"
            );
            assert!(
                rel_err(gn, eg) < 1e-3 * slack,
                "{arch}: grad norm {gn} vs {eg}"
            );
        }
    }
}

#[test]
fn half_precision_bases_stay_close_to_f32() {
    let dev = test_device();
    let slack = gpu_slack(&dev, true) as f32;
    let f = fixture("llama");
    let dir = tiny_dir("llama");
    let (ids, mask) = f.tensors(&dev);
    let expected = flat(&f.reference["logits_row0"]);
    let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (dtype, tol) in [
        (BaseDType::F16, 0.01),
        (BaseDType::Bf16, 0.05),
        (BaseDType::Quantized, 0.05),
    ] {
        let model = load_hf_dir(&dir, dtype, &dev).unwrap();
        let logits = model
            .decoder
            .forward(&ids, Some(&mask), &mut ForwardContext::default())
            .unwrap();
        let d = max_abs_diff(&rows_of(&logits, 0, 12), &expected);
        eprintln!("{dtype:?}: max |Δlogit| {d:.3e} (logits up to {scale:.1})");
        assert!(d < tol * slack * scale, "{dtype:?}: {d}");
    }
}

#[test]
fn cached_generation_equals_full_recompute_with_an_adapter() {
    let dev = test_device();
    use peft_wit::generate::{generate, GenerationConfig};
    for arch in ARCHS {
        let dir = tiny_dir(arch);
        let model = load_hf_dir(&dir, BaseDType::F32, &dev).unwrap();
        let mut adapter = load_peft(
            &dir.join("lora_r4"),
            &model.decoder.config,
            candle_core::DType::F32,
            &dev,
        )
        .unwrap();
        for rslora in [false, true] {
            if rslora {
                // rsLoRA scales by alpha/sqrt(r) instead of alpha/r.
                adapter.config.use_rslora = true;
                adapter = rescaled(&adapter, &dev);
            }
            let prompt = [1u32, 17, 250, 33, 99];
            let config = GenerationConfig {
                max_new_tokens: 8,
                ..Default::default()
            };
            let cached =
                generate(&model.decoder, Some(&adapter), &prompt, &config, |_| {}).unwrap();
            // Greedy by full forward passes without a cache.
            let mut ids = prompt.to_vec();
            for _ in 0..8 {
                let input = Tensor::from_slice(&ids, (1, ids.len()), &dev).unwrap();
                let mut ctx = ForwardContext {
                    adapter: Some(&adapter),
                    ..Default::default()
                };
                let logits = model.decoder.forward(&input, None, &mut ctx).unwrap();
                let last: Vec<f32> = logits
                    .get(0)
                    .unwrap()
                    .get(ids.len() - 1)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let next = (0..last.len())
                    .max_by(|&a, &b| last[a].total_cmp(&last[b]))
                    .unwrap() as u32;
                ids.push(next);
            }
            assert_eq!(
                cached,
                ids[prompt.len()..].to_vec(),
                "{arch} rslora={rslora}"
            );
        }
    }
}

/// The same factors with every pair's scale recomputed from the (changed) config.
fn rescaled(
    adapter: &peft_wit::lora::LoraAdapter,
    dev: &candle_core::Device,
) -> peft_wit::lora::LoraAdapter {
    let tmp = tempfile::tempdir().unwrap();
    peft_wit::lora::peft::save_peft(adapter, tmp.path(), "tiny").unwrap();
    let text = std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap();
    assert!(text.contains("\"use_rslora\": true"));
    let cfg = load_hf_dir(&tiny_dir("llama"), BaseDType::F32, dev)
        .unwrap()
        .decoder
        .config;
    let mut cfg = cfg;
    cfg.num_hidden_layers = adapter.num_layers();
    let back = load_peft(tmp.path(), &cfg, candle_core::DType::F32, dev).unwrap();
    let expected = 8.0 / 2.0; // alpha / sqrt(r) with alpha 8, r 4
    assert_eq!(back.pair(0, 0).unwrap().scale, expected);
    back
}
