//! Drives the built `peft-wit` binary, in the style of ripgrep's `tests/util.rs`: a temporary
//! directory holding a tiny Hugging Face model (the tiny llama of `../shared/reference/tiny` with a
//! byte-level tokenizer and a chat template, so every command runs in well under a second), a
//! small dataset and a registry, and a command builder whose assertions print the whole output
//! when they fail.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory with the tiny model, data and a registry.
pub struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    /// A fresh directory with the tiny model, `data.jsonl` (32 rows) and an empty registry path.
    pub fn tiny() -> Self {
        let dir = Self {
            tmp: tempfile::tempdir().unwrap(),
        };
        dir.write_tiny_model();
        dir.write_data("data.jsonl", 32);
        dir
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn model(&self) -> PathBuf {
        self.path().join("tiny-llama")
    }

    pub fn registry(&self) -> PathBuf {
        self.path().join("registry")
    }

    pub fn data(&self) -> PathBuf {
        self.path().join("data.jsonl")
    }

    /// `peft-wit ARGS` run in this directory, with this registry as the default one.
    pub fn cmd(&self, args: &[&str]) -> Cmd {
        let mut command = Command::new(env!("CARGO_BIN_EXE_peft-wit"));
        command
            .args(args)
            .current_dir(self.path())
            .env("PEFT_WIT_REGISTRY", self.registry())
            .env("HF_HUB_OFFLINE", "1")
            .env("RAYON_NUM_THREADS", "2");
        Cmd { command }
    }

    /// `peft-wit SUBCOMMAND --model <tiny> REST` for commands that load a model.
    pub fn cmd_with_model(&self, args: &[&str]) -> Cmd {
        let (subcommand, rest) = args.split_first().expect("a subcommand");
        let mut cmd = self.cmd(&[subcommand]);
        cmd.command.arg("--model").arg(self.model()).args(rest);
        cmd
    }

    /// `peft-wit train --quiet --name NAME --max-steps STEPS --batch-size 4 --rank 4` on the tiny
    /// model and `data.jsonl`; add arguments with `.args`.
    pub fn train(&self, name: &str, max_steps: &str) -> Cmd {
        self.cmd_with_model(&["train", "--quiet", "--name", name, "--max-steps", max_steps])
            .args(["--batch-size", "4", "--rank", "4", "--data"])
            .arg(self.data())
    }

    /// `peft-wit sweep` over `prompt_weights` (response weight 1), cells of 2 steps at batch size
    /// 4 and rank 2, on the tiny model and `data.jsonl`; add arguments with `.args`.
    pub fn sweep(&self, prompt_weights: &str) -> Cmd {
        self.cmd_with_model(&[
            "sweep",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--rank",
            "2",
        ])
        .args(["--prompt-weights", prompt_weights])
        .args(["--response-weights", "1", "--data"])
        .arg(self.data())
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `n` prompt/response rows of a tiny copy task.
    pub fn write_data(&self, name: &str, n: usize) -> PathBuf {
        let words = [
            "red", "blue", "green", "gold", "grey", "pink", "teal", "plum",
        ];
        let rows: Vec<String> = (0..n)
            .map(|i| {
                let a = words[i % words.len()];
                let b = words[(i * 3 + 1) % words.len()];
                serde_json::json!({"prompt": format!("Say {a} {b}."), "response": format!("{a} {b}")})
                    .to_string()
            })
            .collect();
        self.write(name, &(rows.join("\n") + "\n"))
    }

    /// The tiny llama (2 layers, hidden 64, vocab 384) as a Hugging Face directory.
    fn write_tiny_model(&self) {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/tiny/llama");
        let dst = self.model();
        std::fs::create_dir_all(&dst).unwrap();
        for file in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(file), dst.join(file))
                .unwrap_or_else(|e| panic!("{}: {e}", src.join(file).display()));
        }
        std::fs::write(dst.join("tokenizer.json"), byte_level_tokenizer()).unwrap();
        let config = serde_json::json!({
            "bos_token": "<s>",
            "eos_token": "</s>",
            "chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
        });
        std::fs::write(dst.join("tokenizer_config.json"), config.to_string()).unwrap();
    }
}

/// A byte-level BPE tokenizer without merges: ids 0–2 are `<pad>`, `<s>`, `</s>`, then one id
/// per byte (GPT-2's byte-to-character map), so any text tokenizes within the tiny vocabulary.
fn byte_level_tokenizer() -> String {
    let mut vocab = serde_json::Map::new();
    let specials = ["<pad>", "<s>", "</s>"];
    for (id, token) in specials.iter().enumerate() {
        vocab.insert(token.to_string(), id.into());
    }
    for (i, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), (specials.len() + i).into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(id, token)| {
            serde_json::json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []},
    })
    .to_string()
}

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to U+0100 onwards.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                let c = char::from_u32(next).unwrap();
                next += 1;
                c
            }
        })
        .collect()
}

/// A command to run; the assertions print its full output when they fail.
pub struct Cmd {
    pub command: Command,
}

impl Cmd {
    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Self {
        self.command.arg(arg);
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(mut self, args: I) -> Self {
        self.command.args(args);
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    fn output(&mut self) -> Output {
        self.command
            .output()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", self.command))
    }

    /// Runs to success; returns stdout.
    pub fn stdout(mut self) -> String {
        let out = self.output();
        if !out.status.success() {
            panic!("{:?} failed:\n{}", self.command, describe(&out));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs to success; returns stdout and stderr together.
    pub fn all_output(mut self) -> String {
        let out = self.output();
        if !out.status.success() {
            panic!("{:?} failed:\n{}", self.command, describe(&out));
        }
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Runs expecting exit code 1 (a reported error, not a crash); returns stderr.
    pub fn fails(self) -> String {
        self.fails_with(1)
    }

    /// Runs expecting exit code `code` (2: a usage error caught by the argument parser).
    pub fn fails_with(mut self, code: i32) -> String {
        let out = self.output();
        assert_eq!(
            out.status.code(),
            Some(code),
            "{:?} should fail with exit code {code}:\n{}",
            self.command,
            describe(&out)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn describe(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
