//! DPO: the loss and its gradients against finite differences (f64), the step-0 values by hand
//! (policy = reference gives exactly ln 2), and the `peft-wit dpo` command end to end on the tiny
//! model (new registry entry naming its parent, metrics, skipped pairs, errors naming file:line).

mod common;
#[path = "util.rs"]
mod util;

use candle_core::{DType, Device};
use common::gradcheck::{check_lora_gradients, sine_adapter};
use peft_wit::data::{LossWeights, TokenKind, TokenizedExample};
use peft_wit::dpo::loss::{micro_objective, pair_logps, softplus, StepScale};
use peft_wit::dpo::{PairBatch, PairTokens, RefLogps};
use peft_wit::lora::LoraAdapter;
use peft_wit::model::decoder::{Decoder, ForwardContext};
use peft_wit::model::random::{random_decoder, tiny_config};

/// A sequence of `prompt` then `answer` ids (all below the tiny vocabulary of 48).
fn example(prompt: &[u32], answer: &[u32]) -> TokenizedExample {
    let mut ids = vec![1];
    ids.extend(prompt);
    ids.extend(answer);
    let kinds = (0..ids.len())
        .map(|t| {
            if t == 0 {
                TokenKind::Template
            } else if t <= prompt.len() {
                TokenKind::User
            } else {
                TokenKind::Response
            }
        })
        .collect();
    TokenizedExample { ids, kinds }
}

/// Three pairs of different lengths (so the batch is padded), answers of different lengths.
fn pairs() -> Vec<PairTokens> {
    vec![
        PairTokens {
            chosen: example(&[5, 9, 13], &[20, 21, 2]),
            rejected: example(&[5, 9, 13], &[30, 2]),
        },
        PairTokens {
            chosen: example(&[7, 11], &[22, 2]),
            rejected: example(&[7, 11], &[40, 41, 42, 2]),
        },
        PairTokens {
            chosen: example(&[3, 4, 6, 8, 10], &[25, 26, 27, 2]),
            rejected: example(&[3, 4, 6, 8, 10], &[33, 2]),
        },
    ]
}

/// The test adapter of `decoder`: rank 2, deterministic non-zero B scaled by `b_scale`.
fn adapter(decoder: &Decoder, dtype: DType, b_scale: f64) -> LoraAdapter {
    sine_adapter(&decoder.config, dtype, decoder.device(), b_scale)
}

fn refs_of(decoder: &Decoder, adapter: &LoraAdapter, batch: &PairBatch) -> Vec<RefLogps> {
    let mut ctx = ForwardContext {
        adapter: Some(adapter),
        ..Default::default()
    };
    pair_logps(decoder, batch, &mut ctx).unwrap()
}

/// Autograd of the DPO objective (optionally + the WIT term on chosen answers) vs central
/// differences, on LoRA factors of both layers.
fn gradcheck(sft_weight: f64) {
    let config = tiny_config(false);
    let decoder = random_decoder(&config, 7, DType::F64, None, &Device::Cpu).unwrap();
    let pairs = pairs();
    let rows: Vec<&PairTokens> = pairs.iter().collect();
    let wit = LossWeights::new(0.3, 0.9);
    let batch = PairBatch::new(&rows, 2, (sft_weight > 0.0).then_some(&wit));
    // The reference is another adapter, so the rewards are away from the tie.
    let reference = refs_of(&decoder, &adapter(&decoder, DType::F64, 0.1), &batch);
    let policy = adapter(&decoder, DType::F64, 0.4);
    let scale = StepScale {
        beta: 0.5,
        step_pairs: 3,
        sft_weight,
        sft_denominator: batch.sft_tokens() as f64,
    };
    if sft_weight > 0.0 {
        // λp on 3 + 2 + 5 prompt tokens (position 0 excluded), λr on 3 + 2 + 4 answer tokens.
        assert_eq!(batch.sft_tokens(), 19);
    }
    let value_of = |adapter: &LoraAdapter| -> f64 {
        let mut ctx = ForwardContext {
            adapter: Some(adapter),
            ..Default::default()
        };
        micro_objective(&decoder, &batch, &reference, scale, &mut ctx)
            .unwrap()
            .value
    };
    let mut ctx = ForwardContext {
        adapter: Some(&policy),
        ..Default::default()
    };
    let obj = micro_objective(&decoder, &batch, &reference, scale, &mut ctx).unwrap();
    let m = obj.stats.mean();
    assert!(m.reward_margin.abs() > 1e-3, "rewards tie: {m:?}");
    let grads = obj.surrogate.backward().unwrap();
    let (checked, worst) = check_lora_gradients(
        &policy,
        &grads,
        |key| key.contains("layers.0.self_attn") || key.contains("layers.1.mlp"),
        |len| [0, len / 3, len - 1],
        value_of,
    );
    eprintln!("sft {sft_weight}: {checked} entries, worst relative error {worst:.2e}");
    assert!(checked >= 24, "{checked}");
}

#[test]
fn dpo_gradients_match_finite_differences() {
    gradcheck(0.0);
}

#[test]
fn dpo_with_sft_term_gradients_match_finite_differences() {
    gradcheck(0.7);
}

#[test]
fn policy_equal_to_reference_gives_ln2_and_hand_computed_rewards() {
    let config = tiny_config(false);
    let decoder = random_decoder(&config, 11, DType::F32, None, &Device::Cpu).unwrap();
    let policy = adapter(&decoder, DType::F32, 0.3);
    let pairs = pairs();
    let rows: Vec<&PairTokens> = pairs.iter().collect();
    let batch = PairBatch::new(&rows, 2, None);
    let reference = refs_of(&decoder, &policy, &batch);
    let scale = StepScale {
        beta: 0.1,
        step_pairs: 3,
        sft_weight: 0.0,
        sft_denominator: 0.0,
    };
    let run = |reference: &[RefLogps]| {
        let mut ctx = ForwardContext {
            adapter: Some(&policy),
            ..Default::default()
        };
        micro_objective(&decoder, &batch, reference, scale, &mut ctx).unwrap()
    };
    let obj = run(&reference);
    let m = obj.stats.mean();
    assert!(
        (obj.value - std::f64::consts::LN_2).abs() < 1e-12,
        "{}",
        obj.value
    );
    assert!((m.loss - std::f64::consts::LN_2).abs() < 1e-12, "{m:?}");
    assert_eq!(m.reward_accuracy, 0.0, "a tie is not a correct pair");
    assert_eq!(m.reward_margin, 0.0);
    assert_eq!((m.chosen_reward, m.rejected_reward), (0.0, 0.0));
    // The gradient at the tie is -σ(0)·β = -0.05 per log-prob unit: not zero.
    let grads = obj.surrogate.backward().unwrap();
    let norm: f32 = policy
        .vars()
        .iter()
        .filter_map(|v| grads.get(v.as_tensor()))
        .map(|g| {
            g.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    assert!(norm > 0.0, "no gradient at the tie");

    // Reference log-prob of pair 0's chosen answer 2 nats lower: its chosen reward is
    // β·2 = 0.2, rejected 0, so it alone is correct, with loss softplus(-0.2).
    let mut shifted = reference.clone();
    shifted[0].chosen -= 2.0;
    let obj = run(&shifted);
    let m = obj.stats.mean();
    let expected = (softplus(-0.2) + 2.0 * std::f64::consts::LN_2) / 3.0;
    assert!(
        (obj.value - expected).abs() < 1e-6,
        "{} vs {expected}",
        obj.value
    );
    assert!((m.reward_accuracy - 1.0 / 3.0).abs() < 1e-12, "{m:?}");
    assert!((m.reward_margin - 0.2 / 3.0).abs() < 1e-6, "{m:?}");
    assert!((m.chosen_reward - 0.2 / 3.0).abs() < 1e-6, "{m:?}");
    // log σ(0.2) by hand: ln(1 / (1 + e^-0.2)) = -0.598139...
    assert!((softplus(-0.2) - 0.598_138_869).abs() < 1e-8);
}

/// Pairs in every accepted layout, one identical pair and one HH dialogue.
fn prefs() -> String {
    let mut rows = Vec::new();
    let words = [
        "red", "blue", "green", "gold", "grey", "pink", "teal", "plum",
    ];
    for i in 0..10 {
        let (a, b) = (words[i % 8], words[(i * 3 + 1) % 8]);
        rows.push(serde_json::json!({
            "prompt": format!("Say {a} {b}."),
            "chosen": format!("{a} {b}"),
            "rejected": format!("{b} {a} no"),
        }));
    }
    rows.push(serde_json::json!({
        "prompt": [{"role": "user", "content": "Say red."}],
        "chosen": [{"role": "assistant", "content": "red"}],
        "rejected": [{"role": "assistant", "content": "blue"}],
    }));
    rows.push(serde_json::json!({"prompt": "Say teal.", "chosen": "teal", "rejected": "teal"}));
    rows.push(serde_json::json!({
        "chosen": "\n\nHuman: Say gold.\n\nAssistant: gold?\n\nHuman: Yes.\n\nAssistant: gold",
        "rejected": "\n\nHuman: Say gold.\n\nAssistant: gold?\n\nHuman: Yes.\n\nAssistant: no",
    }));
    rows.iter().map(|r| format!("{r}\n")).collect()
}

#[test]
fn dpo_command_makes_a_child_adapter() {
    let dir = util::Dir::tiny();
    dir.train("start", "2")
        .args([
            "--loss",
            "wit",
            "--prompt-weight",
            "0.2",
            "--response-weight",
            "0.8",
        ])
        .all_output();
    let prefs = dir.write("prefs.jsonl", &prefs());
    let out = dir
        .cmd_with_model(&["dpo", "--adapter", "start", "--quiet", "--data"])
        .arg(&prefs)
        .args([
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--eval-fraction",
            "0.25",
        ])
        .args(["--sft-weight", "0.5", "--lr", "1e-3"])
        .all_output();
    // 13 rows: the identical pair skipped and reported, 12 pairs, 3 held out.
    assert!(out.contains("13 rows: 12 pairs kept"), "{out}");
    assert!(
        out.contains("1 x chosen and rejected are identical"),
        "{out}"
    );
    assert!(out.contains("prefs.jsonl:12"), "{out}");
    assert!(out.contains("9 train / 3 held-out pairs"), "{out}");
    assert!(out.contains("reward accuracy"), "{out}");

    let show = dir
        .cmd(&["adapters", "show", "start-dpo", "--json"])
        .stdout();
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    let meta = &show["meta"];
    assert_eq!(meta["parent"], "start");
    assert_eq!(meta["dpo"]["beta"].as_f64(), Some(0.1));
    assert_eq!(meta["dpo"]["sft_weight"].as_f64(), Some(0.5));
    assert_eq!(meta["dpo"]["pairs"], 9);
    assert_eq!(meta["dpo"]["eval_pairs"], 3);
    assert_eq!(meta["steps"], 3);
    // The parent's λp/λr (those of the SFT term) are kept.
    assert_eq!(meta["loss"]["prompt_weight"].as_f64(), Some(0.2));
    let metrics = meta["metrics"].as_object().unwrap();
    for key in [
        "dpo/loss",
        "reward_accuracy",
        "reward_margin",
        "chosen_logp",
        "rejected_logp",
        "eval_reward_accuracy_before",
        "eval_reward_accuracy_after",
        "eval_logp_accuracy_before",
        "eval_dpo_loss_after",
    ] {
        assert!(metrics.contains_key(key), "no metric {key}: {metrics:?}");
    }
    let before = metrics["eval_dpo_loss_before"].as_f64().unwrap();
    assert!((before - std::f64::consts::LN_2).abs() < 1e-9, "{before}");
    assert_eq!(metrics["eval_reward_accuracy_before"].as_f64(), Some(0.0));
    let after = metrics["eval_dpo_loss_after"].as_f64().unwrap();
    assert!(after.is_finite() && after != before, "{after}");

    // One metrics line per step plus the two evaluations.
    let history = std::fs::read_to_string(dir.registry().join("start-dpo/metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = history
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{history}");
    assert!(lines[1]["dpo/loss"].as_f64().is_some() && lines[1]["sft_loss"].as_f64().is_some());
    let text = dir.cmd(&["adapters", "show", "start-dpo"]).stdout();
    assert!(text.contains("parent") && text.contains("start"), "{text}");

    // The new adapter is an ordinary adapter: it generates.
    dir.cmd_with_model(&["generate", "--adapter", "start-dpo", "--prompt", "Say red."])
        .args(["--max-new-tokens", "2"])
        .stdout();
    // Same name again without --force: refused.
    let err = dir
        .cmd_with_model(&["dpo", "--adapter", "start", "--quiet", "--data"])
        .arg(&prefs)
        .args(["--max-steps", "1"])
        .fails();
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn dpo_bad_input_is_an_error_naming_the_line() {
    let dir = util::Dir::tiny();
    let bad = dir.write(
        "bad.jsonl",
        "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n\n{\"prompt\": \"p\", \"chosen\": \"a\"}\n",
    );
    let err = dir
        .cmd_with_model(&["dpo", "--adapter", "none", "--data"])
        .arg(&bad)
        .fails();
    assert!(
        err.contains("bad.jsonl:3: missing field `rejected`"),
        "{err}"
    );
    let no_prompt = dir.write("np.jsonl", "{\"chosen\": \"a\", \"rejected\": \"b\"}\n");
    let err = dir
        .cmd_with_model(&["dpo", "--adapter", "none", "--data"])
        .arg(&no_prompt)
        .fails();
    assert!(err.contains("np.jsonl:1: missing field `prompt`"), "{err}");
    let not_json = dir.write("nj.jsonl", "{\"prompt\": \n");
    let err = dir
        .cmd_with_model(&["dpo", "--adapter", "none", "--data"])
        .arg(&not_json)
        .fails();
    assert!(err.contains("nj.jsonl:1: invalid JSON"), "{err}");
    // Good data, unknown adapter.
    let good = dir.write(
        "good.jsonl",
        "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n",
    );
    let err = dir
        .cmd_with_model(&["dpo", "--adapter", "none", "--data"])
        .arg(&good)
        .fails();
    assert!(err.contains("adapter `none`"), "{err}");
    let err = dir
        .cmd_with_model(&["dpo", "--adapter", "none", "--beta", "0", "--data"])
        .arg(&good)
        .fails();
    assert!(err.contains("--beta must be positive"), "{err}");
}
