//! A small client for the MLflow tracking server's REST API 2.0 (runs, params, metrics,
//! proxied artifacts). Training must never wait on MLflow: points are buffered in memory and
//! sent in batches; after a failed call the sink backs off (30 s, doubling up to 5 min)
//! instead of retrying on every step.

use super::{warn, RunStatus, TrackingError, TrackingOptions};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Waits before the 2nd, 3rd and 4th try of one call (connection errors, 429 and 5xx only).
const RETRY_DELAYS_MS: [u64; 3] = [500, 1000, 2000];
const BACKOFF_FIRST: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// About 10 MB of JSON: hours of a server outage at typical logging rates.
const MAX_BUFFERED: usize = 100_000;
/// Limits of runs/log-batch.
const METRICS_PER_CALL: usize = 1000;
const PARAMS_PER_CALL: usize = 100;
/// MLflow refuses longer param values (and with them the whole batch).
const PARAM_VALUE_MAX: usize = 6000;

/// Accepts http(s) tracking servers only: file stores and "databricks" need MLflow's own client.
pub(super) fn check_uri(uri: &str) -> Result<String, TrackingError> {
    let base = uri.trim().trim_end_matches('/');
    let host = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("https://"));
    match host {
        Some(h) if !h.is_empty() => Ok(base.to_string()),
        _ => Err(TrackingError::UnsupportedMlflowUri { uri: uri.into() }),
    }
}

struct Client {
    agent: ureq::Agent,
    base: String,
    auth: Option<String>,
    /// Off while the server is known to be down: one try per probe keeps probes cheap.
    retry: bool,
}

// The closures return ureq 2's own (large) error type, which this code cannot shrink.
#[allow(clippy::result_large_err)]
impl Client {
    fn new(base: String) -> Client {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        // The same variables MLflow's Python client reads.
        let auth = match (
            env("MLFLOW_TRACKING_TOKEN"),
            env("MLFLOW_TRACKING_USERNAME"),
        ) {
            (Some(token), _) => Some(format!("Bearer {token}")),
            (None, Some(user)) => {
                let pass = env("MLFLOW_TRACKING_PASSWORD").unwrap_or_default();
                Some(format!(
                    "Basic {}",
                    base64(format!("{user}:{pass}").as_bytes())
                ))
            }
            _ => None,
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(READ_TIMEOUT)
            .build();
        Client {
            agent,
            base,
            auth,
            retry: true,
        }
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let req = self.agent.request(method, url);
        match &self.auth {
            Some(a) => req.set("Authorization", a),
            None => req,
        }
    }

    fn post(&self, endpoint: &str, body: &Value) -> Result<Value, TrackingError> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.base);
        let resp = self.send(&url, || self.request("POST", &url).send_json(body))?;
        read_json(&url, resp)
    }

    fn get(&self, endpoint: &str, query: &[(&str, &str)]) -> Result<Value, TrackingError> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.base);
        let resp = self.send(&url, || {
            let req = self.request("GET", &url);
            query.iter().fold(req, |r, (k, v)| r.query(k, v)).call()
        })?;
        read_json(&url, resp)
    }

    /// Streams one file to the server's artifact proxy.
    fn put_file(&self, url: &str, path: &Path) -> Result<(), TrackingError> {
        let io_err = |source| TrackingError::ArtifactIo {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io_err)?.len().to_string();
        self.send(url, || {
            let file = std::fs::File::open(path)?;
            // An explicit length avoids chunked encoding, which some proxies refuse.
            self.request("PUT", url)
                .set("Content-Length", &len)
                .send(file)
        })
        .map(drop)
    }

    /// Runs `call`, retrying connection errors, 429 and 5xx after 0.5 s, 1 s and 2 s
    /// (unless `retry` is off).
    fn send(
        &self,
        url: &str,
        mut call: impl FnMut() -> Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response, TrackingError> {
        let mut delays = RETRY_DELAYS_MS.iter();
        loop {
            let err = match call() {
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(status, resp)) => {
                    let body = resp.into_string().unwrap_or_default();
                    // MLflow answers {"error_code": ..., "message": ...}.
                    let message = serde_json::from_str::<Value>(&body)
                        .ok()
                        .and_then(|v| v["message"].as_str().map(str::to_string))
                        .unwrap_or(body);
                    TrackingError::MlflowRejected {
                        url: url.into(),
                        status,
                        message: message.chars().take(500).collect(),
                    }
                }
                Err(ureq::Error::Transport(t)) => {
                    // Transport's Display repeats the URL with its query: keep only the cause.
                    let cause = std::error::Error::source(&t).map(|c| format!(": {c}"));
                    let detail = format!("{}{}", t.kind(), cause.unwrap_or_default());
                    TrackingError::MlflowUnreachable {
                        url: url.into(),
                        detail,
                    }
                }
            };
            match delays.next() {
                Some(ms) if self.retry && is_transient(&err) => {
                    std::thread::sleep(Duration::from_millis(*ms))
                }
                _ => return Err(err),
            }
        }
    }
}

fn read_json(url: &str, resp: ureq::Response) -> Result<Value, TrackingError> {
    resp.into_json()
        .map_err(|e| TrackingError::MlflowBadResponse {
            url: url.into(),
            detail: format!("not JSON: {e}"),
        })
}

/// Worth trying again later: the server may come back. Anything else is a refusal.
fn is_transient(e: &TrackingError) -> bool {
    match e {
        TrackingError::MlflowUnreachable { .. } => true,
        TrackingError::MlflowRejected { status, .. } => *status == 429 || *status >= 500,
        _ => false,
    }
}

fn text(v: &Value, pointer: &str, endpoint: &str) -> Result<String, TrackingError> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| TrackingError::MlflowBadResponse {
            url: endpoint.into(),
            detail: format!("no `{pointer}`"),
        })
}

struct Run {
    id: String,
    artifact_uri: String,
}

pub(super) struct MlflowSink {
    client: Client,
    experiment: String,
    run_name: String,
    tags: Vec<(String, String)>,
    run: Option<Run>,
    params: Vec<Value>,
    metrics: VecDeque<Value>,
    /// Oldest points pushed out of a full buffer.
    dropped: u64,
    /// Points the server answered 4xx for (never retried).
    refused: u64,
    /// Set when the run itself cannot be created or resumed (a 4xx): nothing more can work.
    disabled: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
    outage_warned: bool,
    artifacts_warned: bool,
}

impl MlflowSink {
    /// Never fails: a server that is down only delays run creation to a later call.
    pub(super) fn open(base: String, opts: &TrackingOptions) -> MlflowSink {
        let mut sink = MlflowSink {
            client: Client::new(base),
            experiment: opts.mlflow_experiment.clone(),
            run_name: opts.run_name.clone(),
            tags: opts
                .tags
                .iter()
                .map(|(k, v)| (sanitize_key(k), v.clone()))
                .collect(),
            run: None,
            params: Vec::new(),
            metrics: VecDeque::new(),
            dropped: 0,
            refused: 0,
            disabled: false,
            retry_at: None,
            backoff: BACKOFF_FIRST,
            outage_warned: false,
            artifacts_warned: false,
        };
        sink.flush(true);
        sink
    }

    pub(super) fn run_id(&self) -> Option<&str> {
        self.run.as_ref().map(|r| r.id.as_str())
    }

    pub(super) fn unsent(&self) -> u64 {
        self.dropped + self.refused + self.metrics.len() as u64
    }

    pub(super) fn log_params(&mut self, params: &[(String, String)]) {
        for (k, v) in params {
            let key = sanitize_key(k);
            // One batch may not hold the same key twice: the last value wins.
            self.params.retain(|p| p["key"] != key.as_str());
            let value: String = v.chars().take(PARAM_VALUE_MAX).collect();
            self.params.push(json!({ "key": key, "value": value }));
        }
        self.flush(false);
    }

    pub(super) fn log_metrics(&mut self, step: u64, wall_time_s: f64, values: &[(&str, f64)]) {
        let timestamp = (wall_time_s * 1000.0) as i64;
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        for &(key, value) in values {
            if self.metrics.len() >= MAX_BUFFERED {
                self.metrics.pop_front();
                self.dropped += 1;
            }
            self.metrics.push_back(json!({
                "key": sanitize_key(key),
                "value": metric_value(value),
                "timestamp": timestamp,
                "step": step,
            }));
        }
        self.flush(false);
    }

    /// Uploads the files under `dir`, keeping their relative paths, when the run's artifact
    /// URI is `mlflow-artifacts:` (served by this tracking server); otherwise warns once.
    pub(super) fn log_artifacts(&mut self, dir: &Path) {
        if !self.flush(true) {
            warn(format_args!(
                "artifacts in {} not uploaded: MLflow unavailable",
                dir.display()
            ));
            return;
        }
        let Some(run) = &self.run else { return };
        let Some(root) = served_artifact_path(&run.artifact_uri) else {
            if !std::mem::replace(&mut self.artifacts_warned, true) {
                warn(format_args!(
                    "MLflow run artifact location `{}` is not served by the tracking server \
                     (needs `mlflow server --serve-artifacts`); artifacts not uploaded",
                    run.artifact_uri
                ));
            }
            return;
        };
        let mut files = Vec::new();
        if let Err(source) = collect_files(dir, PathBuf::new(), &mut files) {
            let path = dir.to_path_buf();
            warn(TrackingError::ArtifactIo { path, source });
            return;
        }
        let (mut failed, mut first_err) = (0, None);
        for (i, rel) in files.iter().enumerate() {
            let rel_url: Vec<String> = rel
                .components()
                .map(|c| encode_segment(&c.as_os_str().to_string_lossy()))
                .collect();
            let url = format!(
                "{}/api/2.0/mlflow-artifacts/artifacts/{root}/{}",
                self.client.base,
                rel_url.join("/")
            );
            if let Err(e) = self.client.put_file(&url, &dir.join(rel)) {
                let down = is_transient(&e);
                failed += if down { files.len() - i } else { 1 };
                first_err.get_or_insert(e);
                if down {
                    break;
                }
            }
        }
        if let Some(e) = first_err {
            warn(format_args!(
                "{failed} of {} artifact files in {} not uploaded to MLflow; first error: {e}",
                files.len(),
                dir.display()
            ));
        }
    }

    /// Sends what is left, closes the run, and reports what never reached the server.
    pub(super) fn finish(&mut self, status: RunStatus) {
        if self.flush(true) {
            if let Some(run) = &self.run {
                let body = json!({ "run_id": run.id, "status": status.mlflow_name(), "end_time": now_ms() });
                if let Err(e) = self.client.post("runs/update", &body) {
                    warn(format_args!("MLflow run {} not closed: {e}", run.id));
                }
            }
        }
        let lost = self.dropped + self.metrics.len() as u64;
        let why = match self.disabled {
            true => "MLflow disabled for this run",
            false => "server unreachable",
        };
        for (n, what) in [
            (lost, format!("metric points not sent to MLflow ({why})")),
            (self.refused, "metric points refused by MLflow".into()),
            (
                self.params.len() as u64,
                format!("params not sent to MLflow ({why})"),
            ),
        ] {
            if n > 0 {
                warn(format_args!("{n} {what}"));
            }
        }
    }

    /// Tries to send the buffers unless backing off (`force` ignores the backoff).
    /// Returns whether the run exists and everything buffered was handled.
    fn flush(&mut self, force: bool) -> bool {
        if self.disabled || (!force && self.retry_at.is_some_and(|t| Instant::now() < t)) {
            return false;
        }
        self.client.retry = !self.outage_warned;
        match self.try_flush() {
            Ok(()) => {
                if std::mem::take(&mut self.outage_warned) {
                    warn("MLflow server reachable again; buffered metrics sent");
                }
                self.retry_at = None;
                self.backoff = BACKOFF_FIRST;
                true
            }
            Err(e) if is_transient(&e) => {
                if !std::mem::replace(&mut self.outage_warned, true) {
                    warn(format_args!(
                        "{e}; buffering metrics, next try in {} s",
                        self.backoff.as_secs()
                    ));
                }
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                false
            }
            Err(e) => {
                warn(format_args!("MLflow disabled for this run: {e}"));
                self.disabled = true;
                false
            }
        }
    }

    fn try_flush(&mut self) -> Result<(), TrackingError> {
        let run_id = self.ensure_run()?;
        while !self.params.is_empty() {
            let n = self.params.len().min(PARAMS_PER_CALL);
            let body = json!({ "run_id": run_id, "params": &self.params[..n] });
            match self.client.post("runs/log-batch", &body) {
                Err(e) if is_transient(&e) => return Err(e),
                // E.g. a resumed run whose params changed: MLflow keeps the first values.
                Err(e) => warn(format_args!("MLflow params not logged: {e}")),
                Ok(_) => {}
            }
            self.params.drain(..n);
        }
        while !self.metrics.is_empty() {
            let n = self.metrics.len().min(METRICS_PER_CALL);
            let batch: Vec<&Value> = self.metrics.range(..n).collect();
            let body = json!({ "run_id": run_id, "metrics": batch });
            match self.client.post("runs/log-batch", &body) {
                Err(e) if is_transient(&e) => return Err(e),
                Err(e) => {
                    if self.refused == 0 {
                        warn(format_args!("MLflow refused metric points: {e}"));
                    }
                    self.refused += n as u64;
                }
                Ok(_) => {}
            }
            self.metrics.drain(..n);
        }
        Ok(())
    }

    /// The run's id, creating the experiment and the run (or resuming one) on first success.
    fn ensure_run(&mut self) -> Result<String, TrackingError> {
        if let Some(run) = &self.run {
            return Ok(run.id.clone());
        }
        let experiment_id = self.experiment_id()?;
        let run = match self.find_resumable(&experiment_id)? {
            Some(run) => {
                let body = json!({ "run_id": run.id, "status": "RUNNING" });
                self.client.post("runs/update", &body)?;
                eprintln!("note: tracking: resuming MLflow run {}", run.id);
                run
            }
            None => {
                let mut tags = vec![json!({ "key": "mlflow.runName", "value": self.run_name })];
                tags.extend(
                    self.tags
                        .iter()
                        .map(|(k, v)| json!({ "key": k, "value": v })),
                );
                let body = json!({
                    "experiment_id": experiment_id,
                    "run_name": self.run_name,
                    "start_time": now_ms(),
                    "tags": tags,
                });
                parse_run(&self.client.post("runs/create", &body)?, "/run/info")?
            }
        };
        let id = run.id.clone();
        self.run = Some(run);
        Ok(id)
    }

    fn experiment_id(&self) -> Result<String, TrackingError> {
        let name = match self.experiment.as_str() {
            "" => "Default",
            n => n,
        };
        let by_name = || {
            let v = self
                .client
                .get("experiments/get-by-name", &[("experiment_name", name)])?;
            text(&v, "/experiment/experiment_id", "experiments/get-by-name")
        };
        match by_name() {
            Err(TrackingError::MlflowRejected { status: 404, .. }) => {
                match self
                    .client
                    .post("experiments/create", &json!({ "name": name }))
                {
                    Ok(v) => text(&v, "/experiment_id", "experiments/create"),
                    // Another process created it in between.
                    Err(TrackingError::MlflowRejected { status: 400, .. }) => by_name(),
                    Err(e) => Err(e),
                }
            }
            other => other,
        }
    }

    /// The newest RUNNING (crashed) or KILLED run of the experiment with our run name and all
    /// our tags: resuming training continues it rather than creating a twin. FINISHED and
    /// FAILED runs are never reopened.
    fn find_resumable(&self, experiment_id: &str) -> Result<Option<Run>, TrackingError> {
        let name = &self.run_name;
        // MLflow's filter grammar has no escapes: pick a quote the name does not contain.
        let quoted = match (name.contains('\''), name.contains('"')) {
            _ if name.is_empty() => return Ok(None),
            (false, _) => format!("'{name}'"),
            (true, false) => format!("\"{name}\""),
            (true, true) => return Ok(None),
        };
        let body = json!({
            "experiment_ids": [experiment_id],
            "filter": format!("attributes.run_name = {quoted}"),
            "run_view_type": "ACTIVE_ONLY",
            "max_results": 100,
            "order_by": ["attributes.start_time DESC"],
        });
        let found = self.client.post("runs/search", &body)?;
        let runs = found["runs"].as_array().map_or(&[][..], Vec::as_slice);
        for run in runs {
            let status = run.pointer("/info/status").and_then(Value::as_str);
            let tags = run.pointer("/data/tags").and_then(Value::as_array);
            let has = |k: &str, v: &str| {
                tags.is_some_and(|t| t.iter().any(|t| t["key"] == k && t["value"] == v))
            };
            if matches!(status, Some("RUNNING" | "KILLED"))
                && self.tags.iter().all(|(k, v)| has(k, v))
            {
                return parse_run(run, "/info").map(Some);
            }
        }
        Ok(None)
    }
}

fn parse_run(v: &Value, info: &str) -> Result<Run, TrackingError> {
    Ok(Run {
        id: text(v, &format!("{info}/run_id"), "runs")?,
        artifact_uri: text(v, &format!("{info}/artifact_uri"), "runs").unwrap_or_default(),
    })
}

/// `mlflow-artifacts:/1/<run>/artifacts` (or `mlflow-artifacts://host/1/...`) → `1/<run>/artifacts`.
fn served_artifact_path(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("mlflow-artifacts:")?;
    let path = match rest.strip_prefix("//") {
        Some(with_host) => with_host.split_once('/').map_or("", |(_, p)| p),
        None => rest,
    };
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(encode_segment)
        .collect();
    Some(segments.join("/"))
}

/// Regular files under `dir`, as paths relative to the walk's root, sorted. Symlinked
/// directories are skipped (no cycles); symlinked files are followed.
fn collect_files(dir: &Path, rel: PathBuf, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries = std::fs::read_dir(dir.join(&rel))?.collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let rel = rel.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect_files(dir, rel, out)?;
        } else if kind.is_file() || (kind.is_symlink() && entry.path().is_file()) {
            out.push(rel);
        }
    }
    Ok(())
}

/// MLflow refuses names outside this set (and the whole batch with them).
fn sanitize_key(key: &str) -> String {
    let ok = |c: char| c.is_alphanumeric() || "_-. :/".contains(c);
    key.chars().map(|c| if ok(c) { c } else { '_' }).collect()
}

/// MLflow stores NaN as NaN and ±inf as ±f64::MAX; JSON carries them as protobuf's strings.
fn metric_value(v: f64) -> Value {
    match v {
        v if v.is_finite() => json!(v),
        v if v.is_nan() => json!("NaN"),
        v if v > 0.0 => json!("Infinity"),
        _ => json!("-Infinity"),
    }
}

fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

fn now_ms() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH);
    now.map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(sanitize_key("train/loss (avg)!"), "train/loss _avg__");
        assert_eq!(encode_segment("a b#?.txt"), "a%20b%23%3F.txt");
        assert_eq!(
            served_artifact_path("mlflow-artifacts:/1/abc/artifacts").as_deref(),
            Some("1/abc/artifacts")
        );
        assert_eq!(
            served_artifact_path("mlflow-artifacts://h:5000/1/abc/artifacts").as_deref(),
            Some("1/abc/artifacts")
        );
        assert_eq!(served_artifact_path("s3://bucket/1/abc"), None);
        assert_eq!(metric_value(f64::NAN), json!("NaN"));
        assert_eq!(metric_value(f64::NEG_INFINITY), json!("-Infinity"));
        assert!(check_uri("http://").is_err() && check_uri("file:///x").is_err());
        assert_eq!(
            check_uri(" https://m.example/ ").unwrap(),
            "https://m.example"
        );
    }
}
