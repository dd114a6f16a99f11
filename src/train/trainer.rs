//! The training loop: LoRA on a frozen base under the weighted loss, with gradient accumulation
//! (one denominator over the whole accumulated batch), AdamW, clipping, schedules, periodic
//! evaluation, checkpoints, resume, and a registry entry at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::DType;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::checkpoint::{self, CheckpointState};
use super::config::TrainConfig;
use super::optim::{learning_rate, AdamW, AdamWParams, GradAccumulator};
use super::prepare::PreparedData;
use crate::data::{length_grouped_batches, Batch, LossWeights, TokenizedExample};
use crate::eval::{evaluate_losses, LossMetrics, TokenLosses};
use crate::fsutil::{atomic_write, JsonLines, LockFile};
use crate::lanes::{Lanes, Next};
use crate::lora::peft::save_peft;
use crate::lora::{LoraAdapter, LoraConfig};
use crate::loss::{denominator, weighted_nll_sum};
use crate::model::decoder::{Dropout, ForwardContext};
use crate::model::BaseModel;
use crate::registry::{AdapterMeta, BaseInfo, DataInfo, LossInfo, Registry};
use crate::tracking::{RunStatus, Tracker, TrackingOptions};
use crate::{Error, Result};

pub use crate::registry::METRICS_FILE;
pub const LOSS_PLOT_FILE: &str = "loss.svg";

/// How a run is driven (not part of the config: it does not change the result).
#[derive(Clone)]
pub struct RunOptions {
    /// Show an indicatif progress bar on stderr.
    pub progress: bool,
    /// Draw that bar in this group, below the others in it (cells trained side by side).
    pub progress_group: Option<MultiProgress>,
    /// Micro-batches of an accumulated step (`grad_accum` ≥ 2) run at once, each on its share
    /// of the threads ([`crate::lanes`]); 0 or 1: one after another. The result is the same:
    /// each micro-batch keeps its dropout draws and the gradients add in their order.
    pub lanes: usize,
    /// Set (e.g. by Ctrl-C) to checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
    pub resume: bool,
    pub force: bool,
    /// Tags for the tracking run (a sweep names itself and the cell), and the MLflow experiment
    /// to use when the config names none.
    pub tracking_tags: Vec<(String, String)>,
    pub default_experiment: Option<String>,
    /// Train only to this optimizer step (of the config's total), then evaluate and commit the
    /// adapter as it is there, keeping its checkpoint: a rung of successive halving. Resuming
    /// later (with `force`, to replace the entry) continues exactly as an unbroken run.
    pub end_at: Option<usize>,
    /// The per-token losses of the untouched adapter (B = 0, so the bare base) on this run's
    /// eval split, evaluated with its batch size: a fresh run's step-0 evaluation is computed
    /// from them instead of another forward pass (a sweep evaluates the base once for all its
    /// cells). Ignored when they do not fit the run.
    pub initial_eval: Option<Arc<TokenLosses>>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            progress: false,
            progress_group: None,
            lanes: 1,
            stop: Arc::new(AtomicBool::new(false)),
            resume: false,
            force: false,
            tracking_tags: Vec::new(),
            default_experiment: None,
            end_at: None,
            initial_eval: None,
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub enum TrainOutcome {
    /// Trained to the end and registered.
    Finished {
        dir: PathBuf,
        meta: Box<AdapterMeta>,
        /// Tokens this run trained on (fewer than `meta.tokens_seen` when it resumed).
        tokens_trained: u64,
    },
    /// Stopped on request after a checkpoint; `--resume` continues it.
    Interrupted { step: usize, checkpoint: PathBuf },
}

impl MetricsLine {
    /// The line's values as named scalars, as the trackers show them.
    fn scalars(&self) -> Vec<(String, f64)> {
        let named = [
            ("train/loss", self.loss),
            ("train/lr", self.lr),
            ("train/grad_norm", self.grad_norm),
            ("train/tokens_per_s", self.tokens_per_s),
            ("eval/response_loss", self.eval_response_loss),
            ("eval/wit_loss", self.eval_wit_loss),
            ("train/tokens_seen", Some(self.tokens_seen as f64)),
        ];
        named
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .collect()
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricsLine {
    pub step: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_response_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_wit_loss: Option<f64>,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
}

/// Number of optimizer steps a config implies for `n_train` examples.
pub fn total_steps(cfg: &TrainConfig, n_train: usize) -> usize {
    super::optim::optimizer_steps(
        cfg.max_steps,
        cfg.epochs,
        n_train,
        cfg.batch_size,
        cfg.grad_accum,
    )
}

/// The micro-batches of the whole run, as a pure function of (config, step): resuming needs no
/// saved data position.
struct DataOrder<'a> {
    examples: &'a [TokenizedExample],
    lens: Vec<usize>,
    batch_size: usize,
    seed: u64,
    epoch: Option<(usize, Vec<Vec<usize>>)>,
}

impl<'a> DataOrder<'a> {
    fn new(examples: &'a [TokenizedExample], batch_size: usize, seed: u64) -> Self {
        Self {
            lens: examples.iter().map(|e| e.len()).collect(),
            examples,
            batch_size,
            seed,
            epoch: None,
        }
    }

    fn batches_per_epoch(&self) -> usize {
        self.examples.len().div_ceil(self.batch_size)
    }

    /// Micro-batch number `global` (epochs wrap around, each reshuffled with its own seed).
    fn micro_batch(&mut self, global: usize) -> Vec<&'a TokenizedExample> {
        let per_epoch = self.batches_per_epoch();
        let (epoch, index) = (global / per_epoch, global % per_epoch);
        if self.epoch.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let order = length_grouped_batches(
                &self.lens,
                self.batch_size,
                self.seed.wrapping_add(epoch as u64),
                true,
            );
            self.epoch = Some((epoch, order));
        }
        let order = &self.epoch.as_ref().map(|(_, o)| o).expect("set above");
        order[index].iter().map(|&i| &self.examples[i]).collect()
    }
}

/// A stable hash of everything that determines the trained weights.
pub fn config_hash(cfg: &TrainConfig) -> String {
    let mut c = cfg.clone();
    // Bookkeeping fields that do not change the weights.
    c.name = None;
    c.registry = None;
    c.eval_every = 0;
    c.checkpoint_every = 0;
    c.log_every = 0;
    c.eval_generate = 0;
    c.report_to.clear();
    c.tensorboard_dir = None;
    c.mlflow_experiment = None;
    let text = serde_json::to_string(&c).unwrap_or_default();
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Dropout masks for `(step, micro-batch)` come from their own seed: reproducible on resume.
fn dropout_rng(seed: u64, step: usize, micro: usize) -> rand::rngs::StdRng {
    let mixed = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((step as u64) << 20)
        .wrapping_add(micro as u64);
    rand::rngs::StdRng::seed_from_u64(mixed)
}

/// Trains one adapter into `registry` under the config's name.
pub fn train(
    base: &BaseModel,
    data: &PreparedData,
    cfg: &TrainConfig,
    registry: &Registry,
    opts: &RunOptions,
) -> Result<TrainOutcome> {
    let mut run = Run::admit(base, data, cfg, registry, opts)?;
    for step in run.remaining_steps() {
        if let StepResult::Stopped { checkpoint } = run.step(step)? {
            return Ok(run.interrupt(checkpoint));
        }
    }
    if run.last_step < run.total {
        // Trained to `end_at` only (a rung of successive halving): evaluated and committed like
        // a finished run, with a checkpoint kept so that the run can go on from here.
        run.save_checkpoint()?;
        return run.finish(true);
    }
    run.finish(false)
}

/// What [`Run::step`] asks of its caller.
enum StepResult {
    /// Go on with the next step (or [`Run::finish`] after the last one).
    Continue,
    /// A stop was requested and a checkpoint saved: end with [`Run::interrupt`].
    Stopped { checkpoint: PathBuf },
}

/// One training run, from [`Run::admit`] through the [`Run::step`]s to [`Run::finish`] (or
/// [`Run::interrupt`]).
///
/// Fields drop in declaration order, and an early `?` return relies on it: the metrics log's
/// tracker (which marks the run FAILED) goes before the progress bar, and the run lock last.
struct Run<'a> {
    log: MetricsLog,
    bar: ProgressBar,
    order: DataOrder<'a>,
    optimizer: AdamW,
    adapter: LoraAdapter,
    lora: LoraConfig,
    base: &'a BaseModel,
    data: &'a PreparedData,
    cfg: &'a TrainConfig,
    registry: &'a Registry,
    opts: &'a RunOptions,
    name: String,
    run_dir: PathBuf,
    /// [`config_hash`] of `cfg`, which a checkpoint must match to be resumed.
    hash: String,
    pad: u32,
    total: usize,
    warmup: usize,
    /// Optimizer steps done so far, counting those before a resume.
    last_step: usize,
    tokens_seen: u64,
    /// `tokens_seen` when this run started (non-zero when it resumed).
    tokens_at_start: u64,
    /// Training time of the run before it was resumed (0 for a fresh run).
    elapsed_before: f64,
    started: Instant,
    /// Exponentially smoothed train loss, for the progress bar only.
    smoothed: Option<f64>,
    /// Where a step's micro-batches run.
    lanes: Lanes,
    _lock: LockFile,
}

impl<'a> Run<'a> {
    /// Checks the config and the name, takes the run lock, restores the checkpoint on
    /// `--resume` (or clears the run folder), opens the tracker and the metrics log, and logs
    /// the step-0 evaluation of a fresh run.
    fn admit(
        base: &'a BaseModel,
        data: &'a PreparedData,
        cfg: &'a TrainConfig,
        registry: &'a Registry,
        opts: &'a RunOptions,
    ) -> Result<Self> {
        cfg.validate()?;
        let name = cfg.name.clone().unwrap_or_else(|| cfg.default_name());
        crate::registry::validate_name(&name)?;
        if registry.contains(&name) && !opts.force {
            return Err(Error::AdapterExists {
                name: name.to_string(),
                registry: registry.root().to_path_buf(),
            });
        }
        let run_dir = registry.run_dir(&name);
        let lock = lock_run(&run_dir, &name, "training")?;
        let existing = checkpoint::latest(&run_dir)?;
        if existing.is_some() && !opts.resume && !opts.force {
            return Err(Error::InvalidArgument(format!(
                "an interrupted run of `{name}` has a checkpoint in {}: use --resume to continue it or --force to start over",
                run_dir.display()
            )));
        }
        if !opts.resume {
            clear_run_dir(&run_dir)?;
        }

        let decoder = &base.decoder;
        let device = decoder.device();
        let lora = cfg.lora_config()?;
        let adapter = LoraAdapter::init(&lora, &decoder.config, cfg.seed, DType::F32, device)?;
        let params = AdamWParams {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
        };
        let mut optimizer = AdamW::new(adapter.named_vars(), params)?;
        let hash = config_hash(cfg);

        let mut start_step = 0;
        let mut tokens_seen = 0u64;
        let mut elapsed_before = 0.0;
        if opts.resume {
            match &existing {
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "--resume: no checkpoint of `{name}` in {}",
                        run_dir.display()
                    )))
                }
                Some(dir) => {
                    let state = checkpoint::restore(dir, &adapter, &mut optimizer)?;
                    if state.config_hash != hash || state.data_fingerprint != data.fingerprint {
                        return Err(Error::InvalidArgument(format!(
                            "--resume: the checkpoint in {} was made with another config or data; resume with the same settings or use --force",
                            dir.display()
                        )));
                    }
                    start_step = state.step;
                    tokens_seen = state.tokens_seen;
                    elapsed_before = state.elapsed_s;
                }
            }
        }
        truncate_metrics(&run_dir, start_step)?;

        let total = total_steps(cfg, data.train.len());
        let warmup = cfg
            .warmup_steps
            .unwrap_or_else(|| (cfg.warmup_ratio * total as f64).ceil() as usize);
        let order = DataOrder::new(&data.train, cfg.batch_size, cfg.seed);
        let pad = base.pad_id();
        let mut bar = progress_bar(opts.progress, total, start_step, &name, STEP_BAR);
        if let (true, Some(group)) = (opts.progress, &opts.progress_group) {
            bar = group.add(bar);
        }
        let started = Instant::now();
        let tracker = open_tracker(cfg, opts, &name, &run_dir, base, data)?;
        let log = MetricsLog::open(&run_dir, tracker)?;
        let mut run = Run {
            log,
            bar,
            order,
            optimizer,
            adapter,
            lora,
            base,
            data,
            cfg,
            registry,
            opts,
            name,
            run_dir,
            hash,
            pad,
            total,
            warmup,
            last_step: start_step,
            tokens_seen,
            tokens_at_start: tokens_seen,
            elapsed_before,
            started,
            smoothed: None,
            lanes: Lanes::new(opts.lanes.min(cfg.grad_accum))?,
            _lock: lock,
        };

        if start_step == 0 {
            if let Some(m) = run.initial_eval()? {
                run.log
                    .write(&eval_line(0, &m, run.tokens_seen, run.elapsed_before))?;
                run.bar.println(format!(
                    "[{}] step 0: eval response loss {:.4}, WIT loss {:.4}",
                    run.name, m.response_loss, m.wit_loss
                ));
            }
        }
        Ok(run)
    }

    /// The steps still to run (all of them for a fresh run, those after the checkpoint for a
    /// resumed one).
    fn remaining_steps(&self) -> std::ops::Range<usize> {
        let end = self.opts.end_at.map_or(self.total, |e| e.min(self.total));
        self.last_step..end.max(self.last_step)
    }

    /// Training time so far, including the time before a resume.
    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// The loss weights of optimizer step `step` (0-based): a pure function of the step, so a
    /// resumed run weighs every step as an uninterrupted one does.
    fn weights_at(&self, step: usize) -> LossWeights {
        let (prompt, response) = self.cfg.loss_weights_at(step, self.total);
        LossWeights {
            prompt,
            response,
            system: self.cfg.system_weight,
            user: self.cfg.user_weight,
        }
    }

    /// Held-out loss metrics at the adapter's current values (same data every time; the WIT
    /// loss under the weights of the step just done, or of the first step before training).
    /// The step-0 evaluation: from [`RunOptions::initial_eval`] when it fits this run (same
    /// split size and batch size, the weights' tokens scored, the adapter still the identity),
    /// else a forward pass. Both give the same numbers.
    fn initial_eval(&self) -> Result<Option<LossMetrics>> {
        let weights = self.weights_at(0);
        if let Some(cached) = &self.opts.initial_eval {
            let fits = !self.data.eval.is_empty()
                && cached.examples == self.data.eval.len()
                && cached.batch_size == self.cfg.batch_size
                && cached.covers(&weights)
                && self.adapter.is_identity()?;
            if fits {
                return Ok(Some(cached.metrics(&weights, self.cfg.normalization)));
            }
        }
        self.eval_now()
    }

    fn eval_now(&self) -> Result<Option<LossMetrics>> {
        evaluate_losses(
            self.base,
            Some(&self.adapter),
            &self.data.eval,
            &self.weights_at(self.last_step.saturating_sub(1)),
            self.cfg.normalization,
            self.cfg.batch_size,
        )
    }

    /// Optimizer step number `step` (0-based) over its `grad_accum` micro-batches, then its
    /// metrics line, periodic evaluation and checkpoint; a requested stop checkpoints and
    /// returns [`StepResult::Stopped`].
    fn step(&mut self, step: usize) -> Result<StepResult> {
        let cfg = self.cfg;
        let step_start = Instant::now();
        // Every micro-batch of the step shares its weights, so the denominator below counts the
        // tokens whose weight at this step is non-zero over the whole accumulated batch.
        let weights = self.weights_at(step);
        let micro: Vec<Batch> = (0..cfg.grad_accum)
            .map(|k| {
                Batch::new(
                    &self.order.micro_batch(step * cfg.grad_accum + k),
                    &weights,
                    self.pad,
                )
            })
            .collect();
        let denom: f64 = micro
            .iter()
            .map(|b| denominator(b, cfg.normalization))
            .sum();
        if denom <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "step {}: no token has a non-zero loss weight in this batch",
                step + 1
            )));
        }
        let mut grads = GradAccumulator::new(self.optimizer.vars());
        let mut loss_value = 0f64;
        let mut step_tokens = 0u64;
        let (base, adapter, p) = (self.base, &self.adapter, self.lora.lora_dropout);
        let micro_step = |k: usize, batch: &Batch| -> Result<(f64, GradStore, u64)> {
            let mut dropout = Dropout {
                p,
                rng: dropout_rng(cfg.seed, step, k),
            };
            let mut ctx = ForwardContext {
                adapter: Some(adapter),
                dropout: Some(&mut dropout),
                ..Default::default()
            };
            let (sum, _) = weighted_nll_sum(&base.decoder, batch, &mut ctx)?;
            let loss = (sum / denom)?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let tokens = batch.seq_lens.iter().sum::<usize>() as u64;
            Ok((value, loss.backward()?, tokens))
        };
        // Summed in micro-batch order whatever order the lanes finish in, so that the sums
        // are those of one lane; a finished micro-batch waits only for the ones before it.
        let mut waiting = BTreeMap::new();
        let mut next = 0;
        self.lanes.run(&micro, micro_step, |k, part| {
            waiting.insert(k, part);
            while let Some((value, micro_grads, tokens)) = waiting.remove(&next) {
                loss_value += value;
                grads.add(&micro_grads)?;
                step_tokens += tokens;
                next += 1;
            }
            Ok(Next::Continue)
        })?;
        if !loss_value.is_finite() {
            return Err(Error::NonFiniteLoss {
                step: step + 1,
                value: loss_value as f32,
            });
        }
        let (grads, grad_norm) = grads.clipped(cfg.max_grad_norm, step + 1)?;
        let lr = learning_rate(cfg.schedule, cfg.lr, step, self.warmup, self.total);
        self.optimizer.step(&grads, lr)?;
        self.tokens_seen += step_tokens;
        self.last_step = step + 1;
        let (last_step, total, tokens_seen) = (self.last_step, self.total, self.tokens_seen);

        let step_secs = step_start.elapsed().as_secs_f64();
        let tok_s = step_tokens as f64 / step_secs.max(1e-9);
        self.smoothed = Some(match self.smoothed {
            None => loss_value,
            Some(s) => 0.9 * s + 0.1 * loss_value,
        });
        let elapsed = self.elapsed();
        self.bar.set_position(last_step as u64);
        self.bar.set_message(format!(
            "loss {:.4} lr {lr:.2e} {tok_s:.0} tok/s",
            self.smoothed.unwrap_or(loss_value)
        ));
        if cfg.log_every > 0 && (last_step % cfg.log_every == 0 || last_step == total) {
            self.log.write(&MetricsLine {
                step: last_step,
                loss: Some(loss_value),
                lr: Some(lr),
                grad_norm: Some(grad_norm),
                tokens_per_s: Some(tok_s),
                eval_response_loss: None,
                eval_wit_loss: None,
                tokens_seen,
                elapsed_s: elapsed,
            })?;
        }
        if cfg.eval_every > 0 && last_step % cfg.eval_every == 0 && last_step < total {
            if let Some(m) = self.eval_now()? {
                self.log
                    .write(&eval_line(last_step, &m, tokens_seen, elapsed))?;
                self.bar.println(format!(
                    "[{}] step {last_step}: eval response loss {:.4}, WIT loss {:.4}",
                    self.name, m.response_loss, m.wit_loss
                ));
            }
        }
        let stop = self.opts.stop.load(Ordering::SeqCst);
        let periodic = cfg.checkpoint_every > 0 && last_step % cfg.checkpoint_every == 0;
        if (periodic || stop) && last_step < total {
            let dir = self.save_checkpoint()?;
            if stop {
                return Ok(StepResult::Stopped { checkpoint: dir });
            }
        }
        Ok(StepResult::Continue)
    }

    /// A checkpoint of the run as it is now.
    fn save_checkpoint(&self) -> Result<PathBuf> {
        let state = CheckpointState {
            step: self.last_step,
            tokens_seen: self.tokens_seen,
            elapsed_s: self.elapsed(),
            config_hash: self.hash.clone(),
            data_fingerprint: self.data.fingerprint.clone(),
        };
        checkpoint::save(&self.run_dir, &self.adapter, &self.optimizer, &state)
    }

    /// Ends a run stopped on request: the tracker run is marked KILLED and the progress bar
    /// left showing where it stopped; `--resume` continues from `checkpoint`.
    fn interrupt(self, checkpoint: PathBuf) -> TrainOutcome {
        self.log.close().finish(RunStatus::Killed);
        self.bar.abandon_with_message(format!(
            "interrupted at step {}; checkpoint saved",
            self.last_step
        ));
        TrainOutcome::Interrupted {
            step: self.last_step,
            checkpoint,
        }
    }

    /// The final evaluation and generation scores, then the adapter staged with its sidecar and
    /// history, committed to the registry, and the run folder removed (kept with its checkpoint
    /// when `keep_run`: the run goes on later).
    fn finish(mut self, keep_run: bool) -> Result<TrainOutcome> {
        self.bar.finish_and_clear();

        let elapsed = self.elapsed();
        let mut metrics = BTreeMap::new();
        if let Some(m) = self.eval_now()? {
            self.log
                .write(&eval_line(self.last_step, &m, self.tokens_seen, elapsed))?;
            m.insert_into(&mut metrics);
        }
        if self.cfg.eval_generate > 0 {
            let scores = crate::eval::generation_scores(
                self.base,
                Some(&self.adapter),
                &self.data.template,
                &self.data.eval_examples,
                self.cfg.eval_generate,
            )?;
            metrics.extend(scores);
        }
        let final_scalars: Vec<(String, f64)> = metrics
            .iter()
            .map(|(k, v)| (format!("final/{k}"), *v))
            .collect();
        self.log.track(self.last_step, &final_scalars);

        let meta = self.adapter_meta(metrics, elapsed)?;
        let staged = self.stage_adapter(&meta)?;
        let dir = self.registry.commit(&self.name, &staged, self.opts.force)?;
        if !keep_run {
            std::fs::remove_dir_all(&self.run_dir).map_err(|e| Error::io(&self.run_dir, e))?;
        }
        let mut tracker = self.log.close();
        tracker.log_artifacts(&dir);
        tracker.finish(RunStatus::Finished);
        Ok(TrainOutcome::Finished {
            dir,
            meta: Box::new(meta),
            tokens_trained: self.tokens_seen - self.tokens_at_start,
        })
    }

    /// The registry sidecar of the trained adapter: base, loss settings, data, LoRA config,
    /// the full training config, and the final `metrics`.
    fn adapter_meta(&self, metrics: BTreeMap<String, f64>, elapsed: f64) -> Result<AdapterMeta> {
        let (base, data, cfg) = (self.base, self.data, self.cfg);
        // With a schedule, the weights the training ended with (the schedules are recorded too).
        let (lp, lr_w) = cfg.loss_weights_at(self.total.saturating_sub(1), self.total);
        let recorded = |s: &super::WeightSchedule| (!s.is_constant()).then(|| s.to_string());
        Ok(AdapterMeta {
            format_version: 1,
            name: self.name.clone(),
            base: BaseInfo::of(base),
            loss: LossInfo {
                prompt_weight: lp,
                response_weight: lr_w,
                system_weight: cfg.system_weight,
                user_weight: cfg.user_weight,
                normalization: cfg.normalization,
                prompt_weight_schedule: recorded(&cfg.prompt_weight_schedule),
                response_weight_schedule: recorded(&cfg.response_weight_schedule),
            },
            data: DataInfo {
                fingerprint: Some(data.fingerprint.clone()),
                source: data.source.clone(),
                template: data.template_name.clone(),
                train_examples: data.train.len(),
                eval_examples: data.eval.len(),
            },
            lora: self.lora.clone(),
            train_config: Some(serde_json::to_value(cfg).map_err(|e| {
                Error::InvalidArgument(format!("training config cannot be recorded: {e}"))
            })?),
            seed: Some(cfg.seed),
            metrics,
            steps: self.last_step,
            tokens_seen: self.tokens_seen,
            wall_time_s: elapsed,
            created_unix: unix_now(),
            parent: None,
            dpo: None,
        })
    }

    /// Writes the adapter as it will be committed into `<run dir>/final` (replacing any
    /// leftover): PEFT files, the sidecar, the metrics history and its loss plot, the training
    /// config, and the run's TensorBoard events. Returns that folder.
    fn stage_adapter(&self, meta: &AdapterMeta) -> Result<PathBuf> {
        let run_dir = &self.run_dir;
        let staged = run_dir.join("final");
        if staged.exists() {
            std::fs::remove_dir_all(&staged).map_err(|e| Error::io(&staged, e))?;
        }
        save_peft(&self.adapter, &staged, &self.base.name)?;
        meta.write(&staged)?;
        let metrics_src = run_dir.join(METRICS_FILE);
        let history = std::fs::read(&metrics_src).map_err(|e| Error::io(&metrics_src, e))?;
        atomic_write(&staged.join(METRICS_FILE), &history)?;
        atomic_write(
            &staged.join(LOSS_PLOT_FILE),
            loss_plot(&self.name, &history).as_bytes(),
        )?;
        let toml_text =
            toml::to_string(self.cfg).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        atomic_write(&staged.join("train_config.toml"), toml_text.as_bytes())?;
        // Event files written during the run travel with the adapter (its `tb/`).
        let run_tb = run_dir.join(TENSORBOARD_SUBDIR);
        if run_tb.is_dir() {
            let to = staged.join(TENSORBOARD_SUBDIR);
            std::fs::rename(&run_tb, &to).map_err(|e| Error::io(&to, e))?;
        }
        Ok(staged)
    }
}

fn eval_line(step: usize, m: &LossMetrics, tokens_seen: u64, elapsed_s: f64) -> MetricsLine {
    MetricsLine {
        step,
        loss: None,
        lr: None,
        grad_norm: None,
        tokens_per_s: None,
        eval_response_loss: Some(m.response_loss),
        eval_wit_loss: Some(m.wit_loss),
        tokens_seen,
        elapsed_s,
    }
}

/// The progress bar of a run of optimizer steps (training, DPO).
pub(crate) const STEP_BAR: &str =
    "{prefix} step {pos}/{len} [{bar:28}] {msg} | {elapsed_precise} ETA {eta_precise}";

/// A progress bar drawn with `template` (hidden unless `show`), starting at `start` of `total`.
pub(crate) fn progress_bar(
    show: bool,
    total: usize,
    start: usize,
    prefix: &str,
    template: &str,
) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(prefix.to_string());
    bar.set_position(start as u64);
    bar
}

/// Only one process may drive a given run, on any host sharing the registry: the run's lock
/// file is created exclusively (see [`crate::fsutil::lock`]). `what` names the work
/// ("training", "DPO training").
pub(crate) fn lock_run(run_dir: &Path, name: &str, what: &str) -> Result<LockFile> {
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    // Appended, not `with_extension`: that would replace the `.8` of `wit-p0.2-r0.8` and give
    // `wit-p0.2-r0.6` the same lock.
    let mut path = run_dir.as_os_str().to_owned();
    path.push(".lock");
    let path = PathBuf::from(path);
    match LockFile::try_acquire(&path, &format!("{what} {name}"))? {
        Ok(lock) => Ok(lock),
        Err(owner) => Err(Error::Locked {
            path,
            owner: format!("{owner}: another process is training `{name}` right now"),
        }),
    }
}

fn clear_run_dir(run_dir: &Path) -> Result<()> {
    if run_dir.exists() {
        std::fs::remove_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    }
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))
}

/// Keeps only metric lines up to the checkpoint a run resumes from (later ones will be redone).
fn truncate_metrics(run_dir: &Path, step: usize) -> Result<()> {
    let path = run_dir.join(METRICS_FILE);
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<MetricsLine>(l)
                .map(|m| m.step <= step && !(m.step == step && step == 0 && m.loss.is_some()))
                .unwrap_or(false)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    atomic_write(&path, kept.as_bytes())
}

/// Appends one JSON line per record to `metrics.jsonl`, and mirrors the same values at the
/// same steps to the tracker (TensorBoard, MLflow) when the config asks for one.
struct MetricsLog {
    lines: JsonLines,
    tracker: Tracker,
}

impl MetricsLog {
    fn open(run_dir: &Path, tracker: Tracker) -> Result<Self> {
        Ok(Self {
            lines: JsonLines::open_append(&run_dir.join(METRICS_FILE))?,
            tracker,
        })
    }

    fn write(&mut self, line: &MetricsLine) -> Result<()> {
        self.lines.append(line)?;
        self.track(line.step, &line.scalars());
        Ok(())
    }

    /// Sends scalars to the tracker only (values kept elsewhere, e.g. the sidecar's final
    /// metrics).
    fn track(&mut self, step: usize, values: &[(String, f64)]) {
        let values: Vec<(&str, f64)> = values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        self.tracker
            .log_scalars(step as u64, unix_seconds(), &values);
    }

    fn close(self) -> Tracker {
        self.tracker
    }
}

/// The run's TensorBoard folder inside its staging folder (and, once committed, the adapter's).
pub const TENSORBOARD_SUBDIR: &str = "tb";

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The tracker a config asks for: TensorBoard event files in the run's staging folder (moved
/// into the adapter with it) or under `tensorboard_dir/<name>`, and an MLflow run named after the
/// adapter, with every training setting and the data and base fingerprints as params.
fn open_tracker(
    cfg: &TrainConfig,
    opts: &RunOptions,
    name: &str,
    run_dir: &Path,
    base: &BaseModel,
    data: &PreparedData,
) -> Result<Tracker> {
    if cfg.report_to.is_empty() {
        return Ok(Tracker::disabled());
    }
    let tracking = TrackingOptions {
        report_to: cfg.report_to.clone(),
        tensorboard_dir: match &cfg.tensorboard_dir {
            Some(dir) => dir.join(name),
            None => run_dir.join(TENSORBOARD_SUBDIR),
        },
        mlflow_tracking_uri: None,
        mlflow_experiment: cfg
            .mlflow_experiment
            .clone()
            .or_else(|| opts.default_experiment.clone())
            .unwrap_or_else(|| "peft-wit".into()),
        run_name: name.to_string(),
        tags: opts.tracking_tags.clone(),
    };
    let mut tracker = Tracker::open(&tracking)?;
    let (lp, lr) = cfg.loss_weights();
    let mut params: Vec<(String, String)> = vec![
        ("prompt_weight".into(), lp.to_string()),
        ("response_weight".into(), lr.to_string()),
        ("base_model".into(), base.name.clone()),
        ("base_fingerprint".into(), base.fingerprint.clone()),
        ("data_source".into(), data.source.clone()),
        ("data_fingerprint".into(), data.fingerprint.clone()),
    ];
    // Every other training setting, as the sidecar records it.
    if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(cfg) {
        for (key, value) in map {
            let skip = [
                "name",
                "registry",
                "report_to",
                "prompt_weight",
                "response_weight",
            ];
            if value.is_null() || skip.contains(&key.as_str()) {
                continue;
            }
            let text = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            params.push((key, text));
        }
    }
    tracker.log_params(&params);
    Ok(tracker)
}

/// The loss curve (train loss per step, eval response loss) as an SVG.
pub fn loss_plot(name: &str, metrics_jsonl: &[u8]) -> String {
    let text = String::from_utf8_lossy(metrics_jsonl);
    let lines: Vec<MetricsLine> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let train: Vec<(f64, f64)> = lines
        .iter()
        .filter_map(|m| Some((m.step as f64, m.loss?)))
        .collect();
    let eval: Vec<(f64, f64)> = lines
        .iter()
        .filter_map(|m| Some((m.step as f64, m.eval_response_loss?)))
        .collect();
    crate::plot::line_chart(
        &format!("{name}: loss"),
        "step",
        "loss",
        &[
            ("train WIT loss".to_string(), train),
            ("eval response loss".to_string(), eval),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_whose_names_differ_after_the_last_dot_have_their_own_locks() {
        let tmp = tempfile::tempdir().unwrap();
        let runs = tmp.path().join(".runs");
        let a = lock_run(&runs.join("wit-p0.2-r0.8"), "wit-p0.2-r0.8", "training").unwrap();
        let b = lock_run(&runs.join("wit-p0.2-r0.6"), "wit-p0.2-r0.6", "training").unwrap();
        assert!(runs.join("wit-p0.2-r0.8.lock").is_file());
        assert!(runs.join("wit-p0.2-r0.6.lock").is_file());
        // The same run twice is still refused.
        let err = lock_run(&runs.join("wit-p0.2-r0.8"), "wit-p0.2-r0.8", "training")
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("another process is training"),
            "{err}"
        );
        drop((a, b));
    }
}
