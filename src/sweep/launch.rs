//! Handing a planned sweep's cells to the scheduler the user already has: a Slurm job array
//! (`sbatch`), a Kubernetes Indexed Job manifest, or one command line per cell. The schedulers
//! do the scheduling; every cell is `peft-wit sweep run-cell --sweep <name> --index I`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

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
    pub indices: Vec<usize>,
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

/// The command that runs one cell (`index` may be a shell expression such as
/// `"$SLURM_ARRAY_TASK_ID"`, inserted as is).
fn run_cell_command(exe: &Path, registry_root: &Path, sweep: &str, index: &str) -> String {
    format!(
        "{} sweep run-cell --registry {} --sweep {} --index {index}",
        quote(&exe.display().to_string()),
        quote(&registry_root.display().to_string()),
        quote(sweep)
    )
}

/// One command line per cell in `indices`.
pub fn cell_commands(
    exe: &Path,
    registry: &Registry,
    plan: &SweepPlan,
    indices: &[usize],
) -> Vec<String> {
    let root = absolute(registry.root());
    indices
        .iter()
        .map(|i| run_cell_command(exe, &root, &plan.name, &i.to_string()))
        .collect()
}

/// Slurm settings from the command line.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    /// At most this many array tasks at once (`%K`).
    pub max_parallel: Option<usize>,
    /// Extra sbatch options (`--partition=gpu --gres=gpu:1 --time=2:00:00`), already split.
    pub sbatch_options: Vec<String>,
}

/// The sbatch script for the cells `indices`: an array job whose task `I` runs cell `I`,
/// requeued on preemption (the cell then resumes from its checkpoint), each task logging to
/// `<plan>/logs/cell-<I>.log` (appended, so a requeued task's log keeps its first life).
pub fn sbatch_script(
    exe: &Path,
    registry: &Registry,
    plan: &SweepPlan,
    indices: &[usize],
    opts: &SlurmOptions,
) -> String {
    let root = absolute(registry.root());
    let logs = absolute(&plan_dir(registry, &plan.name)).join("logs");
    let mut array = array_spec(indices);
    if let Some(k) = opts.max_parallel {
        array.push_str(&format!("%{k}"));
    }
    let mut s = String::new();
    s.push_str("#!/bin/bash\n");
    s.push_str(&format!(
        "# Written by peft-wit {} for sweep `{}` ({} cells, {} steps each). `peft-wit sweep ... --launcher slurm`\n# run again submits the cells that are not done; `peft-wit sweep status {}` shows them.\n",
        env!("CARGO_PKG_VERSION"),
        plan.name,
        plan.cells.len(),
        plan.total_steps,
        plan.name
    ));
    s.push_str(&format!(
        "#SBATCH --job-name={}\n",
        quote(&format!("peft-wit-{}", plan.name))
    ));
    s.push_str(&format!("#SBATCH --array={array}\n"));
    s.push_str("#SBATCH --requeue\n#SBATCH --open-mode=append\n");
    s.push_str(&format!(
        "#SBATCH --output={}\n",
        quote(&logs.join("cell-%a.log").display().to_string())
    ));
    for opt in &opts.sbatch_options {
        s.push_str(&format!("#SBATCH {}\n", sbatch_quote(opt)));
    }
    s.push_str("set -eu\n");
    s.push_str(
        "echo \"peft-wit cell $SLURM_ARRAY_TASK_ID: job $SLURM_JOB_ID on $(hostname), restart ${SLURM_RESTART_COUNT:-0}\"\n",
    );
    // exec: the scheduler's SIGTERM reaches peft-wit itself, which checkpoints and exits.
    s.push_str(&format!(
        "exec {}\n",
        run_cell_command(exe, &root, &plan.name, "\"$SLURM_ARRAY_TASK_ID\"")
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

/// Writes the sbatch script into the plan folder and submits it; returns the job id.
pub fn submit_slurm(
    exe: &Path,
    registry: &Registry,
    plan: &SweepPlan,
    indices: &[usize],
    opts: &SlurmOptions,
) -> Result<String> {
    let sbatch = check_sbatch()?;
    let script = plan_dir(registry, &plan.name).join(SBATCH_FILE);
    atomic_write(
        &script,
        sbatch_script(exe, registry, plan, indices, opts).as_bytes(),
    )?;
    let output = Command::new(&sbatch)
        .arg("--parsable")
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
    record_submission(registry, plan, Launcher::Slurm, &job, indices)?;
    Ok(job)
}

fn record_submission(
    registry: &Registry,
    plan: &SweepPlan,
    launcher: Launcher,
    job: &str,
    indices: &[usize],
) -> Result<()> {
    let path = plan_dir(registry, &plan.name).join(JOBS_FILE);
    let mut jobs = submissions(registry, plan);
    jobs.push(Submission {
        launcher,
        job: job.to_string(),
        indices: indices.to_vec(),
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

/// A Kubernetes object name (DNS-1123 label) for the sweep's Job.
pub fn k8s_job_name(sweep: &str) -> String {
    let mut name: String = format!("peft-wit-{sweep}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

/// The Indexed Job: `completions` = the number of cells, each pod running the cell of its
/// `JOB_COMPLETION_INDEX`, the registry and Hugging Face cache on the claim.
pub fn k8s_job(
    registry: &Registry,
    plan: &SweepPlan,
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
    let n = plan.cells.len() as i32;
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
        args: Some(vec![
            "sweep".into(),
            "run-cell".into(),
            "--registry".into(),
            registry_path,
            "--sweep".into(),
            plan.name.clone(),
            "--index".into(),
            // Expanded by Kubernetes from the env var every Indexed Job pod has.
            "$(JOB_COMPLETION_INDEX)".into(),
        ]),
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
            name: Some(k8s_job_name(&plan.name)),
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

/// Writes the Job manifest (YAML) into the plan folder and records it; returns its path.
pub fn write_k8s_manifest(
    registry: &Registry,
    plan: &SweepPlan,
    opts: &K8sOptions,
) -> Result<PathBuf> {
    let job = k8s_job(registry, plan, opts)?;
    let path = plan_dir(registry, &plan.name).join(K8S_FILE);
    let yaml = serde_yaml::to_string(&job)
        .map_err(|e| Error::InvalidArgument(format!("Job manifest: {e}")))?;
    let text = format!(
        "# peft-wit {} sweep `{}`: {} cells. Apply with `kubectl apply -f {}`.\n{yaml}",
        env!("CARGO_PKG_VERSION"),
        plan.name,
        plan.cells.len(),
        path.display()
    );
    atomic_write(&path, text.as_bytes())?;
    let indices: Vec<usize> = (0..plan.cells.len()).collect();
    record_submission(
        registry,
        plan,
        Launcher::K8s,
        &k8s_job_name(&plan.name),
        &indices,
    )?;
    Ok(path)
}

/// What the scheduler says about each cell (index → state), where its tool is on PATH:
/// `squeue` for Slurm submissions, `kubectl` for the Kubernetes Job. Empty otherwise.
pub fn scheduler_view(registry: &Registry, plan: &SweepPlan) -> BTreeMap<usize, String> {
    let mut view = BTreeMap::new();
    let jobs = submissions(registry, plan);
    let slurm: Vec<&str> = jobs
        .iter()
        .filter(|j| j.launcher == Launcher::Slurm)
        .map(|j| j.job.as_str())
        .collect();
    if !slurm.is_empty() && find_on_path("squeue").is_some() {
        // Later submissions come later: their state wins for an index.
        for job in slurm {
            let out = Command::new("squeue")
                .args(["-h", "-r", "-t", "all", "-j", job, "-o", "%i %T %r"])
                .output();
            let Ok(out) = out else { continue };
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let mut parts = line.split_whitespace();
                let (Some(id), Some(state)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let reason = parts.collect::<Vec<_>>().join(" ");
                if let Some(index) = id.rsplit('_').next().and_then(|i| i.parse().ok()) {
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
    let k8s = jobs.iter().rev().find(|j| j.launcher == Launcher::K8s);
    if let (Some(job), Some(_)) = (k8s, find_on_path("kubectl")) {
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
        if let Ok(out) = out {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let mut parts = line.split_whitespace();
                if let (Some(Ok(index)), Some(phase)) =
                    (parts.next().map(str::parse::<usize>), parts.next())
                {
                    view.insert(index, format!("pod {phase}"));
                }
            }
        }
    }
    view
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
