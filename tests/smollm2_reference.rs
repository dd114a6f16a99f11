//! Parity with transformers + PEFT on the real SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to
//! f32 by the reference). Skipped, loudly, when the model has not been fetched.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use peft_wit::data::Batch;
use peft_wit::generate::{generate, GenerationConfig};
use peft_wit::lora::peft::load_peft;
use peft_wit::loss::{wit_loss, Normalization};
use peft_wit::model::decoder::ForwardContext;
use peft_wit::model::load::{load_gguf, BaseDType, BaseModel};

fn smollm_reference(file: &str) -> serde_json::Value {
    read_json(reference_dir().join("smollm2-135m-instruct").join(file))
}

fn load(base_dtype: BaseDType) -> Option<BaseModel> {
    let path = real_model()?;
    Some(load_gguf(&path, base_dtype, &Device::Cpu).expect("load GGUF"))
}

/// Compares one sequence's logits with the reference summary (top-5, logsumexp, next logprob).
fn check_positions(logits: &Tensor, positions: &serde_json::Value, what: &str) {
    let positions = positions.as_array().unwrap();
    let mut worst = 0f32;
    for p in positions {
        let pos = p["pos"].as_u64().unwrap() as usize;
        let row: Vec<f32> = logits.get(pos).unwrap().to_vec1().unwrap();
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let top5: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
        assert_eq!(
            top5,
            u32s(&p["top5_ids"]),
            "{what}: top-5 ids at position {pos}"
        );
        let expected = f32s(&p["top5_logits"]);
        for (i, &id) in top5.iter().enumerate() {
            worst = worst.max((row[id as usize] - expected[i]).abs());
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
        worst = worst.max((lse - p["logsumexp"].as_f64().unwrap() as f32).abs());
    }
    eprintln!("{what}: max |Δ| over top-5 logits and logsumexp: {worst:.2e}");
    assert!(worst < 2e-3, "{what}: logits differ by {worst}");
}

#[test]
fn base_logits_and_greedy_continuation_match() {
    let reference = smollm_reference("base_logits.json");
    let ids = u32s(&reference["input_ids"]);
    let prompt = u32s(&reference["greedy"]["prompt_ids"]);
    let expected_new = u32s(&reference["greedy"]["new_ids"]);
    for base_dtype in [BaseDType::F32, BaseDType::Quantized] {
        let Some(model) = load(base_dtype) else {
            return;
        };
        let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
        let logits = model
            .decoder
            .forward(&input, None, &mut ForwardContext::default())
            .unwrap();
        check_positions(
            &logits.squeeze(0).unwrap(),
            &reference["positions"],
            base_dtype.name(),
        );
        let config = GenerationConfig {
            max_new_tokens: expected_new.len(),
            stop_ids: vec![2],
            ..Default::default()
        };
        let new = generate(&model.decoder, None, &prompt, &config, |_| {}).unwrap();
        assert_eq!(
            new,
            expected_new,
            "{}: greedy continuation",
            base_dtype.name()
        );
        let text = model.tokenizer().unwrap().decode(&new, false).unwrap();
        assert!(text.contains("Paris"), "{text}");
    }
}

#[test]
fn peft_adapter_logits_loss_and_gradients_match_dense_and_quantized() {
    let reference = smollm_reference("lora_loss.json");
    let adapter_dir = reference_dir()
        .join("smollm2-135m-instruct")
        .join("lora_r4");
    let batch_ref = &reference["batch"];
    let rows: Vec<Vec<u32>> = batch_ref["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(u32s)
        .collect();
    let (b, t) = (rows.len(), rows[0].len());
    let prompt_lens = usizes(&batch_ref["prompt_lens"]);
    let seq_lens = usizes(&batch_ref["seq_lens"]);
    for base_dtype in [BaseDType::F32, BaseDType::Quantized] {
        let Some(model) = load(base_dtype) else {
            return;
        };
        let adapter = load_peft(
            &adapter_dir,
            &model.decoder.config,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();

        let seq = u32s(&reference["adapted_logits"]["input_ids"]);
        let input = Tensor::from_slice(&seq, (1, seq.len()), &Device::Cpu).unwrap();
        let mut ctx = ForwardContext {
            adapter: Some(&adapter),
            ..Default::default()
        };
        let logits = model.decoder.forward(&input, None, &mut ctx).unwrap();
        check_positions(
            &logits.squeeze(0).unwrap(),
            &reference["adapted_logits"]["positions"],
            &format!("{} + lora_r4", base_dtype.name()),
        );

        for case in reference["results"].as_array().unwrap() {
            let lp = case["prompt_weight"].as_f64().unwrap() as f32;
            let lr = case["response_weight"].as_f64().unwrap() as f32;
            let weights = reference_weights(&prompt_lens, &seq_lens, t, lp, lr);
            let batch = Batch {
                ids: rows.concat(),
                weights,
                seq_lens: seq_lens.clone(),
                batch: b,
                seq_len: t,
            };
            let mut ctx = ForwardContext {
                adapter: Some(&adapter),
                ..Default::default()
            };
            let (loss, count) =
                wit_loss(&model.decoder, &batch, Normalization::TokenCount, &mut ctx).unwrap();
            let grads = loss.backward().unwrap();
            let (global, per_key) = lora_grad_norms(&adapter, &grads);
            let loss = loss.to_scalar::<f32>().unwrap() as f64;
            let what = format!("{} ({lp},{lr})", base_dtype.name());
            eprintln!(
                "{what}: loss {loss:.6} vs {}, grad {global:.6} vs {}",
                case["loss"], case["lora_grad_global_l2"]
            );
            assert_eq!(
                count,
                case["token_count"].as_u64().unwrap() as usize,
                "{what}: count"
            );
            assert!(
                rel_err(loss, case["loss"].as_f64().unwrap()) < 1e-4,
                "{what}: loss {loss}"
            );
            assert!(
                rel_err(global, case["lora_grad_global_l2"].as_f64().unwrap()) < 1e-3,
                "{what}: global grad {global}"
            );
            for (key, sel) in case["selected"].as_object().unwrap() {
                let ours = key.replace(".default.weight", ".weight");
                let (norm, _first4) = &per_key[&ours];
                let expected = sel["grad_l2"].as_f64().unwrap();
                assert!(
                    rel_err(*norm, expected) < 1e-3,
                    "{what}: {key} grad norm {norm} vs {expected}"
                );
            }
        }
    }
}
