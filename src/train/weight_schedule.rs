//! Loss weights that change during training (the WIT paper's future work: adaptive weighting).
//! A schedule is a pure function of the optimizer step, so a resumed run sees the same weight
//! at every step as an uninterrupted one, and gradient accumulation changes nothing: all the
//! micro-batches of one optimizer step share its weight, and the step's denominator counts the
//! tokens whose weight at that step is non-zero.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::config::fmt_weight;
use crate::{Error, Result};

/// How a loss weight moves from its start to its end value over training progress.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum WeightSchedule {
    /// The config's fixed weight (`prompt_weight` / `response_weight`).
    #[default]
    Constant,
    /// `linear:A->B`: A at the first optimizer step, B at the last, straight in between.
    Linear { from: f32, to: f32 },
    /// `cosine:A->B`: A at the first step, B at the last, along half a cosine.
    Cosine { from: f32, to: f32 },
    /// `step:A->B@F`: A while less than the fraction F of the steps is done, then B.
    Step { from: f32, to: f32, at: f32 },
}

impl WeightSchedule {
    pub fn is_constant(&self) -> bool {
        matches!(self, WeightSchedule::Constant)
    }

    /// The weight at optimizer step `step` (0-based) of `total`; `fixed` for a constant one.
    pub fn weight(&self, fixed: f32, step: usize, total: usize) -> f32 {
        // Progress through the steps: 0 at the first, 1 at the last.
        let t = if total <= 1 {
            0.0
        } else {
            (step.min(total - 1) as f64) / ((total - 1) as f64)
        };
        match *self {
            WeightSchedule::Constant => fixed,
            WeightSchedule::Linear { from, to } => {
                (from as f64 + (to as f64 - from as f64) * t) as f32
            }
            WeightSchedule::Cosine { from, to } => {
                let s = (1.0 - (std::f64::consts::PI * t).cos()) / 2.0;
                (from as f64 + (to as f64 - from as f64) * s) as f32
            }
            WeightSchedule::Step { from, to, at } => {
                // The share of training done before this step.
                let done = step as f64 / total.max(1) as f64;
                if done < at as f64 {
                    from
                } else {
                    to
                }
            }
        }
    }

    /// The first and last weights.
    pub fn ends(&self, fixed: f32) -> (f32, f32) {
        match *self {
            WeightSchedule::Constant => (fixed, fixed),
            WeightSchedule::Linear { from, to }
            | WeightSchedule::Cosine { from, to }
            | WeightSchedule::Step { from, to, .. } => (from, to),
        }
    }

    /// A short form for adapter names: `lin1to0`, `cos1to0.2`, `step1to0at0.5`.
    pub fn name_part(&self, fixed: f32) -> String {
        match *self {
            WeightSchedule::Constant => fmt_weight(fixed),
            WeightSchedule::Linear { from, to } => {
                format!("lin{}to{}", fmt_weight(from), fmt_weight(to))
            }
            WeightSchedule::Cosine { from, to } => {
                format!("cos{}to{}", fmt_weight(from), fmt_weight(to))
            }
            WeightSchedule::Step { from, to, at } => format!(
                "step{}to{}at{}",
                fmt_weight(from),
                fmt_weight(to),
                fmt_weight(at)
            ),
        }
    }

    fn check(self, spec: &str) -> Result<Self> {
        let (from, to) = self.ends(0.0);
        let bad = |m: &str| {
            Err(Error::InvalidArgument(format!(
                "weight schedule `{spec}`: {m}"
            )))
        };
        if [from, to].iter().any(|w| !w.is_finite() || *w < 0.0) {
            return bad("weights must be finite and non-negative");
        }
        if let WeightSchedule::Step { at, .. } = self {
            if !(at > 0.0 && at < 1.0) {
                return bad(
                    "the switch point after `@` must be a fraction strictly between 0 and 1",
                );
            }
        }
        Ok(self)
    }
}

impl std::fmt::Display for WeightSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            WeightSchedule::Constant => write!(f, "constant"),
            WeightSchedule::Linear { from, to } => {
                write!(f, "linear:{}->{}", fmt_weight(from), fmt_weight(to))
            }
            WeightSchedule::Cosine { from, to } => {
                write!(f, "cosine:{}->{}", fmt_weight(from), fmt_weight(to))
            }
            WeightSchedule::Step { from, to, at } => write!(
                f,
                "step:{}->{}@{}",
                fmt_weight(from),
                fmt_weight(to),
                fmt_weight(at)
            ),
        }
    }
}

impl std::str::FromStr for WeightSchedule {
    type Err = Error;

    /// `constant`, `linear:A->B`, `cosine:A->B` or `step:A->B@F`.
    fn from_str(spec: &str) -> Result<Self> {
        let text = spec.trim();
        let bad = || {
            Error::InvalidArgument(format!(
                "weight schedule `{spec}`: expected constant, linear:A->B, cosine:A->B or step:A->B@F (e.g. linear:1->0, step:0.5->0@0.5)"
            ))
        };
        if text == "constant" {
            return Ok(WeightSchedule::Constant);
        }
        let (kind, rest) = text.split_once(':').ok_or_else(bad)?;
        let num = |s: &str| s.trim().parse::<f32>().map_err(|_| bad());
        let (range, at) = match kind.trim() {
            "step" => {
                let (range, at) = rest.split_once('@').ok_or_else(bad)?;
                (range, Some(num(at)?))
            }
            "linear" | "cosine" => (rest, None),
            _ => return Err(bad()),
        };
        let (from, to) = range.split_once("->").ok_or_else(bad)?;
        let (from, to) = (num(from)?, num(to)?);
        let schedule = match (kind.trim(), at) {
            ("linear", _) => WeightSchedule::Linear { from, to },
            ("cosine", _) => WeightSchedule::Cosine { from, to },
            (_, Some(at)) => WeightSchedule::Step { from, to, at },
            _ => return Err(bad()),
        };
        schedule.check(spec)
    }
}

impl Serialize for WeightSchedule {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for WeightSchedule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_print_and_values() {
        let lin: WeightSchedule = "linear:1->0".parse().unwrap();
        assert_eq!(lin.to_string(), "linear:1->0");
        assert_eq!(lin.weight(9.0, 0, 5), 1.0);
        assert_eq!(lin.weight(9.0, 4, 5), 0.0);
        assert!((lin.weight(9.0, 2, 5) - 0.5).abs() < 1e-7);
        let cos: WeightSchedule = "cosine:0.2->1".parse().unwrap();
        assert!((cos.weight(0.0, 0, 11) - 0.2).abs() < 1e-7);
        assert!((cos.weight(0.0, 5, 11) - 0.6).abs() < 1e-6);
        assert!((cos.weight(0.0, 10, 11) - 1.0).abs() < 1e-7);
        let step: WeightSchedule = "step:1->0@0.5".parse().unwrap();
        assert_eq!(step.to_string(), "step:1->0@0.5");
        // 10 steps: steps 0-4 are the first half.
        assert_eq!(step.weight(0.0, 4, 10), 1.0);
        assert_eq!(step.weight(0.0, 5, 10), 0.0);
        assert_eq!(WeightSchedule::Constant.weight(0.3, 7, 10), 0.3);
        assert_eq!(lin.name_part(0.0), "lin1to0");
        assert_eq!(step.name_part(0.0), "step1to0at0.5");
        for bad in [
            "linear:1",
            "linear:a->0",
            "step:1->0",
            "step:1->0@1.5",
            "exp:1->0",
            "linear:-1->0",
        ] {
            assert!(bad.parse::<WeightSchedule>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&step).unwrap();
        assert_eq!(json, "\"step:1->0@0.5\"");
        assert_eq!(serde_json::from_str::<WeightSchedule>(&json).unwrap(), step);
    }
}
