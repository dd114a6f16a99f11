//! Writes event files with the Rust writer and reads them back with TensorBoard's own Python
//! loader (tests/helpers/read_tb_events.py, interpreter from PEFT_WIT_TEST_PYTHON).

mod common;

use peft_wit::tracking::{ReportTo, RunStatus, Tracker, TrackingOptions};
use std::collections::HashMap;
use std::process::Command;

type Series = HashMap<String, Vec<(u64, serde_json::Value)>>;

fn read_with_tensorboard(python: &str, dir: &std::path::Path) -> Series {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/helpers/read_tb_events.py"
    );
    let out = Command::new(python)
        .arg(script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "read_tb_events.py failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).expect("read_tb_events.py prints JSON")
}

fn f32s(points: &[(u64, f64)]) -> Vec<(u64, serde_json::Value)> {
    // TensorBoard scalars are f32: compare with the value after the same rounding.
    points
        .iter()
        .map(|&(s, v)| (s, serde_json::json!(v as f32 as f64)))
        .collect()
}

#[test]
fn tensorboard_reads_scalars_params_and_a_resumed_run() {
    let Some(python) = common::required_env("PEFT_WIT_TEST_PYTHON") else {
        return;
    };
    let root = common::temp_path("tb");
    let opts = TrackingOptions {
        report_to: vec![ReportTo::Tensorboard],
        tensorboard_dir: root.join("adapter-a"),
        run_name: "adapter-a".into(),
        ..Default::default()
    };

    let mut t = Tracker::open(&opts).expect("open");
    t.log_params(&[
        ("lr".into(), "0.0002".into()),
        ("target|modules".into(), "q_proj,v_proj".into()),
    ]);
    common::log_train_scalars(&mut t);
    t.log_scalars(2, 1.7e9 + 2.5, &[("train/grad_norm", f64::NAN)]);
    let first_file = t.tensorboard_file().expect("tensorboard on").to_path_buf();
    t.finish(RunStatus::Killed);

    // Resume from a checkpoint at step 3: a second file in the same directory logs 4..=6 again.
    let mut t = Tracker::open(&opts).expect("reopen");
    assert_ne!(t.tensorboard_file(), Some(first_file.as_path()));
    for step in 4..=6u64 {
        t.log_scalars(
            step,
            1.8e9 + step as f64,
            &[("train/loss", 10.0 + step as f64)],
        );
    }
    t.finish(RunStatus::Finished);

    let got = read_with_tensorboard(&python, &opts.tensorboard_dir);
    let loss = [
        (1, 1.0),
        (2, 0.5),
        (3, 1.0 / 3.0),
        (4, 14.0),
        (5, 15.0),
        (6, 16.0),
    ];
    assert_eq!(got["train/loss"], f32s(&loss));
    // The resume's SessionLog START at step 4 dropped the first file's orphaned lr points.
    assert_eq!(got["train/lr"], f32s(&[(1, 1e-4), (2, 2e-4), (3, 3e-4)]));
    assert_eq!(got["train/grad_norm"], vec![(2, serde_json::json!("nan"))]);
    let params = &got["params"];
    assert_eq!(params.len(), 1, "{params:?}");
    let text = params[0].1.as_str().expect("text summary");
    assert!(text.contains("| lr | 0.0002 |"), "{text}");
    assert!(
        text.contains(r"| target\|modules | q_proj,v_proj |"),
        "{text}"
    );

    let _ = std::fs::remove_dir_all(&root);
}
