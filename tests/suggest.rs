//! `peft-wit suggest` on the tiny model: its statistics against a hand count, and the registry's
//! evidence after a small sweep.

#[path = "util.rs"]
mod util;

use util::Dir;

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn close(value: &serde_json::Value, expected: f64) -> bool {
    value.as_f64().is_some_and(|v| (v - expected).abs() < 1e-9)
}

/// The tiny model's tokenizer has one token per byte plus the special `</s>`, and its chat
/// template renders each message as `<|role|>content</s>`, without a BOS. So a message costs
/// `len("<|role|>") + len(content) + 1` tokens, and an assistant answer's response tokens are its
/// content and its `</s>`: `len(content) + 1`; everything else is prompt.
#[test]
fn statistics_match_a_hand_count() {
    let dir = Dir::tiny();
    let rows = [
        // user 8+3+1, assistant 13 + response 2+1: prompt 25, response 3
        r#"{"messages": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "de"}]}"#,
        // user 8+11+1, assistant 13 + 2+1: prompt 33, response 3
        r#"{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]}"#,
        // two turns: 8+2+1, 13 + (2+1), 8+2+1, 13 + (3+1): 55 tokens, response 3+4 = 7, prompt 48;
        // over --max-seq-len 40, so the first 15 prompt tokens are cut: prompt 33, still 2 turns
        r#"{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a22"}]}"#,
        // user 8+2+1, assistant 13 + 4+1: prompt 24, response 5
        r#"{"messages": [{"role": "user", "content": "xy"}, {"role": "assistant", "content": "abcd"}]}"#,
        // a response of 40+1 tokens alone exceeds 40: dropped as too long
        &format!(
            r#"{{"messages": [{{"role": "user", "content": "z"}}, {{"role": "assistant", "content": "{}"}}]}}"#,
            "r".repeat(40)
        ),
    ];
    let data = dir.write("hand.jsonl", &(rows.join("\n") + "\n"));
    let json = dir.path().join("suggest.json");
    let out = dir
        .cmd_with_model(&["suggest", "--max-seq-len", "40", "--data"])
        .arg(&data)
        .arg("--json")
        .arg(&json)
        .stdout();
    let r = read_json(&json);
    let s = &r["stats"];
    assert_eq!(s["examples"], 4, "{out}");
    assert_eq!(s["rows"]["rows"], 5, "{out}");
    assert_eq!(s["rows"]["truncated"], 1, "{out}");
    assert_eq!(s["rows"]["dropped_too_long"], 1, "{out}");
    assert_eq!(s["multi_turn"], 1, "{out}");
    // prompts 25, 33, 33, 24; responses 3, 3, 7, 5
    let p = &s["prompt_tokens"];
    assert_eq!(p["total"], 115, "{out}");
    assert!(close(&p["mean"], 28.75) && close(&p["median"], 29.0) && close(&p["p90"], 33.0));
    let q = &s["response_tokens"];
    assert_eq!(q["total"], 18, "{out}");
    assert!(close(&q["mean"], 4.5) && close(&q["median"], 4.0) && close(&q["p90"], 7.0));
    assert!(close(&s["ratio_of_totals"], 115.0 / 18.0), "{s}");
    let ratio_mean = (25.0 / 3.0 + 33.0 / 3.0 + 33.0 / 7.0 + 24.0 / 5.0) / 4.0;
    assert!(close(&s["ratio_mean"], ratio_mean), "{s}");
    // The printed report says the same.
    assert!(
        out.contains("5 read, 4 kept as examples; 1 truncated"),
        "{out}"
    );
    assert!(out.contains("1 of 4 (25.0%)"), "{out}");
    assert!(out.contains("6.39 of totals, 7.21 mean"), "{out}");
    // Long prompts (ratio 6.39 > 1 and ≥ 3) and small data (4 < 5000), no registry: 0.2 + 4 x 0.1.
    assert!(
        out.contains("λp +0.1 because prompt/response token ratio = 6.39 > 1"),
        "{out}"
    );
    assert!(out.contains("λp +0.1 because examples = 4 < 5000"), "{out}");
    assert!(out.contains("Suggested start: λp = 0.6, λr = 0.8"), "{out}");
    assert!(out.contains("not an answer"), "{out}");
    assert!(out.contains("no registry yet"), "{out}");
    assert!(
        out.contains("--max-seq-len 40 --prompt-weights 0.4,0.6,0.8 --response-weights 0.6,0.8,1"),
        "{out}"
    );
    assert_eq!(
        r["suggestion"]["grid_prompt_weights"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert!(!dir.registry().exists(), "suggest created a registry");
}

#[test]
fn a_past_sweep_becomes_evidence_that_moves_the_suggestion() {
    let dir = Dir::tiny();
    let before_json = dir.path().join("before.json");
    dir.cmd_with_model(&["suggest", "--data"])
        .arg(dir.data())
        .arg("--json")
        .arg(&before_json)
        .stdout();
    let before = read_json(&before_json)["suggestion"].clone();
    assert!(before["evidence"].as_array().unwrap().is_empty());

    dir.sweep("0,1")
        .args(["--sweep-name", "tiny-grid", "--quiet"])
        .all_output();

    let after_json = dir.path().join("after.json");
    let out = dir
        .cmd_with_model(&["suggest", "--data"])
        .arg(dir.data())
        .arg("--json")
        .arg(&after_json)
        .stdout();
    assert!(out.contains("sweep `tiny-grid`: 32 examples"), "{out}");
    let after = read_json(&after_json)["suggestion"].clone();
    let evidence = &after["evidence"][0];
    assert_eq!(evidence["sweep"]["name"], "tiny-grid", "{after}");
    assert_eq!(evidence["sweep"]["finished_cells"], 2, "{after}");
    // The same data: similarity 1, as much weight as the rule.
    assert!(close(&evidence["similarity"], 1.0), "{after}");
    assert!(close(&evidence["share"], 0.5), "{after}");
    let best_p = evidence["sweep"]["best_prompt_weight"].as_f64().unwrap();
    let p = |s: &serde_json::Value| s["prompt_weight"].as_f64().unwrap();
    assert!(
        (p(&after) - best_p).abs() < (p(&before) - best_p).abs(),
        "before {before}\nafter {after}"
    );
    let r = |s: &serde_json::Value| s["response_weight"].as_f64().unwrap();
    assert!(r(&after) > r(&before), "before {before}\nafter {after}");
}
