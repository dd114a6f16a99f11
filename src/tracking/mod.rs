//! Experiment tracking: mirrors the trainer's metrics (already written to metrics.jsonl) to
//! TensorBoard event files and/or an MLflow tracking server. Tracking must never stop training,
//! so once [`Tracker::open`] has accepted the configuration every failure becomes a one-line
//! warning on stderr and the run goes on.

mod mlflow;
mod tensorboard;

pub use tensorboard::{masked_crc32c, proto, EventWriter};

use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where a run's metrics go, beside metrics.jsonl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    Tensorboard,
    Mlflow,
}

impl ReportTo {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportTo::Tensorboard => "tensorboard",
            ReportTo::Mlflow => "mlflow",
        }
    }
}

impl std::fmt::Display for ReportTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReportTo {
    type Err = TrackingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tensorboard" => Ok(ReportTo::Tensorboard),
            "mlflow" => Ok(ReportTo::Mlflow),
            _ => Err(TrackingError::UnknownReportTo {
                value: s.trim().to_string(),
            }),
        }
    }
}

/// Parses a `--report-to` list such as `"tensorboard,mlflow"`. `""` and `"none"` mean no sink;
/// duplicates are removed, first occurrence wins the order.
pub fn parse_report_to(list: &str) -> Result<Vec<ReportTo>, TrackingError> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim) {
        if item.is_empty() || item.eq_ignore_ascii_case("none") {
            continue;
        }
        let r: ReportTo = item.parse()?;
        if !out.contains(&r) {
            out.push(r);
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Default)]
pub struct TrackingOptions {
    pub report_to: Vec<ReportTo>,
    /// The run's event-file directory (`<registry>/<name>/tb` or `--tensorboard-dir/<name>`).
    pub tensorboard_dir: PathBuf,
    /// Falls back to `MLFLOW_TRACKING_URI` when `None` (read in [`Tracker::open`]).
    pub mlflow_tracking_uri: Option<String>,
    /// Experiment name, created if missing; empty means MLflow's "Default" experiment.
    pub mlflow_experiment: String,
    /// Adapter name; also the MLflow run name used to find a run to resume.
    pub run_name: String,
    /// Run tags, e.g. ("peft_wit.sweep", "grid"); a resumed MLflow run must carry all of them.
    pub tags: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Finished,
    Failed,
    Killed,
}

impl RunStatus {
    fn mlflow_name(self) -> &'static str {
        match self {
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    #[error("unknown --report-to value `{value}` (valid: tensorboard, mlflow, none)")]
    UnknownReportTo { value: String },
    #[error("--report-to tensorboard needs a tensorboard directory")]
    MissingTensorboardDir,
    #[error("cannot write TensorBoard events in {}: {source}", path.display())]
    TensorboardIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--report-to mlflow needs a tracking URI: set MLFLOW_TRACKING_URI or --mlflow-tracking-uri"
    )]
    MissingMlflowUri,
    #[error("MLflow tracking URI `{uri}` is not supported: peft-wit talks to http(s):// tracking servers only")]
    UnsupportedMlflowUri { uri: String },
    #[error("MLflow server unreachable at {url}: {detail}")]
    MlflowUnreachable { url: String, detail: String },
    #[error("MLflow server refused {url} (HTTP {status}): {message}")]
    MlflowRejected {
        url: String,
        status: u16,
        message: String,
    },
    #[error("unexpected MLflow answer from {url}: {detail}")]
    MlflowBadResponse { url: String, detail: String },
    #[error("cannot read artifact {}: {source}", path.display())]
    ArtifactIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One warning line on stderr; the single place that decides the prefix.
pub(crate) fn warn(msg: impl std::fmt::Display) {
    eprintln!("warning: tracking: {msg}");
}

/// All the sinks of one run. After `open`, no method fails or panics: problems are reported
/// as warnings and the affected sink is skipped or buffered.
pub struct Tracker {
    tb: Option<EventWriter>,
    mlflow: Option<mlflow::MlflowSink>,
    finished: bool,
}

impl Tracker {
    /// Opens the requested sinks. Errors only on configuration the user must fix before training
    /// (unwritable TensorBoard dir, MLflow without an http(s) URI); an MLflow server that is down
    /// is not an error: the run is created, and metrics sent, once it answers.
    pub fn open(opts: &TrackingOptions) -> Result<Tracker, TrackingError> {
        let mut tracker = Tracker::disabled();
        // Validate the MLflow URI before creating any file, so a typo leaves nothing behind.
        let mlflow_uri = if opts.report_to.contains(&ReportTo::Mlflow) {
            let uri = opts
                .mlflow_tracking_uri
                .clone()
                .or_else(|| std::env::var("MLFLOW_TRACKING_URI").ok())
                .filter(|u| !u.trim().is_empty())
                .ok_or(TrackingError::MissingMlflowUri)?;
            Some(mlflow::check_uri(&uri)?)
        } else {
            None
        };
        if opts.report_to.contains(&ReportTo::Tensorboard) {
            if opts.tensorboard_dir.as_os_str().is_empty() {
                return Err(TrackingError::MissingTensorboardDir);
            }
            tracker.tb = Some(EventWriter::create(&opts.tensorboard_dir)?);
        }
        if let Some(uri) = mlflow_uri {
            tracker.mlflow = Some(mlflow::MlflowSink::open(uri, opts));
        }
        Ok(tracker)
    }

    /// A tracker with no sinks: every call is a no-op.
    pub fn disabled() -> Tracker {
        Tracker {
            tb: None,
            mlflow: None,
            finished: false,
        }
    }

    /// MLflow: run params (a changed value on a resumed run is refused by MLflow: warned).
    /// TensorBoard: one text summary (tag "params", a markdown table, Text tab) at step 0.
    pub fn log_params(&mut self, params: &[(String, String)]) {
        if let Some(tb) = &mut self.tb {
            if let Err(e) = tb.write_params(params) {
                tb_failed(&mut self.tb, e);
            }
        }
        if let Some(m) = &mut self.mlflow {
            m.log_params(params);
        }
    }

    /// Logs `values` at one `step`; `wall_time_s` is Unix time in seconds.
    pub fn log_scalars(&mut self, step: u64, wall_time_s: f64, values: &[(&str, f64)]) {
        if values.is_empty() {
            return;
        }
        if let Some(tb) = &mut self.tb {
            if let Err(e) = tb.write_scalars(step, wall_time_s, values) {
                tb_failed(&mut self.tb, e);
            }
        }
        if let Some(m) = &mut self.mlflow {
            m.log_metrics(step, wall_time_s, values);
        }
    }

    /// MLflow: uploads every file under `dir` (recursively) as run artifacts, keeping the
    /// relative paths. TensorBoard has no artifacts: ignored there.
    pub fn log_artifacts(&mut self, dir: &Path) {
        if let Some(m) = &mut self.mlflow {
            m.log_artifacts(dir);
        }
    }

    /// Flushes every sink and closes the MLflow run with `status`. Later calls are no-ops.
    pub fn finish(&mut self, status: RunStatus) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.tb = None; // every event is already written; dropping closes the file
        if let Some(m) = &mut self.mlflow {
            m.finish(status);
        }
    }

    pub fn mlflow_run_id(&self) -> Option<&str> {
        self.mlflow.as_ref().and_then(|m| m.run_id())
    }

    /// Metric points that never reached MLflow (buffer overflow, server down, or refused).
    pub fn unsent_metrics(&self) -> u64 {
        self.mlflow.as_ref().map_or(0, |m| m.unsent())
    }

    /// The event file being written, if TensorBoard is on.
    pub fn tensorboard_file(&self) -> Option<&Path> {
        self.tb.as_ref().map(|t| t.path())
    }
}

/// A tracker dropped without `finish` (an early `?` return or a panic) marks the run FAILED,
/// so it does not stay RUNNING forever on the server.
impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.finished && (self.tb.is_some() || self.mlflow.is_some()) {
            self.finish(RunStatus::Failed);
        }
    }
}

fn tb_failed(tb: &mut Option<EventWriter>, e: std::io::Error) {
    if let Some(w) = tb.take() {
        warn(format_args!(
            "TensorBoard disabled for this run: cannot write {}: {e}",
            w.path().display()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_report_to_lists() {
        assert!(parse_report_to("").unwrap().is_empty());
        assert!(parse_report_to("none").unwrap().is_empty());
        assert_eq!(
            parse_report_to(" MLflow, tensorboard,mlflow ").unwrap(),
            vec![ReportTo::Mlflow, ReportTo::Tensorboard]
        );
        let err = parse_report_to("tensorboard,wandb")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`wandb`") && err.contains("tensorboard, mlflow"),
            "{err}"
        );
    }

    #[test]
    fn tracker_can_move_to_another_thread() {
        fn is_send<T: Send>() {}
        is_send::<Tracker>();
    }

    #[test]
    fn report_to_serde_is_lowercase() {
        let json = serde_json::to_string(&[ReportTo::Tensorboard, ReportTo::Mlflow]).unwrap();
        assert_eq!(json, r#"["tensorboard","mlflow"]"#);
        let back: Vec<ReportTo> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, vec![ReportTo::Tensorboard, ReportTo::Mlflow]);
    }

    #[test]
    fn open_rejects_bad_configuration() {
        let mut opts = TrackingOptions {
            report_to: vec![ReportTo::Mlflow],
            mlflow_tracking_uri: Some("./mlruns".into()),
            ..Default::default()
        };
        let err = Tracker::open(&opts).err().unwrap().to_string();
        assert!(err.contains("./mlruns"), "{err}");

        opts.report_to = vec![ReportTo::Tensorboard];
        assert!(matches!(
            Tracker::open(&opts),
            Err(TrackingError::MissingTensorboardDir)
        ));
        // A directory below a regular file can never be created, even as root.
        let file = std::env::temp_dir().join(format!("tracking-not-a-dir-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        opts.tensorboard_dir = file.join("tb");
        let err = Tracker::open(&opts).err().unwrap().to_string();
        assert!(err.contains(&*file.to_string_lossy()), "{err}");
        std::fs::remove_file(&file).unwrap();
    }
}
