//! The adapter registry: list / show / rm / import / diff through the library and the binary,
//! damaged entries, runs in progress, and concurrent trains into one registry.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::tiny::{tiny_base, tiny_data, tiny_train_config, TRAINED_ENTRY_FILES};
use peft_wit::lora::peft::{read_peft, save_peft};
use peft_wit::lora::{LoraAdapter, LoraConfig, TargetModules};
use peft_wit::model::config::{module_path, ModelConfig, PROJECTIONS};
use peft_wit::model::random::tiny_config;
use peft_wit::registry::{self, AdapterMeta, LossInfo, Presence, Registry};
use peft_wit::train::{train, PreparedData, RunOptions, TrainOutcome};
use peft_wit::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------- helpers

fn lora_config(r: usize, alpha: f64, targets: &[&str]) -> LoraConfig {
    LoraConfig {
        r,
        lora_alpha: alpha,
        lora_dropout: 0.0,
        target_modules: TargetModules::Names(targets.iter().map(|s| s.to_string()).collect()),
        ..LoraConfig::default()
    }
}

/// A LoRA adapter with random A (from init) and random, non-zero B.
fn random_adapter(model: &ModelConfig, lora: &LoraConfig, seed: u64) -> LoraAdapter {
    let adapter = LoraAdapter::init(lora, model, seed, DType::F32, &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    for (key, var) in adapter.named_vars() {
        if key.contains("lora_B") {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    adapter
}

/// ΔW = s·B·A, materialised in f64.
fn dense_delta(adapter: &LoraAdapter, layer: usize, p: usize) -> Option<Tensor> {
    let pair = adapter.pair(layer, p)?;
    let a = pair.a.as_tensor().to_dtype(DType::F64).unwrap();
    let b = pair.b.as_tensor().to_dtype(DType::F64).unwrap();
    Some((b.matmul(&a).unwrap() * pair.scale).unwrap())
}

fn frob_inner(x: &Tensor, y: &Tensor) -> f64 {
    (x * y)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn assert_rel(actual: f64, expected: f64, what: &str) {
    let err = (actual - expected).abs() / expected.abs().max(1e-12);
    assert!(
        err < 1e-5,
        "{what}: {actual} vs dense {expected} (rel err {err:e})"
    );
}

fn reference(which: &str) -> PathBuf {
    let dir = common::reference_dir();
    match which {
        "smollm2" => dir.join("smollm2-135m-instruct/lora_r4"),
        arch => dir.join("tiny").join(arch).join("lora_r4"),
    }
}

/// A copy of a reference adapter whose config can be edited.
fn editable_copy(tmp: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = reference("llama");
    let dir = tmp.join(format!("edited-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut config = common::read_json(dir.join("adapter_config.json"));
    edit(&mut config);
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    dir
}

/// Hidden folders under `.runs/` (staging, trash) that an operation left behind.
fn leftovers(reg: &Registry) -> Vec<String> {
    std::fs::read_dir(reg.root().join(".runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn data() -> PreparedData {
    tiny_data(16, 4)
}

fn train_into(
    root: &Path,
    name: &str,
    steps: usize,
    opts: &RunOptions,
) -> peft_wit::Result<TrainOutcome> {
    let reg = Registry::open(root)?;
    train(
        &tiny_base(),
        &data(),
        &tiny_train_config(name, steps),
        &reg,
        opts,
    )
}

fn bin(registry: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peft-wit"))
        .arg("adapters")
        .args(args)
        .arg("--registry")
        .arg(registry)
        .env_remove("PEFT_WIT_REGISTRY")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------- diff

#[test]
fn diff_matches_the_dense_computation() {
    let model = tiny_config(false);
    // Different ranks, scales (one rsLoRA) and target sets, so "only in one" modules occur too.
    let a = random_adapter(&model, &lora_config(4, 8.0, &PROJECTIONS), 1);
    let mut lb = lora_config(2, 3.0, &["q_proj", "v_proj", "down_proj"]);
    lb.use_rslora = true;
    let b = random_adapter(&model, &lb, 2);
    let d = registry::diff(&a, &b).unwrap();
    assert_eq!(d.modules.len(), model.num_hidden_layers * PROJECTIONS.len());

    let (mut sq_a, mut sq_b, mut total_inner) = (0.0, 0.0, 0.0);
    for m in &d.modules {
        let p = PROJECTIONS.iter().position(|&n| n == m.projection).unwrap();
        assert_eq!(m.module, module_path(m.layer, &m.projection));
        let (da, db) = (dense_delta(&a, m.layer, p), dense_delta(&b, m.layer, p));
        let na = da.as_ref().map_or(0.0, |x| frob_inner(x, x).sqrt());
        let nb = db.as_ref().map_or(0.0, |x| frob_inner(x, x).sqrt());
        assert_rel(m.totals.norm_a, na, &format!("{} ||ΔA||", m.module));
        assert_rel(m.totals.norm_b, nb, &format!("{} ||ΔB||", m.module));
        sq_a += na * na;
        sq_b += nb * nb;
        match (&da, &db) {
            (Some(x), Some(y)) => {
                assert_eq!(m.presence, Presence::Both);
                let inner = frob_inner(x, y);
                total_inner += inner;
                assert_rel(m.totals.inner, inner, &format!("{} <ΔA,ΔB>", m.module));
                assert_rel(
                    m.totals.cosine.unwrap(),
                    inner / (na * nb),
                    &format!("{} cos", m.module),
                );
                let diff = (x - y).unwrap();
                assert_rel(
                    m.totals.diff_norm,
                    frob_inner(&diff, &diff).sqrt(),
                    "||ΔA-ΔB||",
                );
            }
            (Some(_), None) => {
                assert_eq!(m.presence, Presence::OnlyA);
                assert_eq!(m.totals.cosine, None);
                assert_eq!(m.totals.relative_diff(), 1.0);
            }
            other => panic!("unexpected presence {other:?}"),
        }
    }
    assert_rel(d.overall.norm_a, sq_a.sqrt(), "overall ||ΔA||");
    assert_rel(d.overall.norm_b, sq_b.sqrt(), "overall ||ΔB||");
    assert_rel(d.overall.inner, total_inner, "overall inner");
    assert_rel(
        d.overall.cosine.unwrap(),
        total_inner / (sq_a.sqrt() * sq_b.sqrt()),
        "overall cos",
    );
    let layers = d.by_layer();
    assert_eq!(layers.len(), 2);
    let layer_sq: f64 = layers.iter().map(|l| l.totals.norm_a.powi(2)).sum();
    assert_rel(layer_sq, sq_a, "per-layer norms add up");

    // An adapter against itself: cosine 1, no difference; against its negation: cosine -1.
    let same = registry::diff(&a, &a).unwrap();
    assert!((same.overall.cosine.unwrap() - 1.0).abs() < 1e-9);
    assert!(same.overall.diff_norm < 1e-6 * same.overall.norm_a);
    let neg = a.detached_copy().unwrap();
    for (_, v) in neg
        .named_vars()
        .into_iter()
        .filter(|(k, _)| k.contains("lora_B"))
    {
        v.set(&v.as_tensor().neg().unwrap()).unwrap();
    }
    let opposite = registry::diff(&a, &neg).unwrap();
    assert!((opposite.overall.cosine.unwrap() + 1.0).abs() < 1e-9);
    assert_eq!(opposite.most_different(3).len(), 3);
}

#[test]
fn diff_of_fresh_adapters_has_no_cosine_and_mismatched_shapes_are_refused() {
    let model = tiny_config(false);
    let lora = lora_config(4, 8.0, &PROJECTIONS);
    // B = 0: the update is zero, the cosine undefined (not NaN).
    let fresh = LoraAdapter::init(&lora, &model, 1, DType::F32, &Device::Cpu).unwrap();
    let d = registry::diff(&fresh, &fresh).unwrap();
    assert_eq!(d.overall.norm_a, 0.0);
    assert_eq!(d.overall.cosine, None);
    assert!(serde_json::to_string(&d)
        .unwrap()
        .contains("\"cosine\":null"));

    let mut wider = model.clone();
    wider.intermediate_size = 96;
    let other = random_adapter(&wider, &lora, 2);
    let err = registry::diff(&random_adapter(&model, &lora, 1), &other).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("gate_proj"), "{err}");
}

// ---------------------------------------------------------------- import / list / show / rm

#[test]
fn imports_each_reference_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::open(tmp.path().join("reg")).unwrap();
    for which in ["llama", "qwen2", "mistral", "smollm2"] {
        let (path, meta) = registry::import(&reg, &reference(which), Some(which), false).unwrap();
        assert_eq!(path, reg.path(which));
        assert!(meta.train_config.is_none());
        assert!(!meta.loss.is_known());
        assert_eq!(meta.lora.r, 4);
        // The sidecar round-trips (unknown weights are written as null, read as NaN).
        let back = AdapterMeta::read(&path).unwrap();
        assert!(!back.loss.is_known());
        assert_eq!(back.base.name, meta.base.name);
        let entry = reg.entry(which).unwrap();
        assert!(entry.is_healthy(), "{which}: {:?}", entry.problems);
        // The copy holds the same weights as the source.
        let (src, dst) = (
            read_peft(&reference(which)).unwrap().adapter,
            read_peft(&path).unwrap().adapter,
        );
        let d = registry::diff(&src, &dst).unwrap();
        assert!(d.overall.norm_a > 0.0 && (d.overall.cosine.unwrap() - 1.0).abs() < 1e-9);
    }
    let smol = AdapterMeta::read(&reg.path("smollm2")).unwrap();
    assert_eq!(smol.base.name, "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!((smol.base.num_layers, smol.base.hidden_size), (30, 576));
    assert_eq!(
        reg.names().unwrap(),
        vec!["llama", "mistral", "qwen2", "smollm2"]
    );
    // The same name again: refused without force, replaced with it.
    let err = registry::import(&reg, &reference("llama"), Some("llama"), false).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    registry::import(&reg, &reference("qwen2"), Some("llama"), true).unwrap();
    assert_eq!(
        AdapterMeta::read(&reg.path("llama")).unwrap().base.name,
        "tiny-random-qwen2"
    );
    // The default name is the folder's.
    let (_, meta) = registry::import(&reg, &reference("mistral"), None, false).unwrap();
    assert_eq!(meta.name, "lora_r4");
    assert!(leftovers(&reg).is_empty(), "{:?}", leftovers(&reg));
}

#[test]
fn import_refuses_unsupported_broken_and_badly_named_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::open(tmp.path().join("reg")).unwrap();
    let unsupported = [
        ("use_dora", serde_json::json!(true)),
        ("init_lora_weights", serde_json::json!("pissa_niter_4")),
        ("init_lora_weights", serde_json::json!("olora")),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("rank_pattern", serde_json::json!({"q_proj": 8})),
        ("alpha_pattern", serde_json::json!({"q_proj": 8})),
        ("lora_bias", serde_json::json!(true)),
        ("peft_type", serde_json::json!("IA3")),
    ];
    for (field, value) in unsupported {
        let dir = editable_copy(tmp.path(), |c| c[field] = value.clone());
        let err = registry::import(&reg, &dir, Some("x"), false).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedAdapter { .. }),
            "{field} = {value}: {err}"
        );
    }
    // Rank in the config disagrees with the tensors.
    let dir = editable_copy(tmp.path(), |c| c["r"] = 8.into());
    let err = registry::import(&reg, &dir, Some("x"), false).unwrap_err();
    assert!(
        matches!(err, Error::AdapterMismatch { .. }) && err.to_string().contains("lora_A"),
        "{err}"
    );
    // Tensors outside target_modules.
    let dir = editable_copy(tmp.path(), |c| {
        c["target_modules"] = serde_json::json!(["q_proj"])
    });
    let err = registry::import(&reg, &dir, Some("x"), false).unwrap_err();
    assert!(err.to_string().contains("target_modules"), "{err}");
    // Missing weights.
    let dir = editable_copy(tmp.path(), |_| {});
    std::fs::remove_file(dir.join("adapter_model.safetensors")).unwrap();
    let err = registry::import(&reg, &dir, Some("x"), false).unwrap_err();
    assert!(
        err.to_string().contains("adapter_model.safetensors"),
        "{err}"
    );
    // Not an adapter at all.
    let err = registry::import(&reg, tmp.path(), Some("x"), false).unwrap_err();
    assert!(err.to_string().contains("not a PEFT adapter"), "{err}");
    // Inconsistent shapes: one projection's A with a different rank.
    let dir = editable_copy(tmp.path(), |_| {});
    let model = tiny_config(false);
    let mut a = random_adapter(&model, &lora_config(4, 8.0, &["q_proj"]), 1);
    save_peft(&a, &dir, "x").unwrap();
    a = random_adapter(&model, &lora_config(2, 8.0, &["q_proj"]), 1);
    let path = dir.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    tensors.insert(key.into(), a.named_vars()[2].1.as_tensor().clone());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = registry::import(&reg, &dir, Some("x"), false).unwrap_err();
    assert!(
        err.to_string().contains("layers.1.self_attn.q_proj.lora_A"),
        "{err}"
    );
    // Bad names.
    for bad in ["../x", "a/b", ".hidden", "x..y", ""] {
        let err = registry::import(&reg, &reference("llama"), Some(bad), false).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
    }
    // Nothing was registered and nothing left behind.
    assert!(reg.names().unwrap().is_empty());
    assert!(leftovers(&reg).is_empty(), "{:?}", leftovers(&reg));
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn list_show_and_rm_a_trained_and_an_imported_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::open(tmp.path()).unwrap();
    train_into(tmp.path(), "trained", 3, &RunOptions::default()).unwrap();
    registry::import(&reg, &reference("llama"), Some("imported"), false).unwrap();

    let entries = reg.entries().unwrap();
    assert_eq!(
        entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["imported", "trained"]
    );
    for e in &entries {
        assert!(e.is_healthy(), "{}: {:?}", e.name, e.problems);
        assert!(e.peft.is_some() && e.meta.is_some());
        assert_eq!(
            e.size_bytes,
            e.files.iter().map(|f| f.size_bytes).sum::<u64>()
        );
    }
    let trained = reg.entry("trained").unwrap();
    let meta = trained.meta.unwrap();
    assert_eq!(
        (meta.loss.prompt_weight, meta.loss.response_weight),
        (0.2, 0.8)
    );
    assert!(meta.metrics.contains_key("response_loss"));
    let names: Vec<&str> = trained.files.iter().map(|f| f.name.as_str()).collect();
    for f in TRAINED_ENTRY_FILES {
        assert!(names.contains(&f), "{f} not in {names:?}");
    }
    // A trained adapter can be compared with an imported one of another base: shapes differ.
    let x = read_peft(&reg.path("trained")).unwrap().adapter;
    let y = read_peft(&reg.path("imported")).unwrap().adapter;
    assert!(matches!(
        registry::diff(&x, &y),
        Err(Error::ShapeMismatch { .. })
    ));

    reg.remove("trained").unwrap();
    assert_eq!(reg.names().unwrap(), vec!["imported"]);
    assert!(leftovers(&reg).is_empty());
    let err = reg.remove("trained").unwrap_err();
    assert!(err.to_string().contains("no adapter"), "{err}");
    assert!(matches!(
        reg.remove("../imported"),
        Err(Error::InvalidArgument(_))
    ));
    assert!(reg.entry("nope").is_err());
}

#[test]
fn old_sidecars_still_parse_and_unknown_weights_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    train_into(tmp.path(), "t", 1, &RunOptions::default()).unwrap();
    let meta = AdapterMeta::read(&tmp.path().join("t")).unwrap();
    assert!(meta.loss.is_known());
    let mut imported = meta.clone();
    imported.loss = LossInfo::unknown();
    imported.train_config = None;
    imported.write(tmp.path()).unwrap();
    let text = std::fs::read_to_string(tmp.path().join("peft_wit.json")).unwrap();
    assert!(text.contains("\"prompt_weight\": null"), "{text}");
    let back = AdapterMeta::read(tmp.path()).unwrap();
    assert!(!back.loss.is_known() && back.loss.prompt_weight.is_nan());
}

#[test]
fn damaged_entries_and_runs_in_progress_are_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::open(tmp.path()).unwrap();
    for name in [
        "good",
        "bad-sidecar",
        "no-weights",
        "truncated",
        "bad-config",
    ] {
        registry::import(&reg, &reference("llama"), Some(name), false).unwrap();
    }
    std::fs::write(reg.path("bad-sidecar").join("peft_wit.json"), "{ not json").unwrap();
    std::fs::remove_file(reg.path("no-weights").join("adapter_model.safetensors")).unwrap();
    let w = reg.path("truncated").join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(reg.path("bad-config").join("adapter_config.json"), "[]").unwrap();
    std::fs::create_dir_all(reg.path("empty-folder")).unwrap();
    // An interrupted run stays in .runs/ with its checkpoint.
    let stop = RunOptions {
        stop: Arc::new(AtomicBool::new(true)),
        ..RunOptions::default()
    };
    match train_into(tmp.path(), "half", 4, &stop).unwrap() {
        TrainOutcome::Interrupted { step, .. } => assert_eq!(step, 1),
        other => panic!("{other:?}"),
    }

    let entries = reg.entries().unwrap();
    let problems = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} not listed"))
            .problems
            .join("; ")
    };
    assert_eq!(problems("good"), "");
    assert!(
        problems("bad-sidecar").contains("unreadable peft_wit.json"),
        "{}",
        problems("bad-sidecar")
    );
    assert!(
        problems("no-weights").contains("missing weights"),
        "{}",
        problems("no-weights")
    );
    assert!(
        problems("truncated").contains("damaged adapter_model.safetensors"),
        "{}",
        problems("truncated")
    );
    assert!(
        problems("bad-config").contains("unreadable adapter_config.json"),
        "{}",
        problems("bad-config")
    );
    assert!(
        problems("empty-folder").contains("no peft_wit.json"),
        "{}",
        problems("empty-folder")
    );
    let runs = reg.runs().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].name.as_str(), runs[0].step), ("half", Some(1)));

    // The binary lists them all, with their problems, and exits successfully.
    let (ok, out, err) = bin(tmp.path(), &["list"]);
    assert!(ok, "{err}");
    for line in ["bad-sidecar", "no-weights", "truncated", "bad-config"] {
        let row = out
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("{line} missing:\n{out}"));
        assert!(row.contains("DAMAGED"), "{row}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("good") && l.trim_end().ends_with("ok")),
        "{out}"
    );
    assert!(out.contains("in progress (step 1)"), "{out}");
    // A damaged entry can still be shown and removed, even one whose name is not a valid name.
    reg.remove("truncated").unwrap();
    assert!(!reg.path("truncated").exists());
    std::fs::create_dir_all(reg.path("hand made")).unwrap();
    assert!(!reg.entry("hand made").unwrap().is_healthy());
    reg.remove("hand made").unwrap();
    assert!(matches!(
        reg.remove("not there"),
        Err(Error::InvalidArgument(_))
    ));
}

// ---------------------------------------------------------------- concurrency

#[test]
fn two_trains_into_one_registry_at_once_both_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let handles: Vec<_> = ["alpha", "beta"]
        .into_iter()
        .map(|name| {
            let root = root.clone();
            std::thread::spawn(move || {
                train_into(&root, name, 4, &RunOptions::default()).map(|_| ())
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    let reg = Registry::open(&root).unwrap();
    let entries = reg.entries().unwrap();
    assert_eq!(
        entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["alpha", "beta"]
    );
    assert!(entries.iter().all(|e| e.is_healthy()));
    assert!(reg.runs().unwrap().is_empty());
}

#[test]
fn two_trains_of_the_same_name_at_once_one_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    for round in 0..2 {
        let name = format!("same{round}");
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (root, name) = (root.clone(), name.clone());
                std::thread::spawn(move || {
                    train_into(&root, &name, 4, &RunOptions::default()).map(|_| ())
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "{results:?}");
        let err = results
            .into_iter()
            .find_map(|r| r.err())
            .unwrap()
            .to_string();
        assert!(
            err.contains("another process is training") || err.contains("already exists"),
            "{err}"
        );
        let entry = Registry::open(&root).unwrap().entry(&name).unwrap();
        assert!(entry.is_healthy(), "{:?}", entry.problems);
        assert_eq!(entry.meta.unwrap().steps, 4);
    }
}

// ---------------------------------------------------------------- the binary

#[test]
fn binary_lists_shows_and_diffs_a_temp_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("reg");
    let reg = Registry::open(&root).unwrap();
    // Two adapters on the tiny model with known geometry: b = a with B negated on q_proj only.
    let model = tiny_config(false);
    let a = random_adapter(&model, &lora_config(4, 8.0, &PROJECTIONS), 7);
    let b = a.detached_copy().unwrap();
    for (k, v) in b.named_vars() {
        if k.contains("q_proj.lora_B") {
            v.set(&v.as_tensor().neg().unwrap()).unwrap();
        }
    }
    for (name, adapter) in [("a", &a), ("b", &b)] {
        let dir = tmp.path().join("src").join(name);
        save_peft(adapter, &dir, "tiny-random").unwrap();
        registry::import(&reg, &dir, Some(name), false).unwrap();
    }
    train_into(&root, "wit-tiny", 2, &RunOptions::default()).unwrap();

    let (ok, out, err) = bin(&root, &["list"]);
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap();
    let columns: Vec<&str> = header.split_whitespace().collect();
    for col in "name base λp/λr norm r targets data steps resp_loss size created".split(' ') {
        assert!(columns.contains(&col), "{col} not in {header}");
    }
    let row = out.lines().find(|l| l.starts_with("wit-tiny")).unwrap();
    assert!(
        row.contains("0.2/0.8")
            && row.contains("token-count")
            && row.contains("synthetic")
            && row.contains("UTC"),
        "{row}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("a ") && l.contains("?")),
        "{out}"
    );

    let (ok, out, err) = bin(&root, &["list", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[2]["name"], "wit-tiny");
    assert_eq!(entries[2]["rank"], 4);
    assert!(entries[2]["metrics"]["response_loss"].as_f64().is_some());
    assert!(entries[0]["prompt_weight"].is_null());

    let (ok, out, err) = bin(&root, &["show", "wit-tiny"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("prompt 0.2 / response 0.8, token-count"),
        "{out}"
    );
    assert!(out.contains("adapter_model.safetensors ("), "{out}");
    assert!(out.contains("r = 4, alpha = 8"), "{out}");
    let (ok, out, _) = bin(&root, &["show", "wit-tiny", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["meta"]["steps"], 2);

    // Diff: q_proj modules are exactly opposite (cos -1), all others identical (cos 1).
    let (ok, out, err) = bin(&root, &["diff", "a", "b", "--all"]);
    assert!(ok, "{err}");
    let q = out
        .lines()
        .find(|l| l.starts_with("model.layers.0.self_attn.q_proj"))
        .unwrap();
    assert!(q.contains("-1.0000"), "{q}");
    let k = out
        .lines()
        .find(|l| l.starts_with("model.layers.1.self_attn.k_proj"))
        .unwrap();
    assert!(k.contains(" 1.0000"), "{k}");
    assert!(out.lines().any(|l| l.starts_with("all ")), "{out}");
    let (ok, out, err) = bin(&root, &["diff", "a", "b", "--top", "2", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let lib = registry::diff(&a, &b).unwrap();
    let cos = v["overall"]["cosine"].as_f64().unwrap();
    assert!((cos - lib.overall.cosine.unwrap()).abs() < 1e-12 && cos < 1.0 && cos > -1.0);
    assert_eq!(v["modules"].as_array().unwrap().len(), 14);
    // Paths work as well as names; a missing name fails with a message.
    let a_dir = tmp.path().join("src/a");
    let (ok, _, err) = bin(&root, &["diff", a_dir.to_str().unwrap(), "a"]);
    assert!(ok, "{err}");
    let (ok, _, err) = bin(&root, &["show", "nope"]);
    assert!(!ok && err.contains("no adapter `nope`"), "{err}");

    let (ok, out, err) = bin(&root, &["rm", "b"]);
    assert!(ok && out.contains("removed b"), "{err}");
    assert_eq!(reg.names().unwrap(), vec!["a", "wit-tiny"]);
}
