//! A loss weighting per role, beyond λp / λr: system-prompt tokens carry no loss, user tokens a
//! little, responses fully. The weights apply to the tokenized data without re-tokenizing, and the
//! loss is normalised by the number of tokens with a non-zero weight, as WIT prescribes.
//!
//! `cargo run --release --example custom_role_weights [MODEL]`

mod common;

use peft_wit::data::{Batch, LossWeights, TokenKind};
use peft_wit::loss::{denominator, weighted_nll_sum, Normalization};
use peft_wit::model::decoder::ForwardContext;
use peft_wit::train::{prepare_data, TrainConfig};

fn main() -> anyhow::Result<()> {
    let model = std::env::args().nth(1);
    let base = common::load_base(model.as_deref())?;
    let cfg = TrainConfig {
        builtin_examples: 16,
        ..TrainConfig::default()
    };
    let data = prepare_data(&cfg, &base)?;
    let examples: Vec<_> = data.train.iter().take(4).collect();
    let kinds = |k: TokenKind| {
        examples
            .iter()
            .flat_map(|e| &e.kinds)
            .filter(|&&x| x == k)
            .count()
    };
    println!(
        "{} examples: {} system, {} user, {} response tokens",
        examples.len(),
        kinds(TokenKind::System),
        kinds(TokenKind::User),
        kinds(TokenKind::Response)
    );

    let settings = [
        (
            "standard (λp=0, λr=1)",
            LossWeights {
                prompt: 0.0,
                response: 1.0,
                system: None,
                user: None,
            },
        ),
        (
            "IM (λp=1, λr=1)",
            LossWeights {
                prompt: 1.0,
                response: 1.0,
                system: None,
                user: None,
            },
        ),
        (
            "system 0, user 0.1, response 1",
            LossWeights {
                prompt: 0.1,
                response: 1.0,
                system: Some(0.0),
                user: Some(0.1),
            },
        ),
    ];
    for (label, weights) in settings {
        let batch = Batch::new(&examples, &weights, base.pad_id());
        let denom = denominator(&batch, Normalization::TokenCount);
        let mut ctx = ForwardContext {
            no_grad: true,
            ..Default::default()
        };
        let (sum, _) = weighted_nll_sum(&base.decoder, &batch, &mut ctx)?;
        let loss = sum.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? / denom;
        println!("{label:<32} tokens with weight: {denom:>5}  loss {loss:.4}");
    }
    Ok(())
}
