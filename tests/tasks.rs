//! Benchmark tasks on the real model: the harness's request semantics against direct
//! computations (log-likelihoods with and without the shared-prefix cache, batched against
//! single-sequence generation), the built-in tasks end to end on small files written here, and
//! bad input.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use peft_wit::model::decoder::ForwardContext;
use peft_wit::model::{BaseDType, BaseModel, ModelLocation};
use peft_wit::tasks::lm::LanguageModel;
use peft_wit::tasks::{DataSource, RunOptions, Suite};

fn load_base() -> Option<BaseModel> {
    let path = common::real_model()?;
    Some(BaseModel::load(&ModelLocation::Gguf(path), BaseDType::F32, &Device::Cpu).unwrap())
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A task-data directory in the original layouts, small enough for a test.
fn task_data(dir: &Path) {
    for subject in ["anatomy", "astronomy"] {
        let dev: String = (0..5)
            .map(|i| {
                format!(
                    "\"What is {i} + {i} in {subject}?\",{},{},{},{},B\n",
                    i,
                    2 * i,
                    3 * i,
                    4 * i
                )
            })
            .collect();
        write(&dir.join(format!("mmlu/dev/{subject}_dev.csv")), &dev);
        let test = "Which planet is known as the red planet?,Venus,Mars,Jupiter,Saturn,B\n\
                    \"How many bones are in the adult human body, roughly?\",12,206,1000,5,B\n\
                    What is the largest organ of the human body?,Skin,Liver,Heart,Brain,A\n";
        write(&dir.join(format!("mmlu/test/{subject}_test.csv")), test);
    }
    write(
        &dir.join("bbh/cot-prompts/boolean_expressions.txt"),
        "BIG-Bench Hard canary\n-----\nEvaluate the result of a random Boolean expression.\n\n\
         Q: not ( ( not not True ) ) is\nA: Let's think step by step.\nnot ( True ) = False. So the answer is False.\n\n\
         Q: True and False and not True and True is\nA: Let's think step by step.\nIt is False. So the answer is False.\n\n\
         Q: not not ( not ( False ) ) is\nA: Let's think step by step.\nIt is True. So the answer is True.\n",
    );
    write(
        &dir.join("bbh/bbh/boolean_expressions.json"),
        r#"{"examples": [{"input": "not True or False is", "target": "False"}, {"input": "True and not False is", "target": "True"}]}"#,
    );
    let train: String = (1..=6)
        .map(|i| format!("{{\"question\": \"Tom has {i} apples and buys {i} more. How many?\", \"answer\": \"{i} + {i} = {}\\n#### {}\"}}\n", 2 * i, 2 * i))
        .collect();
    write(&dir.join("gsm8k/train.jsonl"), &train);
    write(
        &dir.join("gsm8k/test.jsonl"),
        "{\"question\": \"Ann has 3 pens and gets 4 more. How many pens?\", \"answer\": \"3 + 4 = 7\\n#### 7\"}\n\
         {\"question\": \"A box holds 5 eggs. How many eggs in 2 boxes?\", \"answer\": \"5 * 2 = 10\\n#### 10\"}\n",
    );
    write(
        &dir.join("ifeval/input_data.jsonl"),
        "{\"key\": 1, \"prompt\": \"Write a short note about cats. Do not use any commas.\", \"instruction_id_list\": [\"punctuation:no_comma\"], \"kwargs\": [{}]}\n\
         {\"key\": 2, \"prompt\": \"Describe the sea in at least 5 words, all in lowercase.\", \"instruction_id_list\": [\"length_constraints:number_words\", \"change_case:english_lowercase\"], \"kwargs\": [{\"relation\": \"at least\", \"num_words\": 5}, {}]}\n",
    );
}

/// `Σ log p(continuation | context)` from one plain forward pass over the whole sequence.
fn direct_logprob(base: &BaseModel, ctx: &[u32], cont: &[u32]) -> f64 {
    let mut ids = ctx.to_vec();
    ids.extend_from_slice(cont);
    let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
    let mut fctx = ForwardContext {
        no_grad: true,
        ..Default::default()
    };
    let logits = base.decoder.forward(&input, None, &mut fctx).unwrap();
    let logits = logits
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let mut total = 0.0;
    for (k, &tok) in cont.iter().enumerate() {
        let row = &logits[ctx.len() + k - 1];
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        total += row[tok as usize] - lse;
    }
    total
}

#[test]
fn loglikelihoods_match_a_plain_forward_with_and_without_the_prefix_cache() {
    let Some(base) = load_base() else { return };
    let tok = base.tokenizer().unwrap();
    let mut lm = LanguageModel::new(&base.decoder, None, tok, None);
    let shots = "The following are questions.\n\nQ: 2 + 2?\nAnswer: 4\n\nQ: 3 + 5?\nAnswer: 8\n\n";
    let contexts = [
        format!("{shots}Q: 1 + 6?\nAnswer:"),
        format!("{shots}Q: 9 - 3?\nAnswer:"),
        format!("{shots}Q: 9 - 3?\nAnswer: "), // trailing space moves into the continuation
    ];
    let continuations = vec![
        " 7".to_string(),
        " six".to_string(),
        " 12 apples".to_string(),
    ];
    for context in &contexts {
        let got = lm.loglikelihoods(context, &continuations).unwrap();
        for (cont, ll) in continuations.iter().zip(&got) {
            let (c, k) = lm.encode_pair(context, cont).unwrap();
            let want = direct_logprob(&base, &c, &k);
            assert!(
                (ll.logprob - want).abs() < 2e-3,
                "{context:?} + {cont:?}: cached {} vs direct {want}",
                ll.logprob
            );
        }
    }
    // The harness's pair encoding: whitespace at the end of the context goes to the continuation.
    let (c1, k1) = lm.encode_pair("Answer: ", "7").unwrap();
    let (c2, _) = lm.encode_pair("Answer:", " 7").unwrap();
    assert_eq!(c1, c2);
    assert_eq!(lm.decode(&k1).unwrap(), " 7");
}

#[test]
fn batched_generation_matches_one_sequence_at_a_time() {
    let Some(base) = load_base() else { return };
    let tok = base.tokenizer().unwrap();
    let contexts: Vec<String> = [
        "Question: What is the capital of France?\nAnswer:",
        "Question: Name three colours of the rainbow, then explain why the sky looks blue during the day.\nAnswer:",
        "Q: 2+2=",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let until = vec!["Question:".to_string(), "\n\n".to_string()];
    let mut lm = LanguageModel::new(&base.decoder, None, tok, None);
    let batched = lm.generate_until(&contexts, &until, 12, 3, |_| {}).unwrap();
    let single: Vec<String> = contexts
        .iter()
        .map(|c| {
            lm.generate_until(std::slice::from_ref(c), &until, 12, 1, |_| {})
                .unwrap()
                .remove(0)
        })
        .collect();
    assert_eq!(batched, single);
    assert!(batched.iter().any(|t| !t.is_empty()), "{batched:?}");
    for text in &batched {
        assert!(
            !text.contains("Question:") && !text.contains("\n\n"),
            "{text:?}"
        );
    }
}

#[test]
fn builtin_tasks_end_to_end_on_local_files() {
    let Some(base) = load_base() else { return };
    let dir = tempfile::tempdir().unwrap();
    task_data(dir.path());
    let data = DataSource {
        local_dir: Some(dir.path().to_path_buf()),
    };
    let options = RunOptions {
        limit: Some(2),
        max_gen_toks: Some(24),
        batch_size: 2,
        sensitivity: 2,
        ..Default::default()
    };
    let names: Vec<String> = [
        "mmlu_anatomy",
        "mmlu_astronomy",
        "bbh_cot_fewshot_boolean_expressions",
        "gsm8k",
        "ifeval",
    ]
    .map(String::from)
    .to_vec();
    let mut suite = Suite::prepare(&names, &[], &data, options, &base).unwrap();
    suite.progress = false;
    assert_eq!(suite.tasks.len(), 5);
    // gsm8k: five shots from six training rows, drawn with the harness's seed.
    assert_eq!(suite.tasks[3].contexts[0].matches("Question:").count(), 6);
    let result = suite.evaluate(&base, None, "base").unwrap();
    let json = result.harness_json(&suite.tasks, &base.name);
    for task in [
        "mmlu_anatomy",
        "bbh_cot_fewshot_boolean_expressions",
        "gsm8k",
        "ifeval",
    ] {
        assert!(json["results"][task].is_object(), "{task} missing: {json}");
    }
    let acc = json["results"]["mmlu_anatomy"]["acc,none"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert_eq!(json["n-samples"]["mmlu_anatomy"]["original"], 3);
    assert_eq!(json["n-samples"]["mmlu_anatomy"]["effective"], 2);
    // Both MMLU subjects sit under mmlu_stem and mmlu, weighted by size.
    assert!(json["groups"]["mmlu"]["acc,none"].is_number(), "{json}");
    assert!(json["results"]["gsm8k"]["exact_match,strict-match"].is_number());
    assert!(json["results"]["gsm8k"]["exact_match,flexible-extract"].is_number());
    assert!(
        json["results"]["bbh_cot_fewshot_boolean_expressions"]["exact_match,get-answer"]
            .is_number()
    );
    for m in [
        "prompt_level_strict_acc,none",
        "inst_level_strict_acc,none",
        "prompt_level_loose_acc,none",
        "inst_level_loose_acc,none",
    ] {
        assert!(json["results"]["ifeval"][m].is_number(), "{m}: {json}");
    }
    assert_eq!(
        json["results"]["ifeval"]["inst_level_strict_acc_stderr,none"],
        "N/A"
    );
    // Prompt robustness over the built-in variants (MMLU, GSM8K have them; BBH does not).
    let s = json["results"]["mmlu_anatomy"]["sensitivity,none"]
        .as_f64()
        .unwrap();
    assert!(s.is_finite() && s >= 0.0, "{s}");
    assert!(
        json["results"]["gsm8k"]["sensitivity,none"].is_number(),
        "{json}"
    );
    assert!(json["results"]["bbh_cot_fewshot_boolean_expressions"]
        .get("sensitivity,none")
        .is_none());
    // Per-example samples carry what the comparison script reads.
    let mmlu = &result.tasks[0].samples[0];
    assert_eq!(mmlu.loglikelihoods.as_ref().unwrap().len(), 4);
    assert!(mmlu.prompt.ends_with("Answer:"));
    let gsm = &result.tasks[3].samples[0];
    assert!(gsm.output.is_some() && gsm.filtered.contains_key("strict-match"));
    // The headline columns a sweep plots.
    let labels: Vec<String> = result.columns().into_iter().map(|(l, _, _)| l).collect();
    assert!(labels.contains(&"mmlu".to_string()), "{labels:?}");
    assert!(
        labels.contains(&"gsm8k:strict-match".to_string()),
        "{labels:?}"
    );
}

#[test]
fn bad_task_input_is_named() {
    let Some(base) = load_base() else { return };
    let dir = tempfile::tempdir().unwrap();
    task_data(dir.path());
    let data = DataSource {
        local_dir: Some(dir.path().to_path_buf()),
    };
    let prepare = |names: &[&str], data: &DataSource| {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        Suite::prepare(&names, &[], data, RunOptions::default(), &base)
            .err()
            .map(|e| e.to_string())
    };
    let unknown = prepare(&["mmlu_anatomyy"], &data).unwrap();
    assert!(
        unknown.contains("unknown task `mmlu_anatomyy`") && unknown.contains("mmlu_anatomy"),
        "{unknown}"
    );
    // The whole mmlu group needs every subject's files.
    let missing = prepare(&["mmlu"], &data).unwrap();
    assert!(missing.contains("abstract_algebra_test.csv"), "{missing}");
    // A malformed CSV row is named with its file and line.
    write(
        &dir.path().join("mmlu/test/anatomy_test.csv"),
        "q,a,b,c,d,A\nbroken,row\n",
    );
    let bad = prepare(&["mmlu_anatomy"], &data).unwrap();
    assert!(
        bad.contains("anatomy_test.csv") && bad.contains("line 2"),
        "{bad}"
    );
    // A task file whose template does not render names the field.
    let task_file = dir.path().join("mine.toml");
    write(
        &dir.path().join("mine.jsonl"),
        "{\"q\": \"hi\", \"a\": \"x\"}\n",
    );
    write(
        &task_file,
        "[[task]]\ntask = \"mine\"\noutput_type = \"generate_until\"\ndataset = { layout = \"files\", data_files = { test = \"mine.jsonl\" } }\ndoc_to_text = \"{{ q | nosuch }}\"\ndoc_to_target = \"{{a}}\"\n",
    );
    let err = Suite::prepare(
        &["mine".into()],
        &[task_file],
        &data,
        RunOptions::default(),
        &base,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("doc_to_text"), "{err}");
}

#[test]
fn eval_command_writes_harness_results_and_samples() {
    let Some(model) = common::real_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    task_data(dir.path());
    let out = dir.path().join("out");
    let samples = dir.path().join("samples.jsonl");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_peft-wit"))
        .args([
            "eval",
            "--base",
            "--tasks",
            "mmlu_anatomy,gsm8k",
            "--limit",
            "2",
            "--max-gen-toks",
            "8",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--task-data")
        .arg(dir.path())
        .arg("--output-path")
        .arg(&out)
        .arg("--log-samples")
        .arg(&samples)
        .arg("--registry")
        .arg(dir.path().join("adapters"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("mmlu") && stdout.contains("gsm8k:strict-match"),
        "{stdout}"
    );
    let results = common::read_json(out.join("base/results.json"));
    assert!(
        results["results"]["mmlu_anatomy"]["acc,none"].is_number(),
        "{results}"
    );
    assert_eq!(results["n-shot"]["gsm8k"], 5);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&samples)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["adapter"], "base");
    assert_eq!(lines[0]["task"], "mmlu_anatomy");
    assert!(lines[0]["prediction_index"].is_number());
    assert!(lines[3]["filtered"]["flexible-extract"].is_string());

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_peft-wit"))
        .args(["eval", "--base", "--tasks", "gsm8kk"])
        .arg("--model")
        .arg(&model)
        .arg("--task-data")
        .arg(dir.path())
        .arg("--registry")
        .arg(dir.path().join("adapters"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("unknown task `gsm8kk` (did you mean `gsm8k`?)"),
        "{stderr}"
    );
}

#[test]
fn sweep_scores_every_cell_on_benchmarks_with_one_heatmap_each() {
    let Some(model) = common::real_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    task_data(dir.path());
    let registry = dir.path().join("adapters");
    let sweep = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_peft-wit"))
            .args([
                "sweep",
                "--prompt-weights",
                "0,0.5",
                "--response-weights",
                "1",
                "--max-steps",
                "2",
            ])
            .args([
                "--batch-size",
                "2",
                "--tasks",
                "mmlu_anatomy,mmlu_astronomy",
                "--task-limit",
                "2",
                "--quiet",
            ])
            .arg("--model")
            .arg(&model)
            .arg("--task-data")
            .arg(dir.path())
            .arg("--registry")
            .arg(&registry)
            .output()
            .unwrap()
    };
    let run = sweep();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("relative gain over λp=0, λr=1"), "{stdout}");
    assert!(stdout.contains("best on mmlu:"), "{stdout}");
    let report = registry.join(".sweeps/grid");
    let svg = std::fs::read_to_string(report.join("heatmap-mmlu.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    let sweep_json = common::read_json(report.join("sweep.json"));
    for cell in sweep_json["cells"].as_array().unwrap() {
        assert!(cell["metrics"]["mmlu"].is_number(), "{cell}");
    }
    // The registry lists the cells and nothing else (the report lives in .sweeps/).
    let scores = registry
        .join("wit-p0.5-r1")
        .join(peft_wit::sweep::BENCHMARK_FILE);
    let written = std::fs::metadata(&scores).unwrap().modified().unwrap();
    // A rerun with the same settings reuses the stored scores (the file is not rewritten).
    let again = sweep();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("best on mmlu:"));
    assert_eq!(
        std::fs::metadata(&scores).unwrap().modified().unwrap(),
        written
    );
    // Scored again two cells at once (side paths on the shared base, one thread each) by
    // `sweep collect`: the same scores.
    let mmlu = |sweep: &serde_json::Value| -> Vec<(String, f64)> {
        sweep["cells"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let name = c["name"].as_str().unwrap().to_string();
                (name, c["metrics"]["mmlu"].as_f64().unwrap())
            })
            .collect()
    };
    let before = mmlu(&sweep_json);
    for (name, _) in &before {
        std::fs::remove_file(registry.join(name).join(peft_wit::sweep::BENCHMARK_FILE)).unwrap();
    }
    let collect = std::process::Command::new(env!("CARGO_BIN_EXE_peft-wit"))
        .args(["sweep", "collect", "grid", "--max-parallel", "2"])
        .args([
            "--tasks",
            "mmlu_anatomy,mmlu_astronomy",
            "--task-limit",
            "2",
        ])
        .arg("--task-data")
        .arg(dir.path())
        .arg("--registry")
        .arg(&registry)
        .output()
        .unwrap();
    assert!(
        collect.status.success(),
        "{}",
        String::from_utf8_lossy(&collect.stderr)
    );
    assert!(scores.is_file(), "scores stored again");
    assert_eq!(mmlu(&common::read_json(report.join("sweep.json"))), before);
}

#[test]
fn hub_datasets_are_read_from_the_local_cache_offline() {
    let Some(model) = common::real_model() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let snapshot = home
        .path()
        .join("hub/datasets--google--IFEval/snapshots/0123abcd");
    write(
        &snapshot.join("ifeval_input_data.jsonl"),
        "{\"key\": 7, \"prompt\": \"Say hi without commas.\", \"instruction_id_list\": [\"punctuation:no_comma\"], \"kwargs\": [{}]}\n",
    );
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_peft-wit"))
        .args(["eval", "--base", "--tasks", "ifeval", "--max-gen-toks", "4"])
        .arg("--model")
        .arg(&model)
        .arg("--registry")
        .arg(home.path().join("adapters"))
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("1 subtasks, 1 documents"), "{stderr}");
    // Without the cache and offline: a clear error that names the dataset.
    let empty = tempfile::tempdir().unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_peft-wit"))
        .args(["eval", "--base", "--tasks", "gsm8k"])
        .arg("--model")
        .arg(&model)
        .arg("--registry")
        .arg(empty.path().join("adapters"))
        .env("HF_HOME", empty.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("openai/gsm8k") && stderr.contains("--task-data"),
        "{stderr}"
    );
}
