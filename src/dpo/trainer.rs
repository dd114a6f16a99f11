//! The DPO loop: the policy starts as a copy of the parent adapter, the reference is the parent
//! itself (frozen base + starting adapter) whose log-probabilities are computed once, without a
//! graph, before the first step (for the training pairs the run will visit, and the held-out
//! ones); each step is then one policy forward/backward per micro-batch
//! of pairs (chosen and rejected together), AdamW with the trainer's clipping and schedule, and a
//! metrics line. Held-out pairs are scored before and after; the result is committed to the
//! registry as a new adapter whose sidecar names its parent.
//!
//! LoRA dropout is off (as in TRL's DPO): with it, the policy would differ from the reference at
//! step 0 and the reference log-probs would be noisy.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use super::data::{PairTokens, PreparedPairs};
use super::loss::{
    micro_objective, pair_logps, DpoMetrics, DpoStats, PairBatch, RefLogps, StepScale,
};
use crate::data::{length_grouped_batches, LossWeights};
use crate::fsutil::{atomic_write, atomic_write_json, JsonLines};
use crate::lora::peft::save_peft;
use crate::lora::LoraAdapter;
use crate::model::decoder::ForwardContext;
use crate::model::BaseModel;
use crate::registry::{AdapterMeta, BaseInfo, DataInfo, DpoInfo, LossInfo, Registry, METRICS_FILE};
use crate::train::optim::{learning_rate, AdamW, AdamWParams, GradAccumulator, Schedule};
use crate::train::trainer::{lock_run, progress_bar, STEP_BAR};
use crate::{Error, Result};

/// Everything that determines a DPO run's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpoConfig {
    /// β: how far the policy may move from the reference (larger = stay closer).
    pub beta: f64,
    /// Weight of the WIT loss on the chosen answers (RPO-style); 0 is plain DPO.
    pub sft_weight: f64,
    /// Registry name of the result (default `<parent>-dpo`).
    pub name: Option<String>,
    pub max_steps: Option<usize>,
    pub epochs: usize,
    /// Pairs per micro-batch (each pair is two sequences).
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    pub eval_fraction: f64,
    pub max_seq_len: usize,
    pub template: String,
    /// A metrics line every this many steps (and at the last).
    pub log_every: usize,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            sft_weight: 0.0,
            name: None,
            max_steps: None,
            epochs: 1,
            batch_size: 2,
            grad_accum: 1,
            lr: 5e-5,
            schedule: Schedule::Linear,
            warmup_ratio: 0.1,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            seed: 42,
            eval_fraction: 0.1,
            max_seq_len: 512,
            template: "chat".into(),
            log_every: 1,
        }
    }
}

impl DpoConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return bad(format!("--beta must be positive, got {}", self.beta));
        }
        if !(self.sft_weight.is_finite() && self.sft_weight >= 0.0) {
            return bad(format!(
                "--sft-weight must be >= 0, got {}",
                self.sft_weight
            ));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("--batch-size and --grad-accum must be at least 1".into());
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.epochs == 0) {
            return bad("nothing to train: --max-steps or --epochs is 0".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr must be positive, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return bad(format!(
                "--eval-fraction must be in [0, 1), got {}",
                self.eval_fraction
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "warmup ratio must be in [0, 1], got {}",
                self.warmup_ratio
            ));
        }
        Ok(())
    }

    /// Optimizer steps for `n_train` pairs.
    pub fn total_steps(&self, n_train: usize) -> usize {
        crate::train::optim::optimizer_steps(
            self.max_steps,
            self.epochs,
            n_train,
            self.batch_size,
            self.grad_accum,
        )
    }
}

/// The adapter a DPO run starts from, and its record.
pub struct Parent {
    /// Its registry name (the folder name when given as a path).
    pub name: String,
    pub dir: PathBuf,
    pub adapter: LoraAdapter,
    /// `None` for a PEFT folder without peft-wit's sidecar.
    pub meta: Option<AdapterMeta>,
}

impl Parent {
    /// Resolves `spec` (a registry name or a PEFT folder) and loads it for `base` (refused when
    /// its sidecar names another base).
    pub fn load(registry: &Registry, spec: &str, base: &BaseModel) -> Result<Self> {
        let dir = registry.resolve(spec)?;
        let meta = if dir.join(crate::registry::SIDECAR_FILE).is_file() {
            Some(AdapterMeta::read(&dir)?)
        } else {
            None
        };
        let adapter = crate::registry::load_for_base(&dir, base, false)?;
        let name = meta
            .as_ref()
            .map(|m| m.name.clone())
            .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| spec.to_string());
        Ok(Self {
            name,
            dir,
            adapter,
            meta,
        })
    }

    /// The parent's own loss weights (λp, λr, per-role), used by the SFT term; standard
    /// instruction tuning (0 / 1) when they are unknown (imported adapters).
    pub fn loss_weights(&self) -> LossWeights {
        match &self.meta {
            Some(m) if m.loss.is_known() => LossWeights {
                prompt: m.loss.prompt_weight,
                response: m.loss.response_weight,
                system: m.loss.system_weight,
                user: m.loss.user_weight,
            },
            _ => LossWeights::default(),
        }
    }
}

/// How a run is shown and whether it may replace an adapter.
#[derive(Debug, Clone, Default)]
pub struct DpoOptions {
    pub progress: bool,
    pub force: bool,
}

/// A finished run: the new registry entry and the held-out metrics before and after.
#[derive(Debug)]
pub struct DpoOutcome {
    pub dir: PathBuf,
    pub meta: Box<AdapterMeta>,
    pub eval_before: Option<DpoMetrics>,
    pub eval_after: Option<DpoMetrics>,
}

/// Log-probs of `pairs` under `adapter`, without a graph, in batches of similar length.
pub fn reference_logps(
    base: &BaseModel,
    adapter: &LoraAdapter,
    pairs: &[PairTokens],
    batch_size: usize,
    bar: Option<&ProgressBar>,
) -> Result<Vec<RefLogps>> {
    let lens: Vec<usize> = pairs.iter().map(PairTokens::len).collect();
    let mut out = vec![
        RefLogps {
            chosen: 0.0,
            rejected: 0.0
        };
        pairs.len()
    ];
    for batch in length_grouped_batches(&lens, batch_size, 0, false) {
        let rows: Vec<&PairTokens> = batch.iter().map(|&i| &pairs[i]).collect();
        let pb = PairBatch::new(&rows, base.pad_id(), None);
        let mut ctx = ForwardContext {
            adapter: Some(adapter),
            no_grad: true,
            ..Default::default()
        };
        for (&i, lp) in batch.iter().zip(pair_logps(&base.decoder, &pb, &mut ctx)?) {
            out[i] = lp;
        }
        if let Some(bar) = bar {
            bar.inc(batch.len() as u64);
        }
    }
    Ok(out)
}

/// DPO statistics of `adapter` on `pairs` against their reference log-probs.
pub fn evaluate(
    base: &BaseModel,
    adapter: &LoraAdapter,
    pairs: &[PairTokens],
    reference: &[RefLogps],
    beta: f64,
    batch_size: usize,
) -> Result<DpoStats> {
    let policy = reference_logps(base, adapter, pairs, batch_size, None)?;
    Ok(stats_of(&policy, reference, beta))
}

/// DPO statistics of given policy log-probs against reference ones.
pub fn stats_of(policy: &[RefLogps], reference: &[RefLogps], beta: f64) -> DpoStats {
    let mut stats = DpoStats::default();
    for (p, r) in policy.iter().zip(reference) {
        stats.add(*p, *r, beta);
    }
    stats
}

/// Trains a DPO adapter from `parent` on `data` and commits it to `registry`.
pub fn train_dpo(
    base: &BaseModel,
    parent: &Parent,
    data: &PreparedPairs,
    cfg: &DpoConfig,
    registry: &Registry,
    opts: &DpoOptions,
) -> Result<DpoOutcome> {
    cfg.validate()?;
    if data.train.is_empty() {
        return Err(Error::InvalidArgument(
            "no training pairs (all were held out or skipped)".into(),
        ));
    }
    let name = cfg
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-dpo", parent.name));
    crate::registry::validate_name(&name)?;
    if registry.contains(&name) && !opts.force {
        return Err(Error::AdapterExists {
            name,
            registry: registry.root().to_path_buf(),
        });
    }
    let run_dir = registry.run_dir(&name);
    let _lock = lock_run(&run_dir, &name, "DPO training")?;
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    }
    std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    let started = Instant::now();

    // Reference log-probs: the parent as it is, once.
    let total = cfg.total_steps(data.train.len());
    let plan = micro_batch_plan(data, cfg, total);
    // Reference log-probs of the parent as it is, once, for the pairs the run will visit (a
    // short run over a large file does not pay for the rest).
    let mut visited: Vec<usize> = plan.iter().flatten().copied().collect();
    visited.sort_unstable();
    visited.dedup();
    let ref_bar = progress_bar(
        opts.progress,
        visited.len() + data.eval.len(),
        0,
        &format!("{name} reference log-probs"),
        "{prefix} [{bar:28}] {pos}/{len} pairs | {elapsed_precise}",
    );
    let visited_pairs: Vec<PairTokens> = visited.iter().map(|&i| data.train[i].clone()).collect();
    let visited_refs = reference_logps(
        base,
        &parent.adapter,
        &visited_pairs,
        cfg.batch_size,
        Some(&ref_bar),
    )?;
    drop(visited_pairs);
    let mut reference: Vec<Option<RefLogps>> = vec![None; data.train.len()];
    for (&i, r) in visited.iter().zip(visited_refs) {
        reference[i] = Some(r);
    }
    let eval_reference = reference_logps(
        base,
        &parent.adapter,
        &data.eval,
        cfg.batch_size,
        Some(&ref_bar),
    )?;
    ref_bar.finish_and_clear();

    // Before training the policy IS the reference, so its held-out log-probs are the
    // reference's (reward accuracy 0 and loss ln 2 by construction; log-prob accuracy is
    // informative).
    let eval_before = (!data.eval.is_empty())
        .then(|| stats_of(&eval_reference, &eval_reference, cfg.beta).mean());

    let policy = parent.adapter.detached_copy()?;
    let mut optimizer = AdamW::new(
        policy.named_vars(),
        AdamWParams {
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let sft_weights = parent.loss_weights();
    let sft = (cfg.sft_weight > 0.0).then_some(&sft_weights);
    let warmup = (cfg.warmup_ratio * total as f64).ceil() as usize;
    let pad = base.pad_id();
    let mut log = JsonLines::open_append(&run_dir.join(METRICS_FILE))?;
    if let Some(m) = &eval_before {
        log.append(&eval_line(0, m, 0, 0.0))?;
    }
    let bar = progress_bar(opts.progress, total, 0, &name, STEP_BAR);
    let mut tokens_seen = 0u64;
    let mut recent: Vec<DpoStats> = Vec::new();
    let window = 10.min(total).max(1);
    let vars = optimizer.vars().to_vec();
    for step in 0..total {
        let step_start = Instant::now();
        let mut micro: Vec<(PairBatch, Vec<RefLogps>)> = Vec::with_capacity(cfg.grad_accum);
        for indices in &plan[step * cfg.grad_accum..(step + 1) * cfg.grad_accum] {
            let rows: Vec<&PairTokens> = indices.iter().map(|&i| &data.train[i]).collect();
            let refs = indices
                .iter()
                .map(|&i| {
                    reference[i].ok_or_else(|| {
                        Error::InvalidArgument(format!("pair {i} has no reference log-probs"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            micro.push((PairBatch::new(&rows, pad, sft), refs));
        }
        let scale = StepScale {
            beta: cfg.beta,
            step_pairs: micro.iter().map(|(b, _)| b.pairs).sum(),
            sft_weight: cfg.sft_weight,
            sft_denominator: micro.iter().map(|(b, _)| b.sft_tokens() as f64).sum(),
        };
        let mut grads = GradAccumulator::new(&vars);
        let mut value = 0f64;
        let mut sft_sum = 0f64;
        let mut stats = DpoStats::default();
        let mut step_tokens = 0u64;
        for (batch, refs) in &micro {
            let mut ctx = ForwardContext {
                adapter: Some(&policy),
                ..Default::default()
            };
            let obj = micro_objective(&base.decoder, batch, refs, scale, &mut ctx)?;
            value += obj.value;
            sft_sum += obj.sft_sum;
            stats.merge(&obj.stats);
            grads.add(&obj.surrogate.backward()?)?;
            step_tokens += batch.batch.seq_lens.iter().sum::<usize>() as u64;
        }
        if !value.is_finite() {
            return Err(Error::NonFiniteLoss {
                step: step + 1,
                value: value as f32,
            });
        }
        let (grads, grad_norm) = grads.clipped(cfg.max_grad_norm, step + 1)?;
        let lr = learning_rate(cfg.schedule, cfg.lr, step, warmup, total);
        optimizer.step(&grads, lr)?;
        tokens_seen += step_tokens;
        let done = step + 1;
        let m = stats.mean();
        recent.push(stats);
        if recent.len() > window {
            recent.remove(0);
        }
        let tok_s = step_tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(done as u64);
        bar.set_message(format!(
            "loss {:.4} acc {:.2} margin {:.3} lr {lr:.2e} {tok_s:.0} tok/s",
            m.loss, m.reward_accuracy, m.reward_margin
        ));
        if cfg.log_every > 0 && (done % cfg.log_every == 0 || done == total) {
            let mut line = train_line(done, &m, tokens_seen, started.elapsed().as_secs_f64());
            line.insert("lr".into(), lr.into());
            line.insert("grad_norm".into(), grad_norm.into());
            line.insert("loss".into(), value.into());
            if cfg.sft_weight > 0.0 && scale.sft_denominator > 0.0 {
                line.insert("sft_loss".into(), (sft_sum / scale.sft_denominator).into());
            }
            log.append(&line)?;
        }
    }
    bar.finish_and_clear();

    let eval_after = if data.eval.is_empty() {
        None
    } else {
        Some(
            evaluate(
                base,
                &policy,
                &data.eval,
                &eval_reference,
                cfg.beta,
                cfg.batch_size,
            )?
            .mean(),
        )
    };
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(m) = &eval_after {
        log.append(&eval_line(total, m, tokens_seen, elapsed))?;
    }

    let mut metrics = BTreeMap::new();
    let mut last = DpoStats::default();
    for s in &recent {
        last.merge(s);
    }
    insert_metrics(&mut metrics, "", "", &last.mean());
    for (suffix, m) in [("_before", &eval_before), ("_after", &eval_after)] {
        if let Some(m) = m {
            insert_metrics(&mut metrics, "eval_", suffix, m);
        }
    }
    let meta = build_meta(
        base,
        parent,
        data,
        cfg,
        &policy,
        MetaInputs {
            name: &name,
            metrics,
            steps: total,
            tokens_seen,
            elapsed,
        },
    )?;

    let staged = run_dir.join("final");
    save_peft(&policy, &staged, &base.name)?;
    meta.write(&staged)?;
    let history_path = run_dir.join(METRICS_FILE);
    let history = std::fs::read(&history_path).map_err(|e| Error::io(&history_path, e))?;
    atomic_write(&staged.join(METRICS_FILE), &history)?;
    atomic_write_json(&staged.join("dpo_config.json"), cfg)?;
    let dir = registry.commit(&name, &staged, opts.force)?;
    std::fs::remove_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    Ok(DpoOutcome {
        dir,
        meta: Box::new(meta),
        eval_before,
        eval_after,
    })
}

/// The training pairs of every micro-batch of the run, in order: length-grouped batches of
/// `batch_size`, each epoch reshuffled with its own seed (`seed + epoch`), epochs wrapping around.
fn micro_batch_plan(data: &PreparedPairs, cfg: &DpoConfig, total: usize) -> Vec<Vec<usize>> {
    let lens: Vec<usize> = data.train.iter().map(PairTokens::len).collect();
    let needed = total * cfg.grad_accum;
    let mut plan = Vec::with_capacity(needed);
    let mut epoch = 0u64;
    while plan.len() < needed {
        let order =
            length_grouped_batches(&lens, cfg.batch_size, cfg.seed.wrapping_add(epoch), true);
        if order.is_empty() {
            break;
        }
        plan.extend(order.into_iter().take(needed - plan.len()));
        epoch += 1;
    }
    plan
}

type Line = serde_json::Map<String, serde_json::Value>;

/// A training line: `dpo/loss`, `reward_accuracy`, `reward_margin`, `chosen_logp`,
/// `rejected_logp` (means over the step's pairs), plus the step bookkeeping the registry's
/// readers expect (`step`, `tokens_seen`, `elapsed_s`).
fn train_line(step: usize, m: &DpoMetrics, tokens_seen: u64, elapsed_s: f64) -> Line {
    let mut line = Line::new();
    line.insert("step".into(), step.into());
    let mut values = BTreeMap::new();
    insert_metrics(&mut values, "", "", m);
    for (k, v) in values {
        line.insert(k, v.into());
    }
    line.insert("tokens_seen".into(), tokens_seen.into());
    line.insert("elapsed_s".into(), elapsed_s.into());
    line
}

/// A held-out evaluation line (the same names with an `eval_` prefix).
fn eval_line(step: usize, m: &DpoMetrics, tokens_seen: u64, elapsed_s: f64) -> Line {
    let mut line = Line::new();
    line.insert("step".into(), step.into());
    let mut values = BTreeMap::new();
    insert_metrics(&mut values, "eval_", "", m);
    for (k, v) in values {
        line.insert(k, v.into());
    }
    line.insert("tokens_seen".into(), tokens_seen.into());
    line.insert("elapsed_s".into(), elapsed_s.into());
    line
}

/// The metric names: `dpo/loss` (or `eval_dpo_loss`), `reward_accuracy`, `reward_margin`,
/// `chosen_reward`, `rejected_reward`, `chosen_logp`, `rejected_logp`, `logp_accuracy`, with
/// `prefix` and `suffix`.
fn insert_metrics(out: &mut BTreeMap<String, f64>, prefix: &str, suffix: &str, m: &DpoMetrics) {
    let loss_name = if prefix.is_empty() {
        "dpo/loss"
    } else {
        "dpo_loss"
    };
    for (k, v) in [
        (loss_name, m.loss),
        ("reward_accuracy", m.reward_accuracy),
        ("reward_margin", m.reward_margin),
        ("chosen_reward", m.chosen_reward),
        ("rejected_reward", m.rejected_reward),
        ("chosen_logp", m.chosen_logp),
        ("rejected_logp", m.rejected_logp),
        ("logp_accuracy", m.logp_accuracy),
    ] {
        out.insert(format!("{prefix}{k}{suffix}"), v);
    }
}

/// What a DPO run's sidecar records beyond the parent's: it names the parent and the DPO
/// settings; the loss weights are the parent's (those of the SFT term).
struct MetaInputs<'a> {
    name: &'a str,
    metrics: BTreeMap<String, f64>,
    steps: usize,
    tokens_seen: u64,
    elapsed: f64,
}

fn build_meta(
    base: &BaseModel,
    parent: &Parent,
    data: &PreparedPairs,
    cfg: &DpoConfig,
    policy: &LoraAdapter,
    inputs: MetaInputs<'_>,
) -> Result<AdapterMeta> {
    let loss = match &parent.meta {
        Some(m) => m.loss.clone(),
        None => LossInfo::unknown(),
    };
    let mut config = serde_json::to_value(cfg)
        .map_err(|e| Error::InvalidArgument(format!("DPO config cannot be recorded: {e}")))?;
    if let serde_json::Value::Object(map) = &mut config {
        map.insert("method".into(), "dpo".into());
        map.insert("parent".into(), parent.name.clone().into());
    }
    Ok(AdapterMeta {
        format_version: 1,
        name: inputs.name.to_string(),
        base: BaseInfo::of(base),
        loss,
        data: DataInfo {
            fingerprint: Some(data.fingerprint.clone()),
            source: data.source.clone(),
            template: data.template_name.clone(),
            train_examples: data.train.len(),
            eval_examples: data.eval.len(),
        },
        lora: policy.config.clone(),
        train_config: Some(config),
        seed: Some(cfg.seed),
        metrics: inputs.metrics,
        steps: inputs.steps,
        tokens_seen: inputs.tokens_seen,
        wall_time_s: inputs.elapsed,
        created_unix: crate::fsutil::lock::unix_now(),
        parent: Some(parent.name.clone()),
        dpo: Some(DpoInfo {
            beta: cfg.beta,
            sft_weight: cfg.sft_weight,
            pairs: data.train.len(),
            eval_pairs: data.eval.len(),
        }),
    })
}
