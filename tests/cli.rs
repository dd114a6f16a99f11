//! The `peft-wit` binary end to end on the tiny model: train → adapters list/show → eval →
//! generate → sweep → merge → export, checking outputs, exit codes and the exact text of errors,
//! and every PEFT field the one reader refuses, through every command that reads adapters.

#[path = "util.rs"]
mod util;

use util::Dir;

/// Trains `name` for a few steps on the tiny model.
fn train(dir: &Dir, name: &str, extra: &[&str]) {
    let data = dir.data();
    dir.cmd_with_model(&["train", "--quiet", "--name", name, "--max-steps", "3"])
        .args(["--batch-size", "4", "--rank", "4", "--data"])
        .arg(&data)
        .args(extra)
        .all_output();
}

#[test]
fn train_list_show_eval_generate_merge_export() {
    let dir = Dir::new();
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
    let dir = Dir::new();
    let out = dir
        .cmd_with_model(&[
            "sweep",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--rank",
            "2",
        ])
        .args([
            "--prompt-weights",
            "0,1",
            "--response-weights",
            "1",
            "--data",
        ])
        .arg(dir.data())
        .all_output();
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
    let dir = Dir::new();
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
    let dir = Dir::new();
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
