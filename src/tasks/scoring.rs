//! Filters and metrics as lm-evaluation-harness applies them: regex extraction with Python's
//! `re.findall` semantics, `take_first`, exact match with `regexes_to_ignore` / `ignore_case` /
//! `ignore_punctuation`, multiple-choice accuracy, and the standard errors the harness reports
//! (sample standard deviation / √n; pooled across the subtasks of a group).

use fancy_regex::Regex;

use super::config::{FilterStep, MetricSpec};
use super::TaskError;

/// Compiles a Python regular expression (lookaround included).
pub fn compile(pattern: &str, task: &str) -> Result<Regex, TaskError> {
    Regex::new(pattern).map_err(|e| TaskError::Config {
        file: task.to_string(),
        message: format!("regex `{pattern}`: {e}"),
    })
}

/// Python's `re.findall`: whole matches without groups, the group with one, the groups (as a
/// list, `""` where one did not take part) with several.
pub fn findall(re: &Regex, text: &str) -> Vec<Vec<String>> {
    let groups = re.captures_len() - 1;
    let mut out = Vec::new();
    for caps in re.captures_iter(text) {
        let Ok(caps) = caps else { break };
        if groups == 0 {
            out.push(vec![caps
                .get(0)
                .map(|m| m.as_str().to_string())
                .unwrap_or_default()]);
        } else {
            out.push(
                (1..=groups)
                    .map(|g| {
                        caps.get(g)
                            .map(|m| m.as_str().to_string())
                            .unwrap_or_default()
                    })
                    .collect(),
            );
        }
    }
    out
}

/// A filter step compiled once per task.
pub enum CompiledStep {
    Regex {
        re: Regex,
        group_select: i64,
        fallback: String,
    },
    TakeFirst,
    Lowercase,
    Uppercase,
    RemoveWhitespace,
}

impl CompiledStep {
    pub fn new(step: &FilterStep, task: &str) -> Result<Self, TaskError> {
        Ok(match step {
            FilterStep::Regex {
                regex_pattern,
                group_select,
                fallback,
            } => CompiledStep::Regex {
                re: compile(regex_pattern, task)?,
                group_select: *group_select,
                fallback: fallback.clone(),
            },
            FilterStep::TakeFirst => CompiledStep::TakeFirst,
            FilterStep::Lowercase => CompiledStep::Lowercase,
            FilterStep::Uppercase => CompiledStep::Uppercase,
            FilterStep::RemoveWhitespace => CompiledStep::RemoveWhitespace,
        })
    }

    /// Applies the step to one document's responses (one per repeat; greedy runs have one).
    pub fn apply(&self, responses: Vec<String>) -> Vec<String> {
        match self {
            CompiledStep::Regex {
                re,
                group_select,
                fallback,
            } => responses
                .into_iter()
                .map(|r| {
                    let matches = findall(re, &r);
                    let n = matches.len() as i64;
                    let index = if *group_select < 0 {
                        n + group_select
                    } else {
                        *group_select
                    };
                    if matches.is_empty() {
                        return fallback.clone();
                    }
                    match usize::try_from(index).ok().and_then(|i| matches.get(i)) {
                        Some(groups) => match groups.iter().find(|g| !g.is_empty()) {
                            Some(g) => g.trim().to_string(),
                            None if groups.len() > 1 => fallback.clone(),
                            None => String::new(),
                        },
                        // Python raises IndexError here; the harness would crash, we fall back.
                        None => fallback.clone(),
                    }
                })
                .collect(),
            CompiledStep::TakeFirst => responses.into_iter().take(1).collect(),
            CompiledStep::Lowercase => responses.into_iter().map(|r| r.to_lowercase()).collect(),
            CompiledStep::Uppercase => responses.into_iter().map(|r| r.to_uppercase()).collect(),
            CompiledStep::RemoveWhitespace => responses
                .into_iter()
                .map(|r| r.trim_start().to_string())
                .collect(),
        }
    }
}

/// A named pipeline, compiled.
pub struct Pipeline {
    pub name: String,
    pub steps: Vec<CompiledStep>,
}

impl Pipeline {
    pub fn run(&self, response: &str) -> String {
        let mut values = vec![response.to_string()];
        for step in &self.steps {
            values = step.apply(values);
        }
        values.into_iter().next().unwrap_or_default()
    }
}

/// Exact match with the harness's options, compiled once.
pub struct ExactMatch {
    ignore: Vec<Regex>,
    ignore_case: bool,
    ignore_punctuation: bool,
    ignore_numbers: bool,
}

impl ExactMatch {
    pub fn new(spec: &MetricSpec, task: &str) -> Result<Self, TaskError> {
        Ok(Self {
            ignore: spec
                .regexes_to_ignore
                .iter()
                .map(|p| compile(p, task))
                .collect::<Result<_, _>>()?,
            ignore_case: spec.ignore_case,
            ignore_punctuation: spec.ignore_punctuation,
            ignore_numbers: spec.ignore_numbers,
        })
    }

    fn normalize(&self, text: &str) -> String {
        let mut s = text.to_string();
        for re in &self.ignore {
            s = re.replace_all(&s, "").into_owned();
        }
        if self.ignore_case {
            s = s.to_lowercase();
        }
        if self.ignore_punctuation {
            s.retain(|c| !c.is_ascii_punctuation());
        }
        if self.ignore_numbers {
            s.retain(|c| !c.is_ascii_digit());
        }
        s
    }

    pub fn score(&self, prediction: &str, reference: &str) -> f64 {
        f64::from(u8::from(
            self.normalize(prediction) == self.normalize(reference),
        ))
    }
}

/// Mean and the harness's standard error of a per-document metric (`None` below two items, the
/// harness's "N/A").
pub fn mean_stderr(values: &[f64]) -> (f64, Option<f64>) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, None);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, None);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, Some((var / n).sqrt()))
}

/// A group's score weighted by subtask size, and the pooled standard error
/// (`pooled_sample_stderr`); `parts` are `(score, stderr, size)`.
pub fn pooled(parts: &[(f64, Option<f64>, usize)]) -> (f64, Option<f64>) {
    let total: usize = parts.iter().map(|p| p.2).sum();
    if total == 0 {
        return (f64::NAN, None);
    }
    let score = parts.iter().map(|(s, _, n)| s * *n as f64).sum::<f64>() / total as f64;
    if parts.iter().any(|p| p.1.is_none()) || total <= parts.len() {
        return (score, None);
    }
    let var = parts
        .iter()
        .map(|(_, se, n)| (*n as f64 - 1.0) * se.unwrap_or(0.0).powi(2) * *n as f64)
        .sum::<f64>()
        / (total - parts.len()) as f64;
    (score, Some((var / total as f64).sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(steps: &[FilterStep]) -> Pipeline {
        Pipeline {
            name: "t".into(),
            steps: steps
                .iter()
                .map(|s| CompiledStep::new(s, "t").unwrap())
                .collect(),
        }
    }

    fn regex(p: &str, group_select: i64) -> FilterStep {
        FilterStep::Regex {
            regex_pattern: p.into(),
            group_select,
            fallback: "[invalid]".into(),
        }
    }

    #[test]
    fn gsm8k_filters() {
        let strict = pipeline(&[regex(r"#### (\-?[0-9\.\,]+)", 0), FilterStep::TakeFirst]);
        assert_eq!(strict.run("so 5\n#### 1,234.\nmore #### 7"), "1,234.");
        assert_eq!(strict.run("no marker 42"), "[invalid]");
        let flexible = pipeline(&[
            regex(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1),
            FilterStep::TakeFirst,
        ]);
        assert_eq!(flexible.run("He paid $12 then 3 more, so 15."), "15.");
        assert_eq!(flexible.run("x 7 y"), "7");
        assert_eq!(flexible.run("none"), "[invalid]");
    }

    #[test]
    fn bbh_lookaround_filter() {
        let get = pipeline(&[
            regex(r"(?<=the answer is )(.*)(?=.)", 0),
            FilterStep::TakeFirst,
        ]);
        assert_eq!(get.run("Step one. So the answer is (B)."), "(B)");
        assert_eq!(get.run("So the answer is True.\nQ"), "True");
        assert_eq!(get.run("I do not know"), "[invalid]");
    }

    #[test]
    fn exact_match_options() {
        let spec = MetricSpec {
            metric: "exact_match".into(),
            ignore_case: true,
            ignore_punctuation: false,
            ignore_numbers: false,
            regexes_to_ignore: vec![
                ",".into(),
                r"\$".into(),
                "(?s).*#### ".into(),
                r"\.$".into(),
            ],
        };
        let em = ExactMatch::new(&spec, "gsm8k").unwrap();
        assert_eq!(em.score("1,234.", "Work...\n#### 1234"), 1.0);
        assert_eq!(em.score("$18", "so\n#### 18"), 1.0);
        assert_eq!(em.score("19", "#### 18"), 0.0);
        let plain = ExactMatch::new(
            &MetricSpec {
                regexes_to_ignore: vec![],
                ignore_case: false,
                ignore_punctuation: true,
                ..spec
            },
            "t",
        )
        .unwrap();
        assert_eq!(plain.score("(A)", "A"), 1.0);
        assert_eq!(plain.score("a", "A"), 0.0);
    }

    #[test]
    fn standard_errors() {
        let (m, se) = mean_stderr(&[1.0, 0.0, 1.0, 1.0]);
        assert_eq!(m, 0.75);
        // sample std = 0.5, / sqrt(4)
        assert!((se.unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(mean_stderr(&[1.0]).1, None);
        // Pooled over two equal halves of the same data: the stderr of the concatenation,
        // as the harness's formula approximates.
        let a = [1.0, 0.0, 1.0, 1.0];
        let b = [0.0, 0.0, 1.0, 0.0];
        let (ma, sa) = mean_stderr(&a);
        let (mb, sb) = mean_stderr(&b);
        let (score, se) = pooled(&[(ma, sa, 4), (mb, sb, 4)]);
        assert_eq!(score, 0.5);
        let expected =
            ((3.0 * sa.unwrap().powi(2) * 4.0 + 3.0 * sb.unwrap().powi(2) * 4.0) / 6.0 / 8.0f64)
                .sqrt();
        assert!((se.unwrap() - expected).abs() < 1e-12);
    }
}
