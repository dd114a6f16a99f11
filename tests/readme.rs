//! Runs the command examples of README.md against the built binary on the tiny model, so the
//! README cannot go stale: every `peft-wit ...` (or `cargo run --release -- ...`) line of its
//! `bash` blocks is either run here, as written, or listed in [`SKIP`] with the reason. A new
//! README command that is neither fails the test, and so does a skip entry that no longer
//! matches a README command.
//!
//! How a README line becomes runnable commands, without editing its words:
//! - placeholders are made real: `D` is a data file and `DIR` a PEFT adapter directory in the
//!   working directory; every adapter a command reads (`--adapter`, `--adapters`, `adapters
//!   show|rm|diff`, `merge-adapters` specs) is put into the registry first under the name
//!   written (`NAME`, `A`, `standard`, ...); `../shared/data/alpagasus_3k_dolly.jsonl` is a small
//!   file at that relative path and `configs/*.toml` the repository's own;
//! - alternatives run one by one: `adapters list | show NAME | rm NAME` as `adapters list`,
//!   `adapters show NAME`, ...; `--method cat|linear|svd` once per method; optional `[...]`
//!   arguments are given;
//! - `...` stands for the arguments of the README's previous command of the same subcommand;
//! - commands that load a model get `--model <tiny model>`.
//!
//! Every concrete command runs in a fresh directory (so `rm NAME` or `--out NAME` in one do
//! not disturb another), must exit 0, and must leave behind what it names with `--out`,
//! `--json`, `--csv` and `--report`.

#[path = "util.rs"]
mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use util::{Cmd, Dir};

/// README commands not run here (matched as prefixes of the normalised README line), and why.
const SKIP: &[(&str, &str)] = &[
    (
        "peft-wit sweep --data D --max-steps 200 --sweep-name dolly --launcher slurm",
        "submits to Slurm; tests/sweep_cluster.rs runs a job array on the CI cluster",
    ),
    (
        "peft-wit sweep --data D --max-steps 200 --sweep-name dolly --launcher print | parallel",
        "pipes into GNU parallel; tests/sweep_cluster.rs runs the printed commands",
    ),
    (
        "peft-wit sweep status dolly",
        "needs the planned sweep above; tests/sweep_cluster.rs follows one",
    ),
    (
        "peft-wit sweep collect dolly",
        "needs the planned sweep above; tests/sweep_cluster.rs collects one",
    ),
    (
        "cargo run --release -- quickstart",
        "fetches SmolLM2-135M with scripts/fetch-model.sh and trains it for minutes",
    ),
    (
        "peft-wit train ... --resume",
        "needs a run interrupted by Ctrl-C; tests/train_tiny.rs resumes one",
    ),
    (
        "peft-wit train ... --report-to tensorboard,mlflow",
        "needs an MLflow server; tests/tracking_mlflow.rs runs against one",
    ),
    (
        "MLFLOW_TRACKING_URI=http://host:5000 peft-wit sweep",
        "needs an MLflow server; tests/tracking_mlflow.rs runs against one",
    ),
    (
        "peft-wit eval --tasks mmlu,bbh,gsm8k,ifeval",
        "needs the benchmark data (the Hub or a local copy); tests/tasks*.rs use fixtures",
    ),
    (
        "peft-wit sweep --data D ... --tasks mmlu,ifeval",
        "needs the benchmark data (the Hub or a local copy)",
    ),
];

/// Subcommands that load a base model (they get `--model <tiny>`).
const LOADS_MODEL: &[&str] = &[
    "train",
    "dpo",
    "sweep",
    "eval",
    "merge",
    "export",
    "merge-adapters",
    "generate",
    "bench",
    "suggest",
];

/// One command line of a README `bash` block: its text (continuations joined, comment and
/// extra spaces removed) and its words.
struct ReadmeCommand {
    text: String,
    words: Vec<String>,
}

#[test]
fn readme_commands_run_on_the_tiny_model() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let commands = readme_commands(&readme);
    assert!(commands.len() >= 10, "too few README commands found");
    for (prefix, _) in SKIP {
        assert!(
            commands.iter().any(|c| c.text.starts_with(prefix)),
            "skip entry `{prefix}` matches no README command: update SKIP"
        );
    }
    let pool = Pool::new();
    let mut previous: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ran = 0;
    for command in &commands {
        let words = peft_wit_words(&command.words);
        let subcommand = words.get(1).cloned().unwrap_or_default();
        let expanded = expand_ellipsis(&words, previous.get(&subcommand));
        if !expanded.contains(&"...".to_string()) {
            previous.insert(subcommand, expanded[2..].to_vec());
        }
        if SKIP.iter().any(|(p, _)| command.text.starts_with(p)) {
            continue;
        }
        for args in alternatives(&expanded[1..]) {
            run(&pool, &command.text, &args);
            ran += 1;
        }
    }
    assert!(ran >= 10, "only {ran} README commands ran");
}

/// The command lines of the README's `bash` blocks that run `peft-wit`.
fn readme_commands(readme: &str) -> Vec<ReadmeCommand> {
    let mut out = Vec::new();
    let mut in_bash = false;
    let mut pending = String::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            in_bash = !in_bash && line.trim() == "```bash";
            continue;
        }
        if !in_bash {
            continue;
        }
        let line = strip_comment(line);
        if let Some(head) = line.trim_end().strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(&line);
        let text = std::mem::take(&mut pending)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let words = shell_words(&text);
        let first = words.iter().find(|w| !is_env_assignment(w));
        let runs_peft_wit =
            first.is_some_and(|w| w == "peft-wit") || text.starts_with("cargo run --release -- ");
        if runs_peft_wit {
            out.push(ReadmeCommand { text, words });
        }
    }
    out
}

/// The line without a `#` comment (a `#` at the start or after a space, outside quotes).
fn strip_comment(line: &str) -> String {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '#') if prev.is_whitespace() => return line[..i].to_string(),
            _ => {}
        }
        prev = c;
    }
    line.to_string()
}

/// Words as a shell splits them (quotes grouped and removed; no expansions).
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote = None;
    for c in text.chars() {
        match (quote, c) {
            (None, '"' | '\'') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (Some(q), _) if c == q => quote = None,
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            _ => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

fn is_env_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(k, _)| {
        !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_')
    })
}

/// `peft-wit SUBCOMMAND ...` for a README command (`cargo run --release --` becomes `peft-wit`,
/// environment assignments are dropped).
fn peft_wit_words(words: &[String]) -> Vec<String> {
    let words: Vec<String> = words
        .iter()
        .skip_while(|w| is_env_assignment(w))
        .cloned()
        .collect();
    match words.iter().position(|w| w == "--") {
        Some(i) if words[0] == "cargo" => std::iter::once("peft-wit".to_string())
            .chain(words[i + 1..].iter().cloned())
            .collect(),
        _ => words,
    }
}

/// `...` replaced by the arguments of the previous command of the same subcommand.
fn expand_ellipsis(words: &[String], previous: Option<&Vec<String>>) -> Vec<String> {
    let mut out = Vec::new();
    for w in words {
        match (w.as_str(), previous) {
            ("...", Some(prev)) => out.extend(prev.iter().cloned()),
            _ => out.push(w.clone()),
        }
    }
    out
}

/// The concrete argument lists (after `peft-wit`) of one README command: `a | b` subcommand
/// alternatives, `x|y` word alternatives, optional `[...]` arguments given.
fn alternatives(args: &[String]) -> Vec<Vec<String>> {
    // Subcommand alternatives: `adapters list | show NAME` shares `adapters`.
    let groups: Vec<&[String]> = args.split(|w| w == "|").collect();
    let head = &args[..1.min(args.len())];
    let mut lines: Vec<Vec<String>> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| match i {
            0 => g.to_vec(),
            _ => head.iter().chain(g.iter()).cloned().collect(),
        })
        .collect();
    // Optional arguments.
    for line in &mut lines {
        for w in line.iter_mut() {
            *w = w.trim_start_matches('[').trim_end_matches(']').to_string();
        }
    }
    // Word alternatives, one run each.
    let mut out = Vec::new();
    for line in lines {
        match line.iter().position(|w| w.contains('|')) {
            Some(i) => {
                for alt in line[i].split('|') {
                    let mut l = line.clone();
                    l[i] = alt.to_string();
                    out.extend(alternatives(&l));
                }
            }
            None => out.push(line),
        }
    }
    out
}

/// Adapters trained once on the tiny model, copied into each command's registry under the
/// names the README uses.
struct Pool {
    dir: Dir,
}

impl Pool {
    /// The tiny model without its llama3 rope scaling, which GGUF export refuses (the README
    /// merges to GGUF).
    fn new() -> Self {
        let dir = Dir::tiny();
        let path = dir.model().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config.as_object_mut().unwrap().remove("rope_scaling");
        std::fs::write(&path, config.to_string()).unwrap();
        Self { dir }
    }

    /// The directory of adapter `name`, trained on first use.
    fn adapter(&self, name: &str) -> PathBuf {
        let path = self.dir.registry().join(name);
        if !path.is_dir() {
            self.dir.train(name, "2").all_output();
        }
        path
    }
}

/// The registry names a command reads.
fn adapters_read(args: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    let value = |flag: &str| {
        args.iter()
            .position(|w| w == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    names.extend(value("--adapter"));
    if let Some(list) = value("--adapters") {
        names.extend(list.split(',').map(str::to_string));
    }
    match args.first().map(String::as_str) {
        Some("adapters") => match args.get(1).map(String::as_str) {
            Some("show" | "rm") => names.extend(args.get(2).cloned()),
            Some("diff") => names.extend(args[2..].iter().take(2).cloned()),
            _ => {}
        },
        Some("merge-adapters") => {
            if let Some(specs) = args.get(1) {
                for spec in specs.split(',') {
                    let name = match spec.rsplit_once(':') {
                        Some((n, w)) if w.parse::<f64>().is_ok() => n,
                        _ => spec,
                    };
                    names.push(name.to_string());
                }
            }
        }
        _ => {}
    }
    names
}

/// Runs one concrete README command in a fresh directory and checks what it leaves behind.
fn run(pool: &Pool, readme_line: &str, args: &[String]) {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    let registry = root.path().join("registry");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&registry).unwrap();
    // Placeholders and relative paths the README uses.
    let data = std::fs::read(pool.dir.data()).unwrap();
    std::fs::write(work.join("D"), &data).unwrap();
    let dolly = root.path().join("shared/data/alpagasus_3k_dolly.jsonl");
    std::fs::create_dir_all(dolly.parent().unwrap()).unwrap();
    std::fs::write(&dolly, &data).unwrap();
    // Preference pairs for `dpo`: HH dialogues at the README's path, and `prefs.jsonl`.
    let hh = root
        .path()
        .join("shared/data/hh_rlhf_harmless_base_test.jsonl");
    std::fs::write(&hh, preference_rows(true)).unwrap();
    std::fs::write(work.join("prefs.jsonl"), preference_rows(false)).unwrap();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("configs"),
        &work.join("configs"),
    );
    if args.iter().any(|w| w == "DIR") {
        copy_dir(&pool.adapter("DIR"), &work.join("DIR"));
    }
    for name in adapters_read(args) {
        copy_dir(&pool.adapter(&name), &registry.join(&name));
    }

    let mut command = Command::new(env!("CARGO_BIN_EXE_peft-wit"));
    command
        .args(args)
        .current_dir(&work)
        .env("PEFT_WIT_REGISTRY", &registry)
        .env("HF_HUB_OFFLINE", "1")
        .env("RAYON_NUM_THREADS", "2");
    let loads_model = args
        .first()
        .is_some_and(|s| LOADS_MODEL.contains(&s.as_str()));
    if loads_model && !args.iter().any(|w| w == "--model") {
        command.arg("--model").arg(pool.dir.model());
    }
    eprintln!("README `{readme_line}`: peft-wit {}", args.join(" "));
    let output = Cmd { command }.all_output();

    // What the command was asked to write exists.
    for flag in ["--out", "--json", "--csv", "--report"] {
        let Some(target) = args
            .iter()
            .position(|w| w == flag)
            .and_then(|i| args.get(i + 1))
        else {
            continue;
        };
        let path = match args[0].as_str() {
            "merge-adapters" => registry.join(target),
            _ => work.join(target),
        };
        assert!(
            path.exists(),
            "README: `{readme_line}` ran as {args:?} but wrote no {}:\n{output}",
            path.display()
        );
    }
}

/// Ten small preference pairs: Anthropic HH dialogues, or prompt/chosen/rejected strings.
fn preference_rows(hh: bool) -> String {
    let words = [
        "red", "blue", "green", "gold", "grey", "pink", "teal", "plum",
    ];
    (0..10)
        .map(|i| {
            let (a, b) = (words[i % 8], words[(i * 3 + 1) % 8]);
            let row = if hh {
                let dialogue = |answer: &str| {
                    format!("\n\nHuman: Say {a} {b}.\n\nAssistant: {answer}")
                };
                serde_json::json!({"chosen": dialogue(&format!("{a} {b}")), "rejected": dialogue(b)})
            } else {
                serde_json::json!({"prompt": format!("Say {a}."), "chosen": a, "rejected": b})
            };
            format!("{row}\n")
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
