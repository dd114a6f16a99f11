//! A sweep as a plan whose cells run anywhere: cells run by `sweep run-cell` (from `--launcher
//! print`, or as a real Slurm job array) give the same table and byte-identical adapters as a
//! local sweep; a cancelled cell resumes from its checkpoint and ends byte-identical; the same
//! index run twice at once trains once; cells share the plan's step-0 evaluation; the
//! Kubernetes manifest is a valid Indexed Job; bad input gets a clear error with nothing
//! written half-way.

#[path = "util.rs"]
mod util;

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use util::Dir;

/// The 2×2 grid's flags (four trainable cells), `steps` optimizer steps per cell.
fn grid_args(dir: &Dir, steps: usize) -> Vec<String> {
    [
        "--max-steps",
        &steps.to_string(),
        "--batch-size",
        "4",
        "--rank",
        "2",
        "--seed",
        "7",
        "--prompt-weights",
        "0,1",
        "--response-weights",
        "0.5,1",
        "--quiet",
        "--data",
        &dir.data().display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

const CELLS: [&str; 4] = ["wit-p0-r0.5", "wit-p1-r0.5", "wit-p0-r1", "wit-p1-r1"];

fn adapter_bytes(registry: &Path, name: &str) -> Vec<u8> {
    let path = registry.join(name).join("adapter_model.safetensors");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The cells' metrics from a sweep.json.
fn sweep_metrics(path: &Path) -> Vec<(String, serde_json::Value)> {
    let v = common::read_json(path.to_path_buf());
    v["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["metrics"].clone(),
            )
        })
        .collect()
}

fn local_sweep(dir: &Dir, steps: usize) -> PathBuf {
    let registry = dir.path().join("local-registry");
    dir.cmd_with_model(&["sweep", "--registry"])
        .arg(&registry)
        .args(grid_args(dir, steps))
        .all_output();
    registry
}

fn run_shell(line: &str, dir: &Dir) {
    let out = Command::new("sh")
        .args(["-c", line])
        .current_dir(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{line} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The command lines `sweep --launcher print` gives for the grid's cells not yet done.
fn printed_commands(dir: &Dir, registry: &Path, steps: usize) -> Vec<String> {
    dir.cmd_with_model(&["sweep", "--launcher", "print", "--registry"])
        .arg(registry)
        .args(grid_args(dir, steps))
        .stdout()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn cells_run_one_by_one_from_the_plan_equal_a_local_sweep() {
    let dir = Dir::tiny();
    let local = local_sweep(&dir, 3);
    let remote = dir.path().join("shared-registry");
    let lines = printed_commands(&dir, &remote, 3);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines[2].contains("sweep run-cell") && lines[2].contains("--index 2"));
    for line in &lines {
        run_shell(line, &dir);
    }
    // Nothing is left to print once every cell is done.
    let again = printed_commands(&dir, &remote, 3);
    assert!(again.is_empty(), "{again:?}");
    let table = dir
        .cmd(&["sweep", "collect", "grid", "--registry"])
        .arg(&remote)
        .stdout();
    assert!(table.contains("best by response_loss"), "{table}");
    let plans = |r: &Path| sweep_metrics(&r.join(".sweeps/grid/sweep.json"));
    assert_eq!(plans(&local), plans(&remote));
    for cell in CELLS {
        assert_eq!(
            adapter_bytes(&local, cell),
            adapter_bytes(&remote, cell),
            "{cell}"
        );
    }
    let status = dir
        .cmd(&["sweep", "status", "grid", "--registry"])
        .arg(&remote)
        .stdout();
    assert!(status.contains("4 cells: 4 done"), "{status}");
}

/// The step-0 line of a cell's metrics.jsonl in a registry.
fn step0_line(registry: &Path, name: &str) -> serde_json::Value {
    let path = registry.join(name).join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let first = text.lines().next().expect("a step-0 line");
    let line: serde_json::Value = serde_json::from_str(first).unwrap();
    assert_eq!(line["step"], 0, "{first}");
    line
}

/// The first cell a plan trains writes the untouched base's per-token held-out losses into
/// the plan folder, and later cells (other processes, other hosts) take their step-0
/// evaluation from that file instead of a forward pass: a doctored copy (every loss doubled)
/// shows up doubled in the next cell's step-0 line.
#[test]
fn cells_take_their_step_zero_evaluation_from_the_plan() {
    let dir = Dir::tiny();
    let local = local_sweep(&dir, 1);
    let remote = dir.path().join("shared-registry");
    let lines = printed_commands(&dir, &remote, 1);
    let shared = remote.join(".sweeps/grid/step0-eval.json");
    assert!(!shared.exists(), "planning alone evaluates nothing");
    run_shell(&lines[0], &dir);
    assert_eq!(step0_line(&remote, CELLS[0]), step0_line(&local, CELLS[0]));
    let mut stored = common::read_json(shared.clone());
    let tokens = stored["tokens"].as_array_mut().expect("tokens");
    assert!(!tokens.is_empty());
    for token in tokens.iter_mut() {
        token[1] = serde_json::json!(token[1].as_f64().unwrap() * 2.0);
    }
    std::fs::write(&shared, serde_json::to_vec(&stored).unwrap()).unwrap();
    run_shell(&lines[1], &dir);
    let (doctored, genuine) = (step0_line(&remote, CELLS[1]), step0_line(&local, CELLS[1]));
    for key in ["eval_response_loss", "eval_wit_loss"] {
        let (d, g) = (
            doctored[key].as_f64().unwrap(),
            genuine[key].as_f64().unwrap(),
        );
        assert!(
            g > 0.0 && (d - 2.0 * g).abs() <= 1e-9 * g,
            "{key}: {d} vs 2 × {g}"
        );
    }
}

/// Waits until `done` holds, polling; panics with `what` after `limit`.
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn_cell(dir: &Dir, registry: &Path, index: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_peft-wit"))
        .args([
            "sweep",
            "run-cell",
            "--quiet",
            "--sweep",
            "grid",
            "--registry",
        ])
        .arg(registry)
        .args(["--index", &index.to_string()])
        .current_dir(dir.path())
        .env("RAYON_NUM_THREADS", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn the_same_index_run_twice_at_once_trains_once() {
    let dir = Dir::tiny();
    let registry = dir.path().join("registry-twice");
    dir.cmd_with_model(&["sweep", "--launcher", "print", "--registry"])
        .arg(&registry)
        .args(grid_args(&dir, 400))
        .stdout();
    let lock = registry.join(".sweeps/grid/locks/cell-1.lock");
    let first = spawn_cell(&dir, &registry, 1);
    wait_for("the first run's lock", Duration::from_secs(60), || {
        lock.exists()
    });
    let second = spawn_cell(&dir, &registry, 1).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cell 1 (`wit-p1-r0.5`) is already running") && err.contains("pid"),
        "{err}"
    );
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // The registry is intact: the cell is a whole adapter, nothing else appeared.
    let list = dir
        .cmd(&["adapters", "list", "--registry"])
        .arg(&registry)
        .stdout();
    assert!(
        list.contains("wit-p1-r0.5") && !list.contains("damaged"),
        "{list}"
    );
    assert!(!lock.exists());
    let status = dir
        .cmd(&["sweep", "status", "grid", "--registry"])
        .arg(&registry)
        .stdout();
    assert!(
        status.contains("1 done") && status.contains("3 pending"),
        "{status}"
    );
    // Run again once done: nothing to do, success.
    let out = spawn_cell(&dir, &registry, 1).wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already done"));
}

#[test]
fn the_kubernetes_manifest_is_an_indexed_job() {
    use k8s_openapi::api::batch::v1::Job;
    let dir = Dir::tiny();
    let registry = dir.path().join("registry-k8s");
    let path = dir
        .cmd_with_model(&["sweep", "--launcher", "k8s", "--registry"])
        .arg(&registry)
        .args(grid_args(&dir, 3))
        .args([
            "--k8s-image",
            "ghcr.io/example/peft-wit:0.1",
            "--k8s-pvc",
            "sweeps",
            "--k8s-mount-path",
            "/workspace",
            "--k8s-registry-path",
            "/workspace/registry",
            "--k8s-gpus",
            "1",
            "--k8s-memory",
            "8Gi",
            "--max-parallel",
            "2",
        ])
        .stdout();
    let text = std::fs::read_to_string(path.trim()).unwrap();
    let job: Job = serde_yaml::from_str(&text).unwrap();
    assert_eq!(job.metadata.name.as_deref(), Some("peft-wit-grid"));
    let spec = job.spec.unwrap();
    assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
    assert_eq!(spec.completions, Some(4));
    assert_eq!(spec.parallelism, Some(2));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("ghcr.io/example/peft-wit:0.1")
    );
    let args = container.args.clone().unwrap();
    let expect = [
        "sweep",
        "run-cell",
        "--registry",
        "/workspace/registry",
        "--sweep",
        "grid",
        "--index",
        "$(JOB_COMPLETION_INDEX)",
    ];
    assert_eq!(args, expect);
    let resources = container.resources.clone().unwrap();
    assert_eq!(resources.limits.unwrap()["nvidia.com/gpu"].0, "1");
    assert_eq!(resources.requests.unwrap()["memory"].0, "8Gi");
    let volume = &pod.volumes.unwrap()[0];
    assert_eq!(
        volume.persistent_volume_claim.as_ref().unwrap().claim_name,
        "sweeps"
    );
    assert_eq!(
        container.volume_mounts.as_ref().unwrap()[0].mount_path,
        "/workspace"
    );
}

#[test]
fn bad_input_is_refused_with_nothing_written_half_way() {
    let dir = Dir::tiny();
    // An unknown launcher: a usage error naming the valid ones.
    let err = dir
        .cmd_with_model(&["sweep", "--launcher", "pbs"])
        .fails_with(2);
    assert!(
        err.contains("launcher `pbs`") && err.contains("slurm"),
        "{err}"
    );

    // sbatch missing from PATH: refused before anything is written.
    let registry = dir.path().join("registry-bad");
    let empty_bin = dir.path().join("empty-bin");
    std::fs::create_dir_all(&empty_bin).unwrap();
    let err = dir
        .cmd_with_model(&["sweep", "--launcher", "slurm", "--registry"])
        .arg(&registry)
        .args(grid_args(&dir, 3))
        .env("PATH", &empty_bin)
        .fails();
    assert!(err.contains("`sbatch` is not on PATH"), "{err}");
    assert!(!registry.join(".sweeps").exists());

    // A plan to work with.
    dir.cmd_with_model(&["sweep", "--launcher", "print", "--registry"])
        .arg(&registry)
        .args(grid_args(&dir, 3))
        .stdout();
    let run_cell = |index: &str| {
        dir.cmd(&[
            "sweep",
            "run-cell",
            "--sweep",
            "grid",
            "--index",
            index,
            "--registry",
        ])
        .arg(&registry)
    };
    let err = run_cell("9").fails();
    assert!(
        err.contains("cell index 9 is out of range: sweep `grid` has 4 cells (0-3)"),
        "{err}"
    );
    let err = dir
        .cmd(&[
            "sweep",
            "run-cell",
            "--sweep",
            "nope",
            "--index",
            "0",
            "--registry",
        ])
        .arg(&registry)
        .fails();
    assert!(
        err.contains("no sweep `nope`") && err.contains("grid"),
        "{err}"
    );

    // The same sweep name with other settings is refused, not overwritten.
    let mut other = grid_args(&dir, 3);
    other[1] = "5".into();
    let err = dir
        .cmd_with_model(&["sweep", "--launcher", "print", "--registry"])
        .arg(&registry)
        .args(other)
        .fails();
    assert!(
        err.contains("was planned with other settings (another training config)"),
        "{err}"
    );

    let plan_path = registry.join(".sweeps/grid/plan.json");
    let original = std::fs::read_to_string(&plan_path).unwrap();
    // A plan for another base.
    let mut plan: serde_json::Value = serde_json::from_str(&original).unwrap();
    plan["base"]["fingerprint"] = "0123456789abcdef0123".into();
    std::fs::write(&plan_path, serde_json::to_string(&plan).unwrap()).unwrap();
    let err = run_cell("0").fails();
    assert!(err.contains("was planned for the base"), "{err}");
    assert!(!registry.join("wit-p0-r0.5").exists());
    // A plan written by another version.
    let mut plan: serde_json::Value = serde_json::from_str(&original).unwrap();
    plan["peft_wit_version"] = "0.0.1".into();
    std::fs::write(&plan_path, serde_json::to_string(&plan).unwrap()).unwrap();
    let err = run_cell("0").fails();
    assert!(
        err.contains("plan.json") && err.contains("written by peft-wit 0.0.1"),
        "{err}"
    );
}

// ---- A real Slurm (`.ci/run` starts a one-node cluster with scripts/slurm-up.sh).

fn squeue_states(job: &str) -> String {
    let out = Command::new("squeue")
        .args(["-h", "-r", "-t", "all", "-j", job, "-o", "%i %T"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status_of(dir: &Dir, registry: &Path) -> String {
    dir.cmd(&["sweep", "status", "grid", "--registry"])
        .arg(registry)
        .stdout()
}

/// The state column of cell `index` in `sweep status`.
fn cell_line(status: &str, index: usize) -> String {
    status
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&index.to_string()))
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_slurm_job_array_sweep_with_a_cancelled_cell_equals_a_local_sweep() {
    if common::required_env("PEFT_WIT_TEST_SLURM").is_none() {
        return;
    }
    // Long enough (about 10 s a cell) to cancel cell 3 mid-run.
    let steps = 2000;
    let dir = Dir::tiny();
    let local = local_sweep(&dir, steps);
    let registry = dir.path().join("slurm-registry");
    let submit = || {
        dir.cmd_with_model(&["sweep", "--launcher", "slurm", "--max-parallel", "2"])
            .args(["--slurm-opt", "--time=00:20:00 --cpus-per-task=1"])
            .arg("--registry")
            .arg(&registry)
            .args(grid_args(&dir, steps))
            .stdout()
            .trim()
            .to_string()
    };
    let job = submit();
    assert!(job.chars().all(|c| c.is_ascii_digit()), "job id {job:?}");
    let script = std::fs::read_to_string(registry.join(".sweeps/grid/sweep.sbatch")).unwrap();
    assert!(script.contains("#SBATCH --array=0-3%2"), "{script}");
    assert!(script.contains("#SBATCH --time=00:20:00"), "{script}");

    // Cancel cell 3 once it has made progress (it starts when a slot frees up).
    let limit = Duration::from_secs(600);
    wait_for("cell 3 to run a few steps", limit, || {
        let status = status_of(&dir, &registry);
        let line = cell_line(&status, 3);
        if line.contains("done") {
            panic!("cell 3 finished before it could be cancelled:\n{status}");
        }
        line.contains("running (step")
            && line
                .split("step ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n >= 20)
    });
    let cancel = Command::new("scancel")
        .arg(format!("{job}_3"))
        .status()
        .unwrap();
    assert!(cancel.success());
    wait_for("cell 3 to checkpoint and stop", limit, || {
        cell_line(&status_of(&dir, &registry), 3).contains("interrupted at step")
    });
    let stopped_at = cell_line(&status_of(&dir, &registry), 3);
    wait_for("the rest of the first job", limit, || {
        let states = squeue_states(&job);
        !states.contains("RUNNING") && !states.contains("PENDING")
    });
    let status = status_of(&dir, &registry);
    assert!(
        status.contains("3 done") && status.contains("1 interrupted"),
        "{status}"
    );

    // Submitting again sends only the unfinished cell, which resumes from its checkpoint.
    let job2 = submit();
    assert_ne!(job, job2);
    let script = std::fs::read_to_string(registry.join(".sweeps/grid/sweep.sbatch")).unwrap();
    assert!(script.contains("#SBATCH --array=3%2"), "{script}");
    wait_for("the resubmitted cell", limit, || {
        status_of(&dir, &registry).contains("4 cells: 4 done")
    });
    let log = std::fs::read_to_string(registry.join(".sweeps/grid/logs/cell-3.log")).unwrap();
    assert!(log.contains("SIGTERM"), "cell 3 log:\n{log}");
    assert!(
        log.matches("peft-wit cell 3: job").count() == 2,
        "two lives in the appended log:\n{log}"
    );
    eprintln!("cell 3 was {stopped_at}");

    let table = dir
        .cmd(&["sweep", "collect", "grid", "--registry"])
        .arg(&registry)
        .stdout();
    assert!(table.contains("best by response_loss"), "{table}");
    assert_eq!(
        sweep_metrics(&local.join(".sweeps/grid/sweep.json")),
        sweep_metrics(&registry.join(".sweeps/grid/sweep.json"))
    );
    for cell in CELLS {
        assert_eq!(
            adapter_bytes(&local, cell),
            adapter_bytes(&registry, cell),
            "{cell} differs from the local sweep's"
        );
    }
}

/// The flags of a two-rung halving sweep over the 2×2 grid (rung 1 ends at half the steps).
fn halving_args(dir: &Dir, steps: usize) -> Vec<String> {
    let mut args = grid_args(dir, steps);
    args.extend(
        [
            "--strategy",
            "halving",
            "--rungs",
            "2",
            "--eta",
            "2",
            "--sweep-name",
            "halving",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args
}

fn local_halving(dir: &Dir, steps: usize) -> PathBuf {
    let registry = dir.path().join("local-halving");
    dir.cmd_with_model(&["sweep", "--registry"])
        .arg(&registry)
        .args(halving_args(dir, steps))
        .all_output();
    registry
}

/// A cluster halving sweep ended as the local one did: the same rungs (scores, promotions),
/// the same table, byte-identical adapters, and no checkpoint left behind.
fn assert_same_halving(local: &Path, remote: &Path) {
    let rungs = |r: &Path| common::read_json(r.join(".sweeps/halving/rungs.json"));
    assert_eq!(rungs(local), rungs(remote));
    let plans = |r: &Path| sweep_metrics(&r.join(".sweeps/halving/sweep.json"));
    assert_eq!(plans(local), plans(remote));
    for cell in CELLS {
        assert_eq!(
            adapter_bytes(local, cell),
            adapter_bytes(remote, cell),
            "{cell}"
        );
        assert!(!remote.join(".runs").join(cell).exists(), "{cell}");
    }
}

#[test]
fn halving_waves_run_from_printed_commands_equal_a_local_halving_sweep() {
    let dir = Dir::tiny();
    let local = local_halving(&dir, 4);
    let remote = dir.path().join("shared-registry");
    let printed = dir
        .cmd_with_model(&["sweep", "--launcher", "print", "--registry"])
        .arg(&remote)
        .args(halving_args(&dir, 4))
        .stdout();
    let lines: Vec<&str> = printed.lines().collect();
    // Rung 1: four cells; rung 2: the best two, whichever they turn out to be.
    assert_eq!(lines.len(), 8, "{printed}");
    assert_eq!(lines[0], "# rung 1");
    assert!(lines[1].ends_with("--rung 1 --slot 0"), "{printed}");
    assert!(lines[5].starts_with("# rung 2: once"), "{printed}");
    assert!(lines[7].ends_with("--rung 2 --slot 1"), "{printed}");

    // A second-rung task started too early fails, saying what it waits for.
    let early = dir
        .cmd(&[])
        .args(shlex::split(lines[6]).unwrap().iter().skip(1))
        .fails();
    assert!(
        early.contains(
            "rung 1 of sweep `halving` is not complete (cells without a score: 0, 1, 2, 3)"
        ),
        "{early}"
    );
    for line in lines.iter().filter(|l| !l.starts_with('#')) {
        run_shell(line, &dir);
    }
    let status = dir
        .cmd(&["sweep", "status", "halving", "--registry"])
        .arg(&remote)
        .stdout();
    assert!(
        status.contains("rung 1 of 2 (to step 2 of 4, 4 cells): complete, 2 went on")
            && status.contains("rung 2 of 2 (to step 4 of 4, 2 cells): complete"),
        "{status}"
    );
    // A finished task run again has nothing to do.
    let again = dir
        .cmd(&[])
        .args(shlex::split(lines[7]).unwrap().iter().skip(1))
        .all_output();
    assert!(again.contains("has nothing to run"), "{again}");
    dir.cmd(&["sweep", "collect", "halving", "--registry"])
        .arg(&remote)
        .stdout();
    assert_same_halving(&local, &remote);
    // Nothing is left to print once every rung is complete.
    let rest = dir
        .cmd_with_model(&["sweep", "--launcher", "print", "--registry"])
        .arg(&remote)
        .args(halving_args(&dir, 4))
        .stdout();
    assert!(rest.trim().is_empty(), "{rest}");
}

#[test]
fn a_halving_sweep_on_kubernetes_is_one_indexed_job_per_rung() {
    use k8s_openapi::api::batch::v1::Job;
    let dir = Dir::tiny();
    let registry = dir.path().join("registry-k8s");
    let printed = dir
        .cmd_with_model(&["sweep", "--launcher", "k8s", "--registry"])
        .arg(&registry)
        .args(halving_args(&dir, 4))
        .args([
            "--k8s-image",
            "ghcr.io/example/peft-wit:0.1",
            "--k8s-pvc",
            "sweeps",
            "--k8s-registry-path",
            "/workspace/registry",
        ])
        .stdout();
    let paths: Vec<&str> = printed.lines().collect();
    assert_eq!(paths.len(), 3, "{printed}");
    for (k, completions) in [(1usize, 4), (2, 2)] {
        let text = std::fs::read_to_string(paths[k - 1]).unwrap();
        let job: Job = serde_yaml::from_str(&text).unwrap();
        assert_eq!(
            job.metadata.name.unwrap(),
            format!("peft-wit-halving-rung-{k}")
        );
        let spec = job.spec.unwrap();
        assert_eq!(spec.completions, Some(completions));
        let args = spec.template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap();
        let rung = k.to_string();
        let tail: Vec<&str> = args
            .iter()
            .rev()
            .take(4)
            .rev()
            .map(String::as_str)
            .collect();
        assert_eq!(
            tail,
            ["--rung", rung.as_str(), "--slot", "$(JOB_COMPLETION_INDEX)"]
        );
    }
    let script = std::fs::read_to_string(paths[2]).unwrap();
    let first = script.find("job-rung-1.yaml").unwrap();
    let wait = script.find("wait_job peft-wit-halving-rung-1").unwrap();
    let second = script.find("job-rung-2.yaml").unwrap();
    assert!(first < wait && wait < second, "{script}");
    let sh = Command::new("sh").args(["-n", paths[2]]).status().unwrap();
    assert!(sh.success(), "waves.sh is not valid sh:\n{script}");
}

#[test]
fn a_slurm_halving_sweep_runs_its_rungs_as_dependent_waves() {
    if common::required_env("PEFT_WIT_TEST_SLURM").is_none() {
        return;
    }
    let steps = 40;
    let dir = Dir::tiny();
    let local = local_halving(&dir, steps);
    let registry = dir.path().join("slurm-halving");
    let jobs = dir
        .cmd_with_model(&["sweep", "--launcher", "slurm"])
        .args(["--slurm-opt", "--time=00:20:00 --cpus-per-task=1"])
        .arg("--registry")
        .arg(&registry)
        .args(halving_args(&dir, steps))
        .stdout();
    let jobs: Vec<String> = jobs.lines().map(str::to_string).collect();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let plan = registry.join(".sweeps/halving");
    let first = std::fs::read_to_string(plan.join("sweep-rung-1.sbatch")).unwrap();
    assert!(first.contains("#SBATCH --array=0-3\n"), "{first}");
    let second = std::fs::read_to_string(plan.join("sweep-rung-2.sbatch")).unwrap();
    assert!(second.contains("#SBATCH --array=0-1\n"), "{second}");
    assert!(
        second.contains("--rung 2 --slot \"$SLURM_ARRAY_TASK_ID\""),
        "{second}"
    );
    let limit = Duration::from_secs(600);
    wait_for("both waves", limit, || {
        jobs.iter().all(|job| {
            let states = squeue_states(job);
            !states.contains("RUNNING") && !states.contains("PENDING")
        })
    });
    let status = dir
        .cmd(&["sweep", "status", "halving", "--registry"])
        .arg(&registry)
        .stdout();
    assert!(
        status.contains("rung 2 of 2 (to step 40 of 40, 2 cells): complete"),
        "{status}"
    );
    for slot in 0..2 {
        let log =
            std::fs::read_to_string(plan.join(format!("logs/rung-2-slot-{slot}.log"))).unwrap();
        assert!(log.contains("(rung 2) of sweep `halving`"), "{log}");
    }
    dir.cmd(&["sweep", "collect", "halving", "--registry"])
        .arg(&registry)
        .stdout();
    assert_same_halving(&local, &registry);
}
