//! The `peft-wit` binary end to end on the tiny model: train → adapters list/show → eval →
//! generate → sweep → merge → export, checking outputs, exit codes and the exact text of errors,
//! and every PEFT field the one reader refuses, through every command that reads adapters.

#[path = "util.rs"]
mod util;

use util::Dir;

/// Trains `name` for a few steps on the tiny model.
fn train(dir: &Dir, name: &str, extra: &[&str]) {
    dir.train(name, "3").args(extra).all_output();
}

#[test]
fn train_list_show_eval_generate_merge_export() {
    let dir = Dir::tiny();
    train(&dir, "std", &[]);
    train(
        &dir,
        "wit",
        &["--prompt-weight", "0.2", "--response-weight", "0.8"],
    );

    let list = dir.cmd(&["adapters", "list"]).stdout();
    assert!(list.contains("std") && list.contains("wit"), "{list}");
    assert!(!list.contains("damaged"), "{list}");

    let show = dir.cmd(&["adapters", "show", "wit", "--json"]).stdout();
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    let meta = &show["meta"];
    assert_eq!(meta["loss"]["prompt_weight"].as_f64(), Some(0.2));
    assert_eq!(meta["loss"]["response_weight"].as_f64(), Some(0.8));
    assert_eq!(meta["steps"], 3);
    assert_eq!(meta["lora"]["r"], 4);
    // The sidecar keeps the training config as the trainer wrote it, with PEFT's field names.
    assert_eq!(meta["train_config"]["r"], 4);

    let eval = dir
        .cmd_with_model(&["eval", "--all", "--base", "--generate", "0", "--data"])
        .arg(dir.data())
        .stdout();
    for name in ["base", "std", "wit"] {
        assert!(eval.contains(name), "eval table lacks {name}:\n{eval}");
    }
    // Two models at once (side paths on one base, one thread each) give the numbers of one
    // after another with side paths, in the same order; 0 at once is a usage error.
    let eval_json = |extra: &[&str], file: &str| {
        let path = dir.path().join(file);
        dir.cmd_with_model(&["eval", "--base", "--adapters", "std,wit", "--generate", "0"])
            .args(extra)
            .arg("--data")
            .arg(dir.data())
            .arg("--json")
            .arg(&path)
            .all_output();
        let mut report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let rows = report["adapters"].as_array_mut().unwrap();
        for row in rows.iter_mut() {
            row.as_object_mut().unwrap().remove("seconds");
        }
        report["adapters"].clone()
    };
    let side_by_side = eval_json(&["--max-parallel", "2"], "lanes.json");
    let names: Vec<&str> = side_by_side
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "std", "wit"]);
    assert_eq!(side_by_side, eval_json(&["--unmerged"], "one-by-one.json"));
    dir.cmd_with_model(&["eval", "--base", "--max-parallel", "0", "--data"])
        .arg(dir.data())
        .fails_with(2);

    let generated = dir
        .cmd_with_model(&["generate", "--adapter", "wit", "--prompt", "Say red blue."])
        .args(["--max-new-tokens", "4"])
        .stdout();
    assert!(!generated.trim().is_empty(), "no text generated");

    let merged = dir.path().join("merged");
    dir.cmd_with_model(&["merge", "--adapter", "wit", "--dtype", "f32", "--out"])
        .arg(&merged)
        .all_output();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged.join(file).is_file(), "merged dir lacks {file}");
    }
    // The merged directory is itself a base model peft-wit loads and generates with.
    dir.cmd(&[
        "generate",
        "--prompt",
        "Say red blue.",
        "--max-new-tokens",
        "2",
        "--model",
    ])
    .arg(&merged)
    .stdout();
    // Merging again into the same place is refused with the shared message.
    let err = dir
        .cmd_with_model(&["merge", "--adapter", "wit", "--dtype", "f32", "--out"])
        .arg(&merged)
        .fails();
    assert!(
        err.contains(&format!(
            "{} already exists (use --force to replace it)",
            merged.display()
        )),
        "{err}"
    );

    let peft = dir.path().join("wit-peft");
    dir.cmd_with_model(&["export", "--adapter", "wit", "--format", "peft", "--out"])
        .arg(&peft)
        .all_output();
    assert!(peft.join("adapter_config.json").is_file());
    assert!(peft.join("adapter_model.safetensors").is_file());
    let lora_gguf = dir.path().join("wit.gguf");
    dir.cmd_with_model(&[
        "export",
        "--adapter",
        "wit",
        "--format",
        "gguf-lora",
        "--out",
    ])
    .arg(&lora_gguf)
    .all_output();
    assert!(std::fs::metadata(&lora_gguf).unwrap().len() > 0);
}

#[test]
fn sweep_writes_its_report_under_dot_sweeps_and_every_cell_is_an_adapter() {
    let dir = Dir::tiny();
    let err = dir.sweep("0,1").args(["--max-parallel", "0"]).fails_with(2);
    assert!(err.contains("--max-parallel"), "{err}");
    // Both cells at once, side by side in this process.
    let out = dir.sweep("0,1").args(["--max-parallel", "2"]).all_output();
    assert!(
        out.contains("wit-p0-r1") && out.contains("wit-p1-r1"),
        "{out}"
    );
    assert!(dir.registry().join(".sweeps").is_dir(), "{out}");
    assert!(!dir.registry().join("sweeps").exists());
    let list = dir.cmd(&["adapters", "list"]).stdout();
    assert!(
        list.contains("wit-p0-r1") && list.contains("wit-p1-r1"),
        "{list}"
    );
    assert!(
        !list.contains("damaged") && !list.contains("sweeps"),
        "{list}"
    );
}

#[test]
fn bad_input_gets_one_clear_message_and_exit_code_1() {
    let dir = Dir::tiny();
    let config = dir.write("bad.toml", "max_steps = 2\nlora_alhpa = 8.0\n");
    let err = dir
        .cmd_with_model(&["train", "--config"])
        .arg(&config)
        .fails();
    assert!(
        err.contains("unknown key `lora_alhpa` (did you mean `lora_alpha`?)"),
        "{err}"
    );
    assert!(err.contains("bad.toml"), "{err}");

    // Enumerated flags take the TOML config's words, checked before anything loads.
    let err = dir
        .cmd_with_model(&["train", "--format", "jsonl", "--data"])
        .arg(dir.data())
        .fails_with(2);
    assert!(
        err.contains(
            "unknown variant `jsonl`, expected one of `auto`, `alpaca`, `prompt-response`, `chat`"
        ),
        "{err}"
    );

    let err = dir
        .cmd(&["train", "--data", "missing.jsonl", "--model"])
        .arg(dir.model())
        .fails();
    assert!(err.contains("missing.jsonl"), "{err}");
    // The cause is printed once, not again as a "caused by" line.
    assert_eq!(err.matches("No such file").count(), 1, "{err}");

    let err = dir.cmd(&["adapters", "show", "nope"]).fails();
    assert!(err.contains("no adapter `nope`"), "{err}");

    let err = dir
        .cmd_with_model(&["train", "--report-to", "tensorbord", "--data"])
        .arg(dir.data())
        .fails();
    assert!(err.contains("tensorbord"), "{err}");
    assert!(!dir.registry().join("standard").exists());

    // A tracking server that is down never stops training: a warning, the adapter is made.
    let out = dir
        .cmd_with_model(&[
            "train",
            "--quiet",
            "--max-steps",
            "2",
            "--report-to",
            "mlflow",
        ])
        .args(["--name", "offline", "--data"])
        .arg(dir.data())
        .env("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
        .all_output();
    assert!(out.contains("warning: tracking"), "{out}");
    assert!(out.contains("not sent to MLflow"), "{out}");
    assert!(dir.registry().join("offline/adapter_config.json").is_file());
}

/// PEFT fields that change what the weights mean, refused by the one reader.
const REFUSED: [(&str, &str); 6] = [
    ("lora_bias", "true"),
    ("use_qalora", "true"),
    ("target_parameters", "[\"mlp.experts.gate_up_proj\"]"),
    ("trainable_token_indices", "[1, 2]"),
    ("layer_replication", "[[0, 1]]"),
    ("alora_invocation_tokens", "[5, 6]"),
];

#[test]
fn every_command_that_reads_an_adapter_refuses_the_same_peft_fields() {
    let dir = Dir::tiny();
    train(&dir, "ok", &[]);
    let good = dir.registry().join("ok");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(good.join("adapter_config.json")).unwrap())
            .unwrap();
    for (field, value) in REFUSED {
        // A plain PEFT directory (no sidecar) carrying the field.
        let adapter = dir.path().join(format!("refused-{field}"));
        std::fs::create_dir_all(&adapter).unwrap();
        std::fs::copy(
            good.join("adapter_model.safetensors"),
            adapter.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut config = config.clone();
        config[field] = serde_json::from_str(value).unwrap();
        std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
        let adapter_arg = adapter.to_str().unwrap();
        let out = dir.path().join(format!("out-{field}"));
        let out_arg = out.to_str().unwrap();
        let commands: Vec<(&str, util::Cmd)> = vec![
            (
                "generate",
                dir.cmd_with_model(&["generate", "--prompt", "x", "--adapter", adapter_arg]),
            ),
            (
                "eval",
                dir.cmd_with_model(&["eval", "--generate", "0", "--adapters", adapter_arg])
                    .arg("--data")
                    .arg(dir.data()),
            ),
            (
                "merge",
                dir.cmd_with_model(&["merge", "--adapter", adapter_arg, "--out", out_arg]),
            ),
            (
                "export",
                dir.cmd_with_model(&["export", "--adapter", adapter_arg, "--format", "peft"])
                    .args(["--out", out_arg]),
            ),
            ("import", dir.cmd(&["adapters", "import", adapter_arg])),
        ];
        for (command, cmd) in commands {
            let err = cmd.fails();
            assert!(
                err.contains(&format!("`{field}`")) && err.contains("is not supported"),
                "{command} with {field}: {err}"
            );
            assert!(
                !out.exists(),
                "{command} with {field} wrote {}",
                out.display()
            );
        }
    }
    // Nothing was registered.
    let list = dir.cmd(&["adapters", "list"]).stdout();
    assert!(!list.contains("refused"), "{list}");
}

#[path = "common/mod.rs"]
mod common;

/// `train --report-to tensorboard,mlflow`: TensorBoard's own reader and the MLflow server's API
/// give back the values metrics.jsonl holds, at the same steps.
#[test]
fn train_reports_to_tensorboard_and_mlflow() {
    let (Some(python), Some(uri)) = (
        common::required_env("PEFT_WIT_TEST_PYTHON"),
        common::required_env("PEFT_WIT_TEST_MLFLOW_URI"),
    ) else {
        return;
    };
    let uri = uri.trim_end_matches('/').to_string();
    let dir = Dir::tiny();
    let experiment = format!("cli-test-{}", std::process::id());
    dir.train("tracked", "4")
        .args(["--eval-every", "2", "--report-to", "tensorboard,mlflow"])
        .args(["--mlflow-experiment", &experiment])
        .env("MLFLOW_TRACKING_URI", &uri)
        .all_output();

    let adapter = dir.registry().join("tracked");
    let history = std::fs::read_to_string(adapter.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = history
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let series = |key: &str| -> Vec<(u64, f64)> {
        lines
            .iter()
            .filter_map(|l| Some((l["step"].as_u64()?, l[key].as_f64()?)))
            .collect()
    };
    let losses = series("loss");
    let evals = series("eval_response_loss");
    assert_eq!(losses.len(), 4, "{history}");
    assert!(evals.len() >= 2, "{history}");

    // TensorBoard: the event files moved into the adapter with it.
    let out = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/helpers/read_tb_events.py"
        ))
        .arg(adapter.join("tb"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tb: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tb_series = |tag: &str| -> Vec<(u64, f64)> {
        tb[tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag} in {tb}"))
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
            .collect()
    };
    let as_f32 = |s: &[(u64, f64)]| -> Vec<(u64, f64)> {
        s.iter().map(|&(k, v)| (k, v as f32 as f64)).collect()
    };
    assert_eq!(tb_series("train/loss"), as_f32(&losses));
    assert_eq!(tb_series("eval/response_loss"), as_f32(&evals));

    // MLflow: one finished run named after the adapter, same values, params and artifacts.
    let get = |endpoint: &str, query: &[(&str, &str)]| -> serde_json::Value {
        let url = format!("{uri}/api/2.0/mlflow/{endpoint}");
        let req = query
            .iter()
            .fold(ureq::get(&url), |r, (k, v)| r.query(k, v));
        req.call().unwrap().into_json().unwrap()
    };
    let exp = get(
        "experiments/get-by-name",
        &[("experiment_name", &experiment)],
    );
    let exp_id = exp["experiment"]["experiment_id"]
        .as_str()
        .unwrap()
        .to_string();
    let runs: serde_json::Value = ureq::post(&format!("{uri}/api/2.0/mlflow/runs/search"))
        .send_json(serde_json::json!({"experiment_ids": [exp_id]}))
        .unwrap()
        .into_json()
        .unwrap();
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let info = &runs[0]["info"];
    assert_eq!(info["run_name"], "tracked");
    assert_eq!(info["status"], "FINISHED");
    let run_id = info["run_id"].as_str().unwrap();
    let params = runs[0]["data"]["params"].as_array().unwrap();
    let param = |key: &str| {
        params
            .iter()
            .find(|p| p["key"] == key)
            .map(|p| p["value"].clone())
    };
    assert_eq!(param("prompt_weight"), Some("0".into()));
    assert_eq!(param("r"), Some("4".into()));
    assert!(param("data_fingerprint").is_some());
    let history = get(
        "metrics/get-history",
        &[("run_id", run_id), ("metric_key", "train/loss")],
    );
    let mut mlflow_losses: Vec<(u64, f64)> = history["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["step"].as_u64().unwrap(), m["value"].as_f64().unwrap()))
        .collect();
    mlflow_losses.sort_by_key(|p| p.0);
    assert_eq!(mlflow_losses, losses);
    let artifacts = get("artifacts/list", &[("run_id", run_id)]);
    let files: Vec<&str> = artifacts["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert!(files.contains(&"adapter_config.json"), "{files:?}");
    assert!(files.contains(&"adapter_model.safetensors"), "{files:?}");
}

/// The library examples stay true: two of them run on the tiny model (cargo test builds them
/// all into target/<profile>/examples/).
#[test]
fn examples_run_on_the_tiny_model() {
    let dir = Dir::tiny();
    let examples = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples");
    let run = |name: &str, args: &[&std::ffi::OsStr]| -> String {
        let exe = examples.join(name);
        let out = std::process::Command::new(&exe)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{name} failed:\n{text}");
        text
    };
    let model = dir.model();
    let out = run("train_and_evaluate", &[model.as_os_str(), "3".as_ref()]);
    assert!(
        out.contains("base") && out.contains("wit-p0.2-r0.8"),
        "{out}"
    );
    let out = run("custom_role_weights", &[model.as_os_str()]);
    assert!(out.contains("system 0, user 0.1, response 1"), "{out}");
}

#[test]
fn weight_schedules_train_sweep_and_show() {
    let dir = Dir::tiny();
    train(
        &dir,
        "sched",
        &[
            "--prompt-weight-schedule",
            "step:1->0@0.5",
            "--response-weight",
            "1",
        ],
    );
    let show = dir.cmd(&["adapters", "show", "sched"]).stdout();
    assert!(
        show.contains("prompt step:1->0@0.5 (ended at 0) / response 1"),
        "{show}"
    );
    let out = dir.sweep("linear:1->0,0").all_output();
    assert!(
        out.contains("wit-plin1to0-r1") && out.contains("wit-p0-r1"),
        "{out}"
    );
    let list = dir.cmd(&["adapters", "list"]).stdout();
    assert!(list.contains("linear:1->0/1"), "{list}");
    let err = dir
        .cmd_with_model(&["train", "--prompt-weight-schedule", "linear:1"])
        .fails_with(2);
    assert!(err.contains("expected constant, linear:A->B"), "{err}");
}
