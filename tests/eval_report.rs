//! The evaluation report: JSON shape, CSV, and a self-contained HTML page that renders in
//! headless Chromium (skipped, loudly, when no Chromium is installed).

use std::collections::BTreeMap;

use peft_wit::eval::{AdapterResult, EvalReport, ScoredGeneration};

fn report() -> EvalReport {
    let result = |name: &str, loss: f64, em: f64| AdapterResult {
        name: name.into(),
        metrics: BTreeMap::from([
            ("response_loss".to_string(), loss),
            ("response_ppl".to_string(), loss.exp()),
            ("exact_match".to_string(), em),
        ]),
        per_template: BTreeMap::new(),
        generations: vec![ScoredGeneration {
            prompt: "Sort <b>these</b>".into(),
            reference: "a b".into(),
            output: format!("{name} says a b"),
            exact_match: false,
        }],
        seconds: 1.0,
    };
    EvalReport {
        model: "tiny".into(),
        data: "builtin".into(),
        examples: 3,
        templates: vec!["chat".into()],
        base_load_seconds: 0.5,
        adapters: vec![
            result("base", 2.0, 0.0),
            result("wit-p0.2-r0.8", 1.25, 0.5),
            result("standard", 1.5, 0.75),
        ],
    }
}

#[test]
fn json_and_csv_carry_every_adapter_and_metric() {
    let r = report();
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    let adapters = json["adapters"].as_array().unwrap();
    assert_eq!(adapters[0]["name"], "base");
    assert_eq!(adapters[1]["metrics"]["response_loss"], 1.25);
    assert!(adapters[2]["metrics"]["response_ppl"].as_f64().unwrap() > 4.0);
    let csv = r.to_csv();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "name,response_loss,response_ppl,exact_match");
    assert!(lines[2].starts_with("wit-p0.2-r0.8,1.25,"));
    // Lower loss is better, higher exact match is better.
    assert_eq!(r.best("response_loss"), Some(1));
    assert_eq!(r.best("exact_match"), Some(2));
    let rows = r.table_rows(&["response_loss".into(), "exact_match".into()]);
    assert!(rows[1][1].ends_with(" *") && rows[2][2].ends_with(" *") && !rows[0][1].ends_with('*'));
}

#[test]
fn html_report_is_self_contained_and_renders_in_headless_chromium() {
    let html = report().to_html();
    assert!(html.contains("<table id=\"metrics\">") && html.contains("<svg"));
    assert!(
        !html.contains("http://")
            || html
                .matches("http://")
                .all(|_| html.contains("xmlns=\"http://www.w3.org/2000/svg\""))
    );
    assert!(
        !html.contains("<script src") && !html.contains("<link"),
        "no external resources"
    );
    assert!(
        html.contains("Sort &lt;b&gt;these&lt;/b&gt;"),
        "prompts are escaped"
    );
    let Some(chromium) = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    else {
        eprintln!("SKIPPED: no Chromium installed; the HTML rendering check needs `apt-get install chromium`");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let page = tmp.path().join("report.html");
    std::fs::write(&page, &html).unwrap();
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ])
        .arg(format!(
            "--user-data-dir={}",
            tmp.path().join("profile").display()
        ))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("wit-p0.2-r0.8") && dom.contains("class=\"best\"") && dom.contains("<svg"),
        "rendered DOM: {dom:.500}"
    );
}
