//! The trainer on a tiny random model built in code: the loss goes down, runs are deterministic,
//! interrupted runs resume to the byte-identical adapter, gradient accumulation normalises over
//! the whole accumulated batch, and a non-finite loss stops the run keeping the last checkpoint.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device};
use common::tiny::{example, tiny_base, tiny_data, tiny_train_config, TRAINED_ENTRY_FILES};
use peft_wit::data::{Batch, LossWeights, TokenizedExample};
use peft_wit::loss::{denominator, weighted_nll_sum, wit_loss, Normalization};
use peft_wit::model::decoder::ForwardContext;
use peft_wit::registry::Registry;
use peft_wit::train::trainer::MetricsLine;
use peft_wit::train::{train, LossPreset, PreparedData, RunOptions, TrainConfig, TrainOutcome};
use peft_wit::Error;

fn data() -> PreparedData {
    tiny_data(24, 6)
}

/// The tiny run with dropout and two accumulated micro-batches per step.
fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        lora_dropout: 0.1,
        grad_accum: 2,
        ..tiny_train_config("tiny", steps)
    }
}

fn run(registry: &Path, cfg: &TrainConfig, opts: &RunOptions) -> peft_wit::Result<TrainOutcome> {
    let registry = Registry::open(registry).unwrap();
    train(&tiny_base(), &data(), cfg, &registry, opts)
}

fn adapter_bytes(registry: &Path, name: &str) -> Vec<u8> {
    std::fs::read(registry.join(name).join("adapter_model.safetensors")).unwrap()
}

fn metrics(registry: &Path, name: &str) -> Vec<MetricsLine> {
    std::fs::read_to_string(registry.join(name).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn training_lowers_the_loss_and_writes_a_complete_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(40);
    cfg.lora_dropout = 0.0;
    match run(tmp.path(), &cfg, &RunOptions::default()).unwrap() {
        TrainOutcome::Finished { meta, .. } => {
            assert_eq!(meta.steps, 40);
            assert_eq!(meta.loss.prompt_weight, 0.2);
        }
        other => panic!("{other:?}"),
    }
    let lines = metrics(tmp.path(), "tiny");
    let evals: Vec<f64> = lines.iter().filter_map(|m| m.eval_response_loss).collect();
    assert!(evals.len() >= 2);
    let (first, last) = (evals[0], *evals.last().unwrap());
    let train_losses: Vec<f64> = lines.iter().filter_map(|m| m.loss).collect();
    eprintln!(
        "eval response loss {first:.3} -> {last:.3}; train {:.3} -> {:.3}",
        train_losses[0],
        train_losses.last().unwrap()
    );
    assert!(
        last < first * 0.8,
        "eval loss did not fall enough: {first} -> {last}"
    );
    for file in TRAINED_ENTRY_FILES {
        assert!(
            tmp.path().join("tiny").join(file).is_file(),
            "{file} missing"
        );
    }
    // The staging area is cleaned up.
    assert!(!tmp.path().join(".runs").join("tiny").exists());
    // Same name again without --force: refused.
    let err = run(tmp.path(), &cfg, &RunOptions::default()).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
}

#[test]
fn same_config_and_seed_give_a_byte_identical_adapter() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = config(6);
    run(a.path(), &cfg, &RunOptions::default()).unwrap();
    // The step's two micro-batches side by side, each on its share of the threads: the same
    // dropout draws and the same sums, so the same bytes.
    let side_by_side = RunOptions {
        lanes: 2,
        ..RunOptions::default()
    };
    run(b.path(), &cfg, &side_by_side).unwrap();
    assert_eq!(
        adapter_bytes(a.path(), "tiny"),
        adapter_bytes(b.path(), "tiny")
    );
    assert_eq!(
        train_losses(a.path(), "tiny"),
        train_losses(b.path(), "tiny")
    );
    // Three micro-batches on two lanes: the third runs on both lanes' threads, and the bytes
    // are still those of one lane.
    let three = TrainConfig {
        grad_accum: 3,
        ..cfg.clone()
    };
    let (d, e) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run(d.path(), &three, &RunOptions::default()).unwrap();
    run(e.path(), &three, &side_by_side).unwrap();
    assert_eq!(
        adapter_bytes(d.path(), "tiny"),
        adapter_bytes(e.path(), "tiny")
    );
    assert_ne!(
        adapter_bytes(a.path(), "tiny"),
        adapter_bytes(d.path(), "tiny"),
        "a third micro-batch changes the run"
    );
    let mut other = cfg.clone();
    other.seed += 1;
    let c = tempfile::tempdir().unwrap();
    run(c.path(), &other, &RunOptions::default()).unwrap();
    assert_ne!(
        adapter_bytes(a.path(), "tiny"),
        adapter_bytes(c.path(), "tiny")
    );
}

#[test]
fn interrupted_runs_resume_to_the_byte_identical_adapter() {
    let whole = tempfile::tempdir().unwrap();
    let cfg = config(7);
    run(whole.path(), &cfg, &RunOptions::default()).unwrap();

    let parts = tempfile::tempdir().unwrap();
    let stopping = RunOptions {
        stop: Arc::new(AtomicBool::new(true)),
        ..RunOptions::default()
    };
    // Interrupted after step 1, then (resumed) again after step 2, then resumed to the end.
    match run(parts.path(), &cfg, &stopping).unwrap() {
        TrainOutcome::Interrupted { step, .. } => assert_eq!(step, 1),
        other => panic!("{other:?}"),
    }
    // Without --resume the checkpoint is not silently discarded.
    let err = run(parts.path(), &cfg, &RunOptions::default()).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
    let resume_and_stop = RunOptions {
        resume: true,
        ..stopping.clone()
    };
    match run(parts.path(), &cfg, &resume_and_stop).unwrap() {
        TrainOutcome::Interrupted { step, .. } => assert_eq!(step, 2),
        other => panic!("{other:?}"),
    }
    // Resuming with a different config is refused.
    let mut changed = cfg.clone();
    changed.lr *= 2.0;
    let err = run(
        parts.path(),
        &changed,
        &RunOptions {
            resume: true,
            ..RunOptions::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("another config"), "{err}");
    run(
        parts.path(),
        &cfg,
        &RunOptions {
            resume: true,
            ..RunOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        adapter_bytes(whole.path(), "tiny"),
        adapter_bytes(parts.path(), "tiny")
    );
    let steps: Vec<usize> = metrics(parts.path(), "tiny")
        .iter()
        .filter(|m| m.loss.is_some())
        .map(|m| m.step)
        .collect();
    assert_eq!(steps, (1..=7).collect::<Vec<_>>());
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(6);
    cfg.lr = 1e30;
    cfg.max_grad_norm = None;
    cfg.checkpoint_every = 1;
    let err = run(tmp.path(), &cfg, &RunOptions::default()).unwrap_err();
    let step = match err {
        Error::NonFiniteLoss { step, .. } => step,
        other => panic!("expected a non-finite loss error, got {other}"),
    };
    assert!(step >= 2, "step {step}");
    let latest =
        peft_wit::train::checkpoint::latest(&tmp.path().join(".runs").join("tiny")).unwrap();
    let latest = latest.expect("a checkpoint from before the failure");
    assert!(
        latest.ends_with(format!("checkpoint-{:06}", step - 1)),
        "{}",
        latest.display()
    );
    assert!(
        !tmp.path().join("tiny").exists(),
        "no registry entry for a failed run"
    );
}

#[test]
fn accumulated_micro_batches_share_one_denominator() {
    let base = tiny_base();
    let examples: Vec<TokenizedExample> = (0..3).map(example).collect();
    let weights = LossWeights::new(0.3, 1.0);
    let refs: Vec<&TokenizedExample> = examples.iter().collect();
    let whole = Batch::new(&refs, &weights, 2);
    let mut ctx = ForwardContext::default();
    let (loss, _) = wit_loss(&base.decoder, &whole, Normalization::TokenCount, &mut ctx).unwrap();
    let whole_loss = loss.to_scalar::<f32>().unwrap() as f64;
    let parts: Vec<Batch> = refs.chunks(2).map(|c| Batch::new(c, &weights, 2)).collect();
    let denom: f64 = parts
        .iter()
        .map(|b| denominator(b, Normalization::TokenCount))
        .sum();
    let mut sum = 0f64;
    for b in &parts {
        let (s, _) = weighted_nll_sum(&base.decoder, b, &mut ForwardContext::default()).unwrap();
        sum += s.to_scalar::<f32>().unwrap() as f64;
    }
    assert!(
        (sum / denom - whole_loss).abs() < 1e-5,
        "{} vs {whole_loss}",
        sum / denom
    );
    // Per-micro-batch averaging would differ: the halves have different token counts.
    let mean_of_means: f64 = parts
        .iter()
        .map(|b| {
            let (l, _) = wit_loss(
                &base.decoder,
                b,
                Normalization::TokenCount,
                &mut ForwardContext::default(),
            )
            .unwrap();
            l.to_scalar::<f32>().unwrap() as f64
        })
        .sum::<f64>()
        / 2.0;
    assert!((mean_of_means - whole_loss).abs() > 1e-4);
}

#[test]
fn a_stopped_sweep_resumes_and_skips_finished_cells() {
    use peft_wit::sweep::{CellOutcome, GridSpec, LocalSweep, SweepPlan};
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::open(tmp.path()).unwrap();
    let (base, data) = (tiny_base(), data());
    let cfg = config(3);
    let grid = GridSpec {
        name: "t-grid".into(),
        prefix: "t-".into(),
        metric: "response_loss".into(),
        prompt_weights: vec![0.0.into(), 0.5.into()],
        response_weights: vec![0.0.into(), 1.0.into()],
        strategy: peft_wit::sweep::Strategy::Grid,
    };
    let plan = SweepPlan::new(&grid, &cfg, &base, &data).unwrap();
    assert_eq!(plan.cells.len(), 3, "(0, 0) has no loss and no cell");
    assert!(plan.write_or_match(&registry, &data).unwrap());
    let stopping = RunOptions {
        stop: Arc::new(AtomicBool::new(true)),
        ..RunOptions::default()
    };
    let mut trained = 0;
    let mut sweep = |opts: &RunOptions, lanes: usize| {
        LocalSweep {
            base: &base,
            data: &data,
            plan: &plan,
            registry: &registry,
            opts,
            lanes,
        }
        .run(|_, outcome| trained += matches!(outcome, CellOutcome::Trained { .. }) as usize)
        .unwrap()
    };
    let first = sweep(&stopping, 1);
    assert!(first.interrupted);
    assert_eq!(first.cells[0].status, "invalid (all weights 0)");
    assert!(
        first.cells[1]
            .status
            .starts_with("interrupted at step 1 of 3"),
        "{:?}",
        first.cells[1]
    );
    assert_eq!(first.cells[2].status, "pending");
    // Two cells side by side: the interrupted one resumes while the pending one trains.
    let second = sweep(&RunOptions::default(), 2);
    assert!(!second.interrupted);
    let statuses: Vec<&str> = second.cells.iter().map(|c| c.status.as_str()).collect();
    assert_eq!(
        statuses,
        ["invalid (all weights 0)", "done", "done", "done"]
    );
    // The resumed cell (trained beside another, on one thread) equals an uninterrupted
    // training of the same cell (alone, on all of them), byte for byte.
    let fresh = tempfile::tempdir().unwrap();
    let mut one = cfg.clone();
    one.prompt_weight = 0.5;
    one.response_weight = 0.0;
    one.name = Some("t-wit-p0.5-r0".into());
    run(fresh.path(), &one, &RunOptions::default()).unwrap();
    assert_eq!(
        adapter_bytes(fresh.path(), "t-wit-p0.5-r0"),
        adapter_bytes(tmp.path(), "t-wit-p0.5-r0")
    );
    // Planned again with the same settings: the same plan; every cell already done.
    assert!(!plan.write_or_match(&registry, &data).unwrap());
    let third = sweep(&RunOptions::default(), 1);
    assert_eq!(trained, 3);
    assert!(third.cells[1..].iter().all(|c| c.status == "done"));
    assert!(third.best.is_some());
    assert_eq!(third.grid().len(), 2);
    third.write(&tmp.path().join("report")).unwrap();
    let svg = std::fs::read_to_string(tmp.path().join("report").join("heatmap.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("stroke=\"red\""));
}

#[test]
fn eval_of_a_trained_adapter_equals_the_trainers_own_eval() {
    use peft_wit::eval::loss_metrics;
    use peft_wit::lora::peft::load_peft;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(4);
    let meta = match run(tmp.path(), &cfg, &RunOptions::default()).unwrap() {
        TrainOutcome::Finished { meta, .. } => meta,
        other => panic!("{other:?}"),
    };
    let base = tiny_base();
    let adapter = load_peft(
        &tmp.path().join("tiny"),
        &base.decoder.config,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let weights = LossWeights::new(0.2, 0.8);
    let m = loss_metrics(
        &base.decoder,
        Some(&adapter),
        &data().eval,
        &weights,
        Normalization::TokenCount,
        4,
        2,
    )
    .unwrap();
    let logged = meta.metrics["response_loss"];
    assert!(
        (m.response_loss - logged).abs() < 1e-9,
        "{} vs {logged}",
        m.response_loss
    );
    assert!((m.wit_loss - meta.metrics["wit_loss"]).abs() < 1e-9);
    // The last eval line of metrics.jsonl is the same number.
    let last_eval = metrics(tmp.path(), "tiny")
        .iter()
        .rev()
        .find_map(|l| l.eval_response_loss)
        .unwrap();
    assert_eq!(last_eval, logged);
}

/// The train losses of a finished run, step by step.
fn train_losses(registry: &Path, name: &str) -> Vec<f64> {
    metrics(registry, name)
        .iter()
        .filter_map(|m| m.loss)
        .collect()
}

#[test]
fn weight_schedules_weigh_each_step_and_resume_byte_identical() {
    use peft_wit::train::WeightSchedule;
    // step:1->0@0.5 over 4 steps: steps 1-2 weigh the prompt 1 (as a fixed λp = 1 run does),
    // steps 3-4 weigh it 0.
    let fixed = tempfile::tempdir().unwrap();
    let mut one = config(4);
    one.lora_dropout = 0.0;
    one.prompt_weight = 1.0;
    run(fixed.path(), &one, &RunOptions::default()).unwrap();
    let scheduled = tempfile::tempdir().unwrap();
    let mut sched = one.clone();
    sched.prompt_weight_schedule = "step:1->0@0.5".parse::<WeightSchedule>().unwrap();
    run(scheduled.path(), &sched, &RunOptions::default()).unwrap();
    let (a, b) = (
        train_losses(fixed.path(), "tiny"),
        train_losses(scheduled.path(), "tiny"),
    );
    assert_eq!(a[..2], b[..2], "the first half weighs the prompt as λp = 1");
    assert_ne!(a[2], b[2], "the second half weighs the prompt 0");

    // A schedule that stays put equals the fixed weight, byte for byte.
    let flat = tempfile::tempdir().unwrap();
    let mut same = one.clone();
    same.prompt_weight_schedule = "linear:1->1".parse().unwrap();
    run(flat.path(), &same, &RunOptions::default()).unwrap();
    assert_eq!(
        adapter_bytes(fixed.path(), "tiny"),
        adapter_bytes(flat.path(), "tiny")
    );

    // Stopped mid-schedule and resumed: the same adapter as an uninterrupted run.
    let mut lin = config(6);
    lin.prompt_weight_schedule = "linear:1->0".parse().unwrap();
    lin.response_weight_schedule = "cosine:0.5->1".parse().unwrap();
    let whole = tempfile::tempdir().unwrap();
    run(whole.path(), &lin, &RunOptions::default()).unwrap();
    let parts = tempfile::tempdir().unwrap();
    let stopping = RunOptions {
        stop: Arc::new(AtomicBool::new(true)),
        ..RunOptions::default()
    };
    for expected in [1, 2, 3] {
        let opts = RunOptions {
            resume: expected > 1,
            ..stopping.clone()
        };
        match run(parts.path(), &lin, &opts).unwrap() {
            TrainOutcome::Interrupted { step, .. } => assert_eq!(step, expected),
            other => panic!("{other:?}"),
        }
    }
    let resume = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    run(parts.path(), &lin, &resume).unwrap();
    assert_eq!(
        adapter_bytes(whole.path(), "tiny"),
        adapter_bytes(parts.path(), "tiny")
    );
    // The sidecar records the schedules and the weights training ended with.
    let meta = peft_wit::registry::AdapterMeta::read(&whole.path().join("tiny")).unwrap();
    assert_eq!(
        meta.loss.prompt_weight_schedule.as_deref(),
        Some("linear:1->0")
    );
    assert_eq!(
        meta.loss.response_weight_schedule.as_deref(),
        Some("cosine:0.5->1")
    );
    assert_eq!(meta.loss.prompt_weight, 0.0);
    assert_eq!(meta.loss.response_weight, 1.0);
}

#[test]
fn a_scheduled_step_counts_the_tokens_weighted_at_that_step() {
    // λp 0 -> 1 with λr 0 at the start would leave nothing to learn at step 1: refused up front.
    let mut cfg = config(4);
    cfg.prompt_weight_schedule = "linear:0->1".parse().unwrap();
    cfg.response_weight_schedule = "step:0->1@0.5".parse().unwrap();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("no token with a non-zero weight at the start"),
        "{err}"
    );
    // Schedules need the explicit WIT weights.
    let mut cfg = config(4);
    cfg.loss = LossPreset::Standard;
    cfg.prompt_weight_schedule = "linear:1->0".parse().unwrap();
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("need loss"));
    // The default name says the schedule.
    let mut cfg = config(4);
    cfg.prompt_weight_schedule = "linear:1->0".parse().unwrap();
    assert_eq!(cfg.default_name(), "wit-plin1to0-r0.8");
}

#[test]
fn successive_halving_stops_the_worse_cells_and_finishes_the_best_as_the_grid_does() {
    use peft_wit::sweep::{CellOutcome, GridSpec, LocalSweep, Strategy, SweepPlan};
    let (base, data) = (tiny_base(), data());
    let cfg = config(4);
    let spec = |strategy| GridSpec {
        name: "h".into(),
        prefix: "h-".into(),
        metric: "response_loss".into(),
        prompt_weights: vec![0.0.into(), 1.0.into()],
        response_weights: vec![0.5.into(), 1.0.into()],
        strategy,
    };
    // The tokens each run trained on, summed over the sweep.
    let sweep = |dir: &Path, strategy, lanes| {
        let registry = Registry::open(dir).unwrap();
        let plan = SweepPlan::new(&spec(strategy), &cfg, &base, &data).unwrap();
        plan.write_or_match(&registry, &data).unwrap();
        let mut trained = 0u64;
        let result = LocalSweep {
            base: &base,
            data: &data,
            plan: &plan,
            registry: &registry,
            opts: &RunOptions::default(),
            lanes,
        }
        .run(|_, outcome| {
            if let CellOutcome::Trained { tokens_trained, .. } = outcome {
                trained += tokens_trained;
            }
        })
        .unwrap();
        (result, trained)
    };
    let grid_dir = tempfile::tempdir().unwrap();
    let (grid, grid_trained) = sweep(grid_dir.path(), Strategy::Grid, 1);
    let halving_dir = tempfile::tempdir().unwrap();
    let (halving, halving_trained) = sweep(
        halving_dir.path(),
        Strategy::Halving { rungs: 2, eta: 2 },
        2,
    );
    assert!(!halving.interrupted, "{halving:?}");
    // Rung 1 ends at step 2: all four cells; the better two go on to step 4.
    let stopped: Vec<&str> = halving
        .cells
        .iter()
        .filter(|c| c.stopped_at_rung == Some(1))
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(stopped.len(), 2, "{halving:?}");
    let mut tokens = (0u64, 0u64);
    for cell in &halving.cells {
        let meta =
            peft_wit::registry::AdapterMeta::read(&halving_dir.path().join(&cell.name)).unwrap();
        let grid_meta =
            peft_wit::registry::AdapterMeta::read(&grid_dir.path().join(&cell.name)).unwrap();
        tokens.0 += meta.tokens_seen;
        tokens.1 += grid_meta.tokens_seen;
        if stopped.contains(&cell.name.as_str()) {
            assert_eq!(meta.steps, 2);
            assert!(
                cell.status
                    .starts_with("stopped at rung 1 of 2 (step 2 of 4)"),
                "{cell:?}"
            );
            // No leftover run folder once the sweep is over.
            assert!(!halving_dir.path().join(".runs").join(&cell.name).exists());
        } else {
            // A finalist is the grid's cell, byte for byte: same schedule, data order, steps
            // (and the halving ran its cells two at a time, the grid one after another).
            assert_eq!(meta.steps, 4);
            assert_eq!(
                adapter_bytes(halving_dir.path(), &cell.name),
                adapter_bytes(grid_dir.path(), &cell.name),
                "{}",
                cell.name
            );
            assert_eq!(
                cell.metrics,
                grid.cells
                    .iter()
                    .find(|g| g.name == cell.name)
                    .unwrap()
                    .metrics
            );
        }
    }
    assert!(
        tokens.0 < tokens.1,
        "halving trained {} tokens, the grid {}",
        tokens.0,
        tokens.1
    );
    // No token trained twice: a finalist continues its rung-1 checkpoint, it does not start over.
    assert_eq!(grid_trained, tokens.1);
    assert_eq!(halving_trained, tokens.0);
    // The finalists were the best two at rung 1; the sweep's best is one of them.
    let best = halving.best.clone().unwrap();
    assert!(!stopped.contains(&best.as_str()));
    let svg = halving.heatmap_svg();
    assert!(svg.contains("stopped at rung 1"));
}

#[test]
fn a_shared_initial_evaluation_gives_the_step_zero_metrics_of_a_forward_pass() {
    use peft_wit::eval::TokenLosses;
    use peft_wit::lora::LoraAdapter;
    let (base, data) = (tiny_base(), data());
    // Prompt tokens weighted, so the shared losses must carry them too.
    let mut cfg = config(2);
    cfg.prompt_weight = 0.5;
    let decoder = &base.decoder;
    let identity = LoraAdapter::init(
        &cfg.lora_config().unwrap(),
        &decoder.config,
        cfg.seed,
        DType::F32,
        decoder.device(),
    )
    .unwrap();
    assert!(identity.is_identity().unwrap());
    let scored = TokenLosses::compute(
        decoder,
        Some(&identity),
        &data.eval,
        cfg.batch_size,
        base.pad_id(),
        true,
    )
    .unwrap();
    let forward = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let train_in = |dir: &Path, opts: RunOptions| {
        let registry = Registry::open(dir).unwrap();
        train(&base, &data, &cfg, &registry, &opts).unwrap();
    };
    train_in(forward.path(), RunOptions::default());
    train_in(
        shared.path(),
        RunOptions {
            initial_eval: Some(Arc::new(scored.clone())),
            ..Default::default()
        },
    );
    let first = |dir: &Path| metrics(dir, "tiny")[0].clone();
    assert_eq!(first(forward.path()).step, 0);
    assert!(first(forward.path()).eval_wit_loss.is_some());
    // The same numbers to the last bit, and the same run after them.
    assert_eq!(first(forward.path()), first(shared.path()));
    assert_eq!(
        adapter_bytes(forward.path(), "tiny"),
        adapter_bytes(shared.path(), "tiny")
    );
    // Losses scored without the prompt side do not stand in for prompt-weighted metrics.
    let response_only = TokenLosses::compute(
        decoder,
        Some(&identity),
        &data.eval,
        cfg.batch_size,
        base.pad_id(),
        false,
    )
    .unwrap();
    let weighted = peft_wit::data::LossWeights {
        prompt: 0.5,
        response: 1.0,
        system: None,
        user: None,
    };
    assert!(!response_only.covers(&weighted) && scored.covers(&weighted));
}
