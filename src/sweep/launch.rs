//! Handing a planned sweep's cells to the scheduler the user already has: a Slurm job array
//! (`sbatch`), a Kubernetes Indexed Job manifest, or one command line per cell. The schedulers
//! do the scheduling; every cell is `peft-wit sweep run-cell --sweep <name> --index I`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::halving::Ladder;
use super::plan::{plan_dir, SweepPlan};
use crate::fsutil::{atomic_write, atomic_write_json, read_json};
use crate::registry::Registry;
use crate::{Error, Result};

/// How a sweep's cells run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Launcher {
    /// One after another in this process (the base loaded once).
    Local,
    /// A Slurm job array submitted with sbatch.
    Slurm,
    /// A Kubernetes Indexed Job manifest for `kubectl apply -f`.
    K8s,
    /// One command line per cell, for any other runner.
    Print,
}

impl std::str::FromStr for Launcher {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        crate::config_value::parse_enum("launcher", s)
    }
}

const JOBS_FILE: &str = "jobs.json";
pub const SBATCH_FILE: &str = "sweep.sbatch";
pub const K8S_FILE: &str = "job.yaml";

/// A submission recorded in `<plan>/jobs.json`, so `status` can ask the scheduler about it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Submission {
    pub launcher: Launcher,
    /// Slurm job id, or the Kubernetes Job's name.
    pub job: String,
    /// Cell indices, or a halving wave's slots.
    pub indices: Vec<usize>,
    /// The halving rung (0-based) of a wave.
    #[serde(default)]
    pub rung: Option<usize>,
    pub submitted_unix: u64,
}

/// Looks a program up on `PATH`.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// `0-3,5,7-8`: Slurm's `--array` list for sorted indices.
pub fn array_spec(indices: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let start = indices[i];
        let mut end = start;
        while i + 1 < indices.len() && indices[i + 1] == end + 1 {
            i += 1;
            end = indices[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

fn quote(s: &str) -> String {
    shlex::try_quote(s)
        .map(|q| q.into_owned())
        .unwrap_or_else(|_| format!("'{}'", s.replace('\'', "'\\''")))
}

/// An option as sbatch reads it from a `#SBATCH` line: as is when plain, else in double quotes
/// (sbatch's own quoting there).
fn sbatch_quote(opt: &str) -> String {
    let plain = opt
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_=:,./%@+".contains(c));
    if plain {
        opt.to_string()
    } else {
        format!("\"{}\"", opt.replace('"', "\\\""))
    }
}

/// A batch of `run-cell` tasks handed to a scheduler at once: cells of a grid sweep, or one
/// wave (rung) of a halving sweep, whose task ids are slots resolved to cells when they start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSet {
    /// The halving rung (0-based) of a wave; `None` for a grid sweep's cells.
    pub rung: Option<usize>,
    /// Cell indices (grid) or slots (wave), sorted.
    pub ids: Vec<usize>,
}

impl TaskSet {
    /// `run-cell`'s arguments for task `id` (a number, or a shell expression such as
    /// `"$SLURM_ARRAY_TASK_ID"`, inserted as is).
    fn target_args(&self, id: &str) -> String {
        match self.rung {
            None => format!("--index {id}"),
            Some(k) => format!("--rung {} --slot {id}", k + 1),
        }
    }

    /// The per-task log file name, `%a` standing for the task id. A first-rung slot is its
    /// cell's index, so it logs where a grid cell does.
    fn log_name(&self) -> String {
        match self.rung {
            None | Some(0) => "cell-%a.log".to_string(),
            Some(k) => format!("rung-{}-slot-%a.log", k + 1),
        }
    }

    fn describe(&self) -> String {
        match self.rung {
            None => format!("cells {}", array_spec(&self.ids)),
            Some(k) => format!("rung {} slots {}", k + 1, array_spec(&self.ids)),
        }
    }
}

/// What is left to hand to a scheduler: the grid's cells that are not done (all with `force`),
/// or a halving sweep's waves from its first incomplete rung on (that rung's unscored slots,
/// then every later rung in full, each wave to run after the one before).
pub fn pending_tasks(registry: &Registry, plan: &SweepPlan, force: bool) -> Result<Vec<TaskSet>> {
    let Some(ladder) = Ladder::of(plan) else {
        let ids: Vec<usize> = super::cell_statuses(registry, plan)?
            .iter()
            .filter(|s| force || !s.state.is_done())
            .map(|s| s.cell.index)
            .collect();
        return Ok(if ids.is_empty() {
            Vec::new()
        } else {
            vec![TaskSet { rung: None, ids }]
        });
    };
    let state = super::halving::load_state(registry, plan, &ladder)?;
    let Some(first) = (0..ladder.ends.len()).find(|&k| !state.is_complete(k, plan)) else {
        return Ok(Vec::new());
    };
    let entrants = state.entrants(first, plan).unwrap_or_default();
    let first_slots: Vec<usize> = entrants
        .iter()
        .enumerate()
        .filter(|(_, i)| !state.rungs[first].scores.contains_key(i))
        .map(|(slot, _)| slot)
        .collect();
    let mut sets = vec![TaskSet {
        rung: Some(first),
        ids: first_slots,
    }];
    for k in first + 1..ladder.ends.len() {
        sets.push(TaskSet {
            rung: Some(k),
            ids: (0..ladder.sizes[k]).collect(),
        });
    }
    Ok(sets)
}

/// The command that runs one task of `set`.
fn run_cell_command(
    exe: &Path,
    registry_root: &Path,
    sweep: &str,
    set: &TaskSet,
    id: &str,
) -> String {
    format!(
        "{} sweep run-cell --registry {} --sweep {} {}",
        quote(&exe.display().to_string()),
        quote(&registry_root.display().to_string()),
        quote(sweep),
        set.target_args(id)
    )
}

/// One command line per task, wave by wave: a halving sweep's waves are headed by a comment
/// saying each runs once the one before is complete.
pub fn cell_commands(
    exe: &Path,
    registry: &Registry,
    plan: &SweepPlan,
    sets: &[TaskSet],
) -> Vec<String> {
    let root = absolute(registry.root());
    let mut lines = Vec::new();
    for (n, set) in sets.iter().enumerate() {
        if let Some(k) = set.rung {
            lines.push(if n == 0 {
                format!("# rung {}", k + 1)
            } else {
                format!("# rung {}: once every command above has finished", k + 1)
            });
        }
        for id in &set.ids {
            lines.push(run_cell_command(
                exe,
                &root,
                &plan.name,
                set,
                &id.to_string(),
            ));
        }
    }
    lines
}

/// Slurm settings from the command line.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    /// At most this many array tasks at once (`%K`).
    pub max_parallel: Option<usize>,
    /// Extra sbatch options (`--partition=gpu --gres=gpu:1 --time=2:00:00`), already split.
    pub sbatch_options: Vec<String>,
}

/// The sbatch script for the tasks of `set`: an array job whose task `I` runs cell `I` (or, in a
/// halving wave, slot `I`), requeued on preemption (the cell then resumes from its checkpoint),
/// each task logging to `<plan>/logs/` (appended, so a requeued task's log keeps its first life).
pub fn sbatch_script(
    exe: &Path,
    registry: &Registry,
    plan: &SweepPlan,
    set: &TaskSet,
    opts: &SlurmOptions,
) -> String {
    let root = absolute(registry.root());
    let logs = absolute(&plan_dir(registry, &plan.name)).join("logs");
    let mut array = array_spec(&set.ids);
    if let Some(k) = opts.max_parallel {
        array.push_str(&format!("%{k}"));
    }
    let mut s = String::new();
    s.push_str("#!/bin/bash\n");
    s.push_str(&format!(
        "# Written by peft-wit {} for sweep `{}` ({} cells, {} steps each): {}. `peft-wit sweep ... --launcher slurm`\n# run again submits the tasks that are not done; `peft-wit sweep status {}` shows them.\n",
        env!("CARGO_PKG_VERSION"),
        plan.name,
        plan.cells.len(),
        plan.total_steps,
        set.describe(),
        plan.name
    ));
    let job_name = match set.rung {
        None => format!("peft-wit-{}", plan.name),
        Some(k) => format!("peft-wit-{}-rung{}", plan.name, k + 1),
    };
    s.push_str(&format!("#SBATCH --job-name={}\n", quote(&job_name)));
    s.push_str(&format!("#SBATCH --array={array}\n"));
    s.push_str("#SBATCH --requeue\n#SBATCH --open-mode=append\n");
    s.push_str(&format!(
        "#SBATCH --output={}\n",
        quote(&logs.join(set.log_name()).display().to_string())
    ));
    for opt in &opts.sbatch_options {
        s.push_str(&format!("#SBATCH {}\n", sbatch_quote(opt)));
    }
    s.push_str("set -eu\n");
    let task = match set.rung {
        None | Some(0) => "cell".to_string(),
        Some(k) => format!("rung {} slot", k + 1),
    };
    s.push_str(&format!(
        "echo \"peft-wit {task} $SLURM_ARRAY_TASK_ID: job $SLURM_JOB_ID on $(hostname), restart ${{SLURM_RESTART_COUNT:-0}}\"\n",
    ));
    // exec: the scheduler's SIGTERM reaches peft-wit itself, which checkpoints and exits.
    s.push_str(&format!(
        "exec {}\n",
        run_cell_command(exe, &root, &plan.name, set, "\"$SLURM_ARRAY_TASK_ID\"")
    ));
    s
}

/// Checks that `sbatch` can be run, before anything is written.
pub fn check_sbatch() -> Result<PathBuf> {
    find_on_path("sbatch").ok_or_else(|| {
        Error::InvalidArgument(
            "`sbatch` is not on PATH: --launcher slurm needs Slurm's client tools on this host (or use --launcher print and run the commands yourself)".into(),
        )
    })
}

/// Writes one sbatch script per task set into the plan folder and submits them, each wave
/// after the one before (`--dependency=afterany:`: a wave whose previous rung has a failed cell
/// stops at once, saying which); returns the job ids.
pub fn submit_slurm(
    exe: &Path,
    registry: &Registry,
    plan: &SweepPlan,
    sets: &[TaskSet],
    opts: &SlurmOptions,
) -> Result<Vec<String>> {
    let sbatch = check_sbatch()?;
    let mut jobs: Vec<String> = Vec::new();
    for set in sets {
        let file = match set.rung {
            None => SBATCH_FILE.to_string(),
            Some(k) => format!("sweep-rung-{}.sbatch", k + 1),
        };
        let script = plan_dir(registry, &plan.name).join(file);
        atomic_write(
            &script,
            sbatch_script(exe, registry, plan, set, opts).as_bytes(),
        )?;
        let mut command = Command::new(&sbatch);
        command.arg("--parsable");
        if let Some(previous) = jobs.last() {
            command.arg(format!("--dependency=afterany:{previous}"));
        }
        let output = command
            .arg(&script)
            .output()
            .map_err(|e| Error::io(&sbatch, e))?;
        if !output.status.success() {
            return Err(Error::InvalidArgument(format!(
                "sbatch {} failed ({}): {}",
                script.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        // `--parsable` prints `jobid` or `jobid;cluster`.
        let job = stdout.trim().split(';').next().unwrap_or("").to_string();
        if job.is_empty() || !job.chars().all(|c| c.is_ascii_digit()) {
            return Err(Error::InvalidArgument(format!(
                "sbatch printed no job id: {stdout:?}"
            )));
        }
        record_submission(registry, plan, Launcher::Slurm, &job, set)?;
        jobs.push(job);
    }
    Ok(jobs)
}

fn record_submission(
    registry: &Registry,
    plan: &SweepPlan,
    launcher: Launcher,
    job: &str,
    set: &TaskSet,
) -> Result<()> {
    let path = plan_dir(registry, &plan.name).join(JOBS_FILE);
    let mut jobs = submissions(registry, plan);
    jobs.push(Submission {
        launcher,
        job: job.to_string(),
        indices: set.ids.clone(),
        rung: set.rung,
        submitted_unix: crate::fsutil::lock::unix_now(),
    });
    atomic_write_json(&path, &jobs)
}

/// The recorded submissions of a sweep (oldest first).
pub fn submissions(registry: &Registry, plan: &SweepPlan) -> Vec<Submission> {
    let path = plan_dir(registry, &plan.name).join(JOBS_FILE);
    read_json(&path).unwrap_or_default()
}

/// Kubernetes settings from the command line.
#[derive(Debug, Clone, Default)]
pub struct K8sOptions {
    pub image: String,
    /// The PersistentVolumeClaim holding the registry and the model cache.
    pub pvc: String,
    /// Where the claim is mounted in the pod.
    pub mount_path: String,
    /// The registry's path inside the pod (default: its path here, which then must lie under
    /// `mount_path`).
    pub registry_path: Option<String>,
    pub namespace: Option<String>,
    pub max_parallel: Option<usize>,
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub gpus: Option<u32>,
    /// The peft-wit program inside the image.
    pub program: String,
}

/// A Kubernetes object name (DNS-1123 label) for the sweep's Job (one per wave of a halving
/// sweep: `rung` 0-based).
pub fn k8s_job_name(sweep: &str, rung: Option<usize>) -> String {
    let suffix = rung.map(|k| format!("-rung-{}", k + 1)).unwrap_or_default();
    let mut name: String = format!("peft-wit-{sweep}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name.truncate(63 - suffix.len());
    format!("{}{suffix}", name.trim_end_matches('-'))
}

/// The Indexed Job: `completions` = the number of cells, each pod running the cell of its
/// `JOB_COMPLETION_INDEX` (in a halving sweep's wave for `rung`: the wave's size, each pod
/// running its slot), the registry and Hugging Face cache on the claim.
pub fn k8s_job(
    registry: &Registry,
    plan: &SweepPlan,
    rung: Option<usize>,
    opts: &K8sOptions,
) -> Result<k8s_openapi::api::batch::v1::Job> {
    use k8s_openapi::api::batch::v1::{Job, JobSpec};
    use k8s_openapi::api::core::v1::{
        Container, EnvVar, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec,
        ResourceRequirements, Volume, VolumeMount,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    if opts.image.is_empty() || opts.pvc.is_empty() {
        return Err(Error::InvalidArgument(
            "--launcher k8s needs --k8s-image and --k8s-pvc (the claim holding the registry and model cache)".into(),
        ));
    }
    let registry_path = opts
        .registry_path
        .clone()
        .unwrap_or_else(|| absolute(registry.root()).display().to_string());
    if !Path::new(&registry_path).starts_with(&opts.mount_path) {
        return Err(Error::InvalidArgument(format!(
            "the registry inside the pod ({registry_path}) is not under the claim's mount path {}: pass --k8s-registry-path",
            opts.mount_path
        )));
    }
    let n = match (rung, Ladder::of(plan)) {
        (Some(k), Some(ladder)) if k < ladder.sizes.len() => ladder.sizes[k] as i32,
        _ => plan.cells.len() as i32,
    };
    // Expanded by Kubernetes from the env var every Indexed Job pod has.
    let task = "$(JOB_COMPLETION_INDEX)".to_string();
    let target: Vec<String> = match rung {
        None => vec!["--index".into(), task],
        Some(k) => vec!["--rung".into(), (k + 1).to_string(), "--slot".into(), task],
    };
    let labels: BTreeMap<String, String> = [
        ("app.kubernetes.io/name".to_string(), "peft-wit".to_string()),
        ("peft-wit/sweep".to_string(), plan.name.clone()),
    ]
    .into();
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(cpu) = &opts.cpu {
        requests.insert("cpu".to_string(), Quantity(cpu.clone()));
    }
    if let Some(memory) = &opts.memory {
        requests.insert("memory".to_string(), Quantity(memory.clone()));
        limits.insert("memory".to_string(), Quantity(memory.clone()));
    }
    if let Some(gpus) = opts.gpus.filter(|g| *g > 0) {
        limits.insert("nvidia.com/gpu".to_string(), Quantity(gpus.to_string()));
    }
    let container = Container {
        name: "cell".into(),
        image: Some(opts.image.clone()),
        command: Some(vec![opts.program.clone()]),
        args: Some(
            vec![
                "sweep".into(),
                "run-cell".into(),
                "--registry".into(),
                registry_path,
                "--sweep".into(),
                plan.name.clone(),
            ]
            .into_iter()
            .chain(target)
            .collect(),
        ),
        env: Some(vec![EnvVar {
            name: "HF_HOME".into(),
            value: Some(format!(
                "{}/hf-cache",
                opts.mount_path.trim_end_matches('/')
            )),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: (!requests.is_empty()).then_some(requests),
            limits: (!limits.is_empty()).then_some(limits),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "shared".into(),
            mount_path: opts.mount_path.clone(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(k8s_job_name(&plan.name, rung)),
            namespace: opts.namespace.clone(),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        spec: Some(JobSpec {
            completion_mode: Some("Indexed".into()),
            completions: Some(n),
            parallelism: Some(opts.max_parallel.map(|k| k as i32).unwrap_or(n)),
            // A pod evicted or preempted is retried and resumes from its checkpoint.
            backoff_limit_per_index: Some(3),
            max_failed_indexes: Some(n),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    // SIGTERM first: the cell writes a checkpoint before the pod goes.
                    termination_grace_period_seconds: Some(120),
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "shared".into(),
                        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                            claim_name: opts.pvc.clone(),
                            read_only: None,
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Writes the Job manifest(s) into the plan folder and records them; returns their paths. A
/// grid sweep is one Indexed Job (`job.yaml`; done cells exit at once); a halving sweep is one
/// Job per wave still to run (`job-rung-K.yaml`) and `waves.sh`, which applies each wave once
/// the one before has completed.
pub fn write_k8s_manifests(
    registry: &Registry,
    plan: &SweepPlan,
    opts: &K8sOptions,
) -> Result<Vec<PathBuf>> {
    let dir = plan_dir(registry, &plan.name);
    let rungs: Vec<Option<usize>> = match Ladder::of(plan) {
        None => vec![None],
        Some(_) => pending_tasks(registry, plan, false)?
            .iter()
            .map(|set| set.rung)
            .collect(),
    };
    let mut paths = Vec::new();
    for &rung in &rungs {
        let job = k8s_job(registry, plan, rung, opts)?;
        let path = match rung {
            None => dir.join(K8S_FILE),
            Some(k) => dir.join(format!("job-rung-{}.yaml", k + 1)),
        };
        let yaml = serde_yaml::to_string(&job)
            .map_err(|e| Error::InvalidArgument(format!("Job manifest: {e}")))?;
        let what = match rung {
            None => format!("{} cells", plan.cells.len()),
            Some(k) => format!("rung {} of a halving sweep", k + 1),
        };
        let text = format!(
            "# peft-wit {} sweep `{}`: {what}. Apply with `kubectl apply -f {}`.\n{yaml}",
            env!("CARGO_PKG_VERSION"),
            plan.name,
            path.display()
        );
        atomic_write(&path, text.as_bytes())?;
        let completions = job
            .spec
            .as_ref()
            .and_then(|s| s.completions)
            .unwrap_or(0)
            .max(0) as usize;
        let set = TaskSet {
            rung,
            ids: (0..completions).collect(),
        };
        record_submission(
            registry,
            plan,
            Launcher::K8s,
            &k8s_job_name(&plan.name, rung),
            &set,
        )?;
        paths.push(path);
    }
    if rungs.iter().any(Option::is_some) {
        let script = dir.join(K8S_WAVES_FILE);
        atomic_write(
            &script,
            k8s_waves_script(plan, &rungs, &paths, opts).as_bytes(),
        )?;
        paths.push(script);
    }
    Ok(paths)
}

pub const K8S_WAVES_FILE: &str = "waves.sh";

/// A script applying each wave's Job once the one before has completed (stopping, with the
/// command to see why, when one fails).
fn k8s_waves_script(
    plan: &SweepPlan,
    rungs: &[Option<usize>],
    manifests: &[PathBuf],
    opts: &K8sOptions,
) -> String {
    let namespace = opts
        .namespace
        .as_ref()
        .map(|n| format!(" -n {}", quote(n)))
        .unwrap_or_default();
    let mut s = format!(
        "#!/bin/sh\n# peft-wit {}: the waves of halving sweep `{}`, each applied once the one before has completed.\nset -eu\n",
        env!("CARGO_PKG_VERSION"),
        plan.name
    );
    s.push_str(&format!(
        "wait_job() {{\n  while :; do\n    conditions=$(kubectl{namespace} get job \"$1\" -o jsonpath='{{range .status.conditions[*]}}{{.type}}={{.status}} {{end}}')\n    case \"$conditions\" in\n      *Complete=True*) return 0 ;;\n      *Failed=True*) echo \"job $1 failed: see peft-wit sweep status {}\" >&2; return 1 ;;\n    esac\n    sleep 30\n  done\n}}\n",
        quote(&plan.name)
    ));
    for (rung, path) in rungs.iter().zip(manifests) {
        s.push_str(&format!(
            "kubectl{namespace} apply -f {}\nwait_job {}\n",
            quote(&absolute(path).display().to_string()),
            k8s_job_name(&plan.name, *rung)
        ));
    }
    s
}

/// What the scheduler says about each cell (index → state), where its tool is on PATH:
/// `squeue` for Slurm submissions, `kubectl` for the Kubernetes Job. Empty otherwise.
pub fn scheduler_view(registry: &Registry, plan: &SweepPlan) -> BTreeMap<usize, String> {
    let mut view = BTreeMap::new();
    let jobs = submissions(registry, plan);
    // A task id is a cell index, or a halving wave's slot: its cell once the rung before is
    // complete (unknown before, and then not shown).
    let halving = Ladder::of(plan)
        .and_then(|ladder| super::halving::load_state(registry, plan, &ladder).ok());
    let cell_of = |rung: Option<usize>, id: usize| -> Option<usize> {
        match (rung, &halving) {
            (None, _) | (Some(0), _) => Some(id),
            (Some(k), Some(state)) => state.entrants(k, plan)?.get(id).copied(),
            (Some(_), None) => None,
        }
    };
    if jobs.iter().any(|j| j.launcher == Launcher::Slurm) && find_on_path("squeue").is_some() {
        // Later submissions come later: their state wins for a cell.
        for job in jobs.iter().filter(|j| j.launcher == Launcher::Slurm) {
            let out = Command::new("squeue")
                .args(["-h", "-r", "-t", "all", "-j", &job.job, "-o", "%i %T %r"])
                .output();
            let Ok(out) = out else { continue };
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let mut parts = line.split_whitespace();
                let (Some(id), Some(state)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let reason = parts.collect::<Vec<_>>().join(" ");
                let task = id.rsplit('_').next().and_then(|i| i.parse().ok());
                if let Some(index) = task.and_then(|t| cell_of(job.rung, t)) {
                    let text = if reason.is_empty() || reason == "None" {
                        format!("slurm {id} {state}")
                    } else {
                        format!("slurm {id} {state} ({reason})")
                    };
                    view.insert(index, text);
                }
            }
        }
    }
    if find_on_path("kubectl").is_some() {
        let mut seen = std::collections::BTreeSet::new();
        // The latest manifest of each Job name.
        for job in jobs.iter().rev().filter(|j| j.launcher == Launcher::K8s) {
            if !seen.insert(job.job.clone()) {
                continue;
            }
            let template = "{range .items[*]}{.metadata.annotations.batch\\.kubernetes\\.io/job-completion-index} {.status.phase}{\"\\n\"}{end}";
            let out = Command::new("kubectl")
                .args([
                    "get",
                    "pods",
                    "-l",
                    &format!("job-name={}", job.job),
                    "-o",
                    &format!("jsonpath={template}"),
                ])
                .output();
            let Ok(out) = out else { continue };
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let mut parts = line.split_whitespace();
                if let (Some(Ok(task)), Some(phase)) =
                    (parts.next().map(str::parse::<usize>), parts.next())
                {
                    if let Some(index) = cell_of(job.rung, task) {
                        view.entry(index).or_insert_with(|| format!("pod {phase}"));
                    }
                }
            }
        }
    }
    view
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
