//! Runs the MLflow sink against a real `mlflow server` (PEFT_WIT_TEST_MLFLOW_URI, see
//! scripts/start-mlflow.sh) and reads everything back through the REST API; plus a server
//! that is down, which must never slow training.

mod common;

use peft_wit::tracking::{ReportTo, RunStatus, Tracker, TrackingOptions};
use serde_json::Value;
use std::time::{Duration, Instant};

fn api(uri: &str, endpoint: &str, query: &[(&str, &str)]) -> Value {
    let url = format!("{uri}/api/2.0/mlflow/{endpoint}");
    let req = query
        .iter()
        .fold(ureq::get(&url), |r, (k, v)| r.query(k, v));
    let resp = req.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    resp.into_json().expect("JSON answer")
}

/// `[{key, value}, ...]` → value of `key`.
fn kv<'a>(list: &'a Value, key: &str) -> Option<&'a Value> {
    let list = list.as_array()?;
    list.iter().find(|e| e["key"] == key).map(|e| &e["value"])
}

fn options(uri: &str, experiment: &str, run_name: &str, cell: &str) -> TrackingOptions {
    TrackingOptions {
        report_to: vec![ReportTo::Mlflow],
        mlflow_tracking_uri: Some(uri.into()),
        mlflow_experiment: experiment.into(),
        run_name: run_name.into(),
        tags: vec![
            ("peft_wit.sweep".into(), "grid".into()),
            ("peft_wit.cell".into(), cell.into()),
        ],
        ..Default::default()
    }
}

fn test_server() -> Option<(String, String)> {
    let uri = common::required_env("PEFT_WIT_TEST_MLFLOW_URI")?;
    let experiment = common::temp_path("exp")
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Some((uri.trim_end_matches('/').to_string(), experiment))
}

#[test]
fn params_metrics_and_artifacts_reach_the_server() {
    let Some((uri, experiment)) = test_server() else {
        return;
    };
    let mut t = Tracker::open(&options(&uri, &experiment, "adapter-a", "3")).expect("open");
    let run_id = t.mlflow_run_id().expect("run created").to_string();
    t.log_params(&[("lr".into(), "0.0002".into()), ("rank".into(), "8".into())]);
    common::log_train_scalars(&mut t);
    t.log_scalars(6, 1.7e9 + 6.0, &[("eval/loss", f64::NAN)]);

    let art = common::temp_path("artifacts");
    std::fs::create_dir_all(art.join("sub")).expect("mkdir");
    std::fs::write(art.join("adapter_config.json"), b"{\"r\": 8}").expect("write");
    std::fs::write(art.join("sub/adapter model.bin"), vec![7u8; 3000]).expect("write");
    t.log_artifacts(&art);
    t.finish(RunStatus::Finished);
    assert_eq!(t.unsent_metrics(), 0);

    let run = &api(&uri, "runs/get", &[("run_id", &run_id)])["run"];
    assert_eq!(run["info"]["status"], "FINISHED");
    assert_eq!(run["info"]["run_name"], "adapter-a");
    let data = &run["data"];
    assert_eq!(kv(&data["params"], "lr"), Some(&Value::from("0.0002")));
    assert_eq!(kv(&data["params"], "rank"), Some(&Value::from("8")));
    assert_eq!(kv(&data["tags"], "peft_wit.cell"), Some(&Value::from("3")));

    let history = |key: &str| {
        let h = api(
            &uri,
            "metrics/get-history",
            &[("run_id", &run_id), ("metric_key", key)],
        );
        let mut points: Vec<(i64, Value, i64)> = h["metrics"]
            .as_array()
            .expect("metrics")
            .iter()
            .map(|m| {
                (
                    m["step"].as_i64().unwrap_or(-1),
                    m["value"].clone(),
                    m["timestamp"].as_i64().unwrap_or(-1),
                )
            })
            .collect();
        points.sort_by_key(|p| p.0);
        points
    };
    let loss: Vec<_> = (1..=5)
        .map(|s| {
            (
                s,
                Value::from(1.0 / s as f64),
                ((1.7e9 + s as f64) * 1000.0) as i64,
            )
        })
        .collect();
    assert_eq!(history("train/loss"), loss);
    assert_eq!(history("train/lr").len(), 5);
    assert_eq!(history("eval/loss")[0].1, "NaN");

    let files = api(&uri, "artifacts/list", &[("run_id", &run_id)]);
    let listed: Vec<(String, bool, i64)> = files["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap_or("").to_string(),
                f["is_dir"] == true,
                f["file_size"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("adapter_config.json".into(), false, 8),
            ("sub".into(), true, -1)
        ]
    );
    let sub = api(
        &uri,
        "artifacts/list",
        &[("run_id", &run_id), ("path", "sub")],
    );
    assert_eq!(sub["files"][0]["path"], "sub/adapter model.bin");
    assert_eq!(sub["files"][0]["file_size"], 3000);
    let _ = std::fs::remove_dir_all(&art);
}

#[test]
fn resume_continues_running_or_killed_runs_only() {
    let Some((uri, experiment)) = test_server() else {
        return;
    };
    let open = |cell: &str| Tracker::open(&options(&uri, &experiment, "adapter-b", cell));
    let status =
        |id: &str| api(&uri, "runs/get", &[("run_id", id)])["run"]["info"]["status"].clone();

    // A crash leaves the run RUNNING (forget skips the Drop that would mark it FAILED).
    let mut t = open("1").expect("open");
    let id = t.mlflow_run_id().expect("run").to_string();
    t.log_scalars(1, 1.7e9, &[("train/loss", 2.0)]);
    std::mem::forget(t);

    let mut t = open("1").expect("reopen");
    assert_eq!(t.mlflow_run_id(), Some(id.as_str()), "RUNNING run resumed");
    t.log_scalars(2, 1.7e9 + 1.0, &[("train/loss", 1.0)]);
    t.finish(RunStatus::Killed);
    assert_eq!(status(&id), "KILLED");

    let mut t = open("1").expect("reopen");
    assert_eq!(t.mlflow_run_id(), Some(id.as_str()), "KILLED run resumed");
    assert_eq!(status(&id), "RUNNING");
    t.finish(RunStatus::Finished);

    let t = open("1").expect("open");
    let finished_not_resumed = t.mlflow_run_id().expect("run").to_string();
    assert_ne!(finished_not_resumed, id);
    drop(t); // dropped without finish: marked FAILED
    assert_eq!(status(&finished_not_resumed), "FAILED");

    let mut t = open("2").expect("open");
    assert_ne!(
        t.mlflow_run_id(),
        Some(id.as_str()),
        "other tags: a new run"
    );
    t.finish(RunStatus::Finished);

    let h = api(
        &uri,
        "metrics/get-history",
        &[("run_id", &id), ("metric_key", "train/loss")],
    );
    assert_eq!(h["metrics"].as_array().map(Vec::len), Some(2));
}

#[test]
fn unreachable_server_never_blocks_training() {
    let start = Instant::now();
    // Port 9 (discard) on loopback: refused at once on any usual machine.
    let mut t = Tracker::open(&options("http://127.0.0.1:9", "e", "adapter-c", "1"))
        .expect("a server that is down is not a configuration error");
    assert_eq!(t.mlflow_run_id(), None);
    let steps = Instant::now();
    for step in 1..=50u64 {
        t.log_scalars(
            step,
            1.7e9 + step as f64,
            &[("train/loss", 1.0), ("train/lr", 0.1)],
        );
    }
    // Backing off after the failed open: the steps only buffer.
    assert!(
        steps.elapsed() < Duration::from_secs(1),
        "{:?}",
        steps.elapsed()
    );
    t.log_artifacts(std::path::Path::new("/nonexistent"));
    t.finish(RunStatus::Finished);
    assert_eq!(t.unsent_metrics(), 100);
    // Open retries (0.5 + 1 + 2 s); later probes of a server known down try once.
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

/// Forwards every connection on `port` to `upstream` (host:port) until the test ends.
fn start_proxy(port: u16, upstream: String) {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind proxy port");
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                continue;
            };
            let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            };
            if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                pipe(client, s2);
                pipe(server, c2);
            }
        }
    });
}

#[test]
fn metrics_buffered_while_down_are_sent_when_the_server_returns() {
    let Some((uri, experiment)) = test_server() else {
        return;
    };
    // A free loopback port with nothing listening yet: the server is "down".
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let down_uri = format!("http://127.0.0.1:{port}");
    let mut t = Tracker::open(&options(&down_uri, &experiment, "adapter-d", "1")).expect("open");
    assert_eq!(t.mlflow_run_id(), None);
    for step in 1..=10u64 {
        t.log_scalars(step, 1.7e9 + step as f64, &[("train/loss", step as f64)]);
    }
    assert_eq!(t.unsent_metrics(), 10);

    start_proxy(port, uri.trim_start_matches("http://").to_string());
    t.finish(RunStatus::Finished); // one more try: creates the run, sends the buffer
    assert_eq!(t.unsent_metrics(), 0);
    let run_id = t
        .mlflow_run_id()
        .expect("run created at finish")
        .to_string();
    let run = &api(&uri, "runs/get", &[("run_id", &run_id)])["run"];
    assert_eq!(run["info"]["status"], "FINISHED");
    let h = api(
        &uri,
        "metrics/get-history",
        &[("run_id", &run_id), ("metric_key", "train/loss")],
    );
    assert_eq!(h["metrics"].as_array().map(Vec::len), Some(10));
}
