//! Generation-based scores against a reference answer: exact match, contains, ROUGE-L F1, and
//! an extracted final answer (GSM8K's `#### N`).

/// Lowercase, trim, collapse whitespace and strip trailing punctuation: exact match should not
/// fail on "Paris." vs "paris".
pub fn normalize(text: &str) -> String {
    let collapsed: Vec<&str> = text.split_whitespace().collect();
    collapsed
        .join(" ")
        .to_lowercase()
        .trim_end_matches(['.', '!', '?', ';', ','])
        .trim()
        .to_string()
}

pub fn exact_match(prediction: &str, reference: &str) -> bool {
    normalize(prediction) == normalize(reference)
}

pub fn contains(prediction: &str, reference: &str) -> bool {
    let r = normalize(reference);
    !r.is_empty() && normalize(prediction).contains(&r)
}

/// ROUGE-L F1 over whitespace tokens (lowercased).
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    let p: Vec<String> = prediction
        .split_whitespace()
        .map(str::to_lowercase)
        .collect();
    let r: Vec<String> = reference
        .split_whitespace()
        .map(str::to_lowercase)
        .collect();
    if p.is_empty() || r.is_empty() {
        return 0.0;
    }
    let mut dp = vec![vec![0usize; r.len() + 1]; p.len() + 1];
    for i in 1..=p.len() {
        for j in 1..=r.len() {
            dp[i][j] = if p[i - 1] == r[j - 1] {
                dp[i - 1][j - 1] + 1
            } else {
                dp[i - 1][j].max(dp[i][j - 1])
            };
        }
    }
    let lcs = dp[p.len()][r.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (prec, rec) = (lcs / p.len() as f64, lcs / r.len() as f64);
    2.0 * prec * rec / (prec + rec)
}

/// The final answer of a GSM8K-style text: what follows the last `####`, or else the last
/// number in the text; commas and `$` are dropped.
pub fn extract_answer(text: &str) -> Option<String> {
    let tail = match text.rfind("####") {
        Some(i) => &text[i + 4..],
        None => text,
    };
    let cleaned: String = tail.replace([',', '$'], "");
    let re = regex::Regex::new(r"-?\d+(?:\.\d+)?").ok()?;
    let found = if text.contains("####") {
        re.find(&cleaned)
    } else {
        re.find_iter(&cleaned).last()
    };
    found.map(|m| m.as_str().trim_end_matches(".0").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores() {
        assert!(exact_match("  Paris. ", "paris"));
        assert!(!exact_match("Paris is", "paris"));
        assert!(contains("The answer is Paris.", "Paris"));
        assert!((rouge_l("a b c d", "a c d") - 2.0 * 0.75 * 1.0 / 1.75).abs() < 1e-12);
        assert_eq!(rouge_l("", "a"), 0.0);
        assert_eq!(
            extract_answer("so 3+4 = 7\n#### 1,234").as_deref(),
            Some("1234")
        );
        assert_eq!(extract_answer("It is 12 then 15.").as_deref(), Some("15"));
        assert_eq!(extract_answer("none"), None);
    }
}
