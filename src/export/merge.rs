//! `W' = W + scale·B·A`, both for files (one tensor at a time, in f32) and in memory (the
//! decoder's projections swapped for merged dense weights, with the originals kept so that
//! switching back is bit-exact rather than a lossy subtraction).

use candle_core::{DType, Device, Tensor};

use super::check_finite;
use crate::lora::{LoraAdapter, LoraPair};
use crate::model::config::{module_path, PROJECTIONS};
use crate::model::Decoder;
use crate::model::FrozenWeight;
use crate::{Error, Result};

/// The merged `[out, in]` weight in f32 on `device`, checked finite. `name` is used in errors.
pub fn merged_weight(
    weight: &FrozenWeight,
    pair: Option<&LoraPair>,
    name: &str,
    device: &Device,
) -> Result<Tensor> {
    let w = weight.to_dense(DType::F32, device)?;
    let merged = match pair {
        None => w,
        Some(pair) => {
            let a = pair.a.as_tensor().to_device(device)?.to_dtype(DType::F32)?;
            let b = pair.b.as_tensor().to_device(device)?.to_dtype(DType::F32)?;
            let delta = (b.matmul(&a)? * pair.scale)?;
            if delta.dims() != w.dims() {
                return Err(Error::ShapeMismatch {
                    name: name.to_string(),
                    expected: w.dims().to_vec(),
                    actual: delta.dims().to_vec(),
                });
            }
            (w + delta)?
        }
    };
    check_finite(name, &merged)?;
    Ok(merged)
}

/// Checks that `adapter` was made for a model shaped like `decoder`.
pub(crate) fn check_adapter_fits(decoder: &Decoder, adapter: &LoraAdapter) -> Result<()> {
    let mismatch = |message: String| Error::AdapterMismatch {
        path: Default::default(),
        message,
    };
    if adapter.num_layers() != decoder.blocks.len() {
        return Err(mismatch(format!(
            "the adapter has {} layers, the base model {} (adapter made for another base model?)",
            adapter.num_layers(),
            decoder.blocks.len()
        )));
    }
    for (layer, block) in decoder.blocks.iter().enumerate() {
        for (p, proj) in block.projections.iter().enumerate() {
            let Some(pair) = adapter.pair(layer, p) else {
                continue;
            };
            let (out, inp) = proj.weight.dims()?;
            let a = pair.a.as_tensor().dims2()?;
            let b = pair.b.as_tensor().dims2()?;
            if a.1 != inp || b.0 != out || a.0 != b.1 {
                return Err(mismatch(format!(
                    "{}: A {a:?} / B {b:?} do not fit a [{out}, {inp}] weight (adapter made for another base model?)",
                    module_path(layer, PROJECTIONS[p])
                )));
            }
        }
    }
    Ok(())
}

/// What [`merge_into`] replaced; hand it back to [`Unmerge::restore`] to undo the merge.
#[derive(Debug)]
#[must_use = "dropping it loses the way back to the unmerged weights"]
pub struct Unmerge {
    originals: Vec<(usize, usize, FrozenWeight)>,
}

impl Unmerge {
    /// Number of projections that were merged.
    pub fn len(&self) -> usize {
        self.originals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.originals.is_empty()
    }

    /// Puts the original frozen weights back (the same objects, so bit-exact).
    pub fn restore(self, decoder: &mut Decoder) {
        for (layer, p, weight) in self.originals {
            decoder.blocks[layer].projections[p].weight = weight;
        }
    }
}

/// Runs `f` on the base with `adapter` applied the fastest exact way: merged into a dense base
/// in place (no low-rank side path; the originals are put back bit-exactly afterwards, also when
/// `f` fails), or as a side path on a quantized base or when `side_path` is asked for.
pub fn with_adapter<T, E: From<crate::Error>>(
    base: &mut crate::model::BaseModel,
    adapter: &LoraAdapter,
    side_path: bool,
    f: impl FnOnce(&crate::model::BaseModel, Option<&LoraAdapter>) -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    if side_path || base.base_dtype == crate::model::BaseDType::Quantized {
        return f(base, Some(adapter));
    }
    let unmerge = merge_into(&mut base.decoder, adapter)?;
    let outcome = f(base, None);
    unmerge.restore(&mut base.decoder);
    outcome
}

/// Merges `adapter` into `decoder` for fast adapter-free generation. Adapted projections become
/// dense: in their own dtype for a dense base, in f32 for a quantized one (re-quantizing would
/// lose most of the update). Nothing is changed if any weight fails to merge.
pub fn merge_into(decoder: &mut Decoder, adapter: &LoraAdapter) -> Result<Unmerge> {
    check_adapter_fits(decoder, adapter)?;
    let device = decoder.device().clone();
    let mut merged = Vec::new();
    for (layer, block) in decoder.blocks.iter().enumerate() {
        for (p, proj) in block.projections.iter().enumerate() {
            let Some(pair) = adapter.pair(layer, p) else {
                continue;
            };
            let name = format!("{}.weight", module_path(layer, PROJECTIONS[p]));
            let w = merged_weight(&proj.weight, Some(pair), &name, &device)?;
            let w = match &proj.weight {
                FrozenWeight::Dense(t, _) => w.to_dtype(t.dtype())?,
                FrozenWeight::Quantized(_) => w,
            };
            merged.push((layer, p, FrozenWeight::dense(w)));
        }
    }
    let mut originals = Vec::with_capacity(merged.len());
    for (layer, p, weight) in merged {
        let slot = &mut decoder.blocks[layer].projections[p].weight;
        originals.push((layer, p, std::mem::replace(slot, weight)));
    }
    Ok(Unmerge { originals })
}

/// One tensor of a merged checkpoint, in Hugging Face layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Embed,
    InputNorm(usize),
    PostNorm(usize),
    Weight(usize, usize),
    Bias(usize, usize),
    FinalNorm,
    LmHead,
}

impl Slot {
    pub(crate) fn hf_name(self) -> String {
        match self {
            Self::Embed => "model.embed_tokens.weight".into(),
            Self::InputNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
            Self::PostNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            Self::Weight(l, p) => format!("{}.weight", module_path(l, PROJECTIONS[p])),
            Self::Bias(l, p) => format!("{}.bias", module_path(l, PROJECTIONS[p])),
            Self::FinalNorm => "model.norm.weight".into(),
            Self::LmHead => "lm_head.weight".into(),
        }
    }

    pub(crate) fn gguf_name(self) -> String {
        const GGUF: [&str; 7] = [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ];
        match self {
            Self::Embed => "token_embd.weight".into(),
            Self::InputNorm(l) => format!("blk.{l}.attn_norm.weight"),
            Self::PostNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            Self::Weight(l, p) => format!("blk.{l}.{}.weight", GGUF[p]),
            Self::Bias(l, p) => format!("blk.{l}.{}.bias", GGUF[p]),
            Self::FinalNorm => "output_norm.weight".into(),
            Self::LmHead => "output.weight".into(),
        }
    }

    pub(crate) fn is_norm(self) -> bool {
        matches!(
            self,
            Self::InputNorm(_) | Self::PostNorm(_) | Self::FinalNorm
        )
    }
}

/// The base (plus an optional adapter) seen as a list of merged tensors, produced one at a time
/// so that writers never hold a second dense copy of the whole model.
pub(crate) struct MergedTensors<'a> {
    pub decoder: &'a Decoder,
    pub adapter: Option<&'a LoraAdapter>,
}

impl<'a> MergedTensors<'a> {
    pub(crate) fn new(decoder: &'a Decoder, adapter: Option<&'a LoraAdapter>) -> Result<Self> {
        if let Some(adapter) = adapter {
            check_adapter_fits(decoder, adapter)?;
        }
        Ok(Self { decoder, adapter })
    }

    /// Hugging Face order: embeddings, each layer, final norm, then the head when untied.
    pub(crate) fn slots(&self) -> Vec<Slot> {
        let mut slots = vec![Slot::Embed];
        for (l, block) in self.decoder.blocks.iter().enumerate() {
            slots.push(Slot::InputNorm(l));
            for (p, proj) in block.projections.iter().enumerate() {
                slots.push(Slot::Weight(l, p));
                if proj.bias.is_some() {
                    slots.push(Slot::Bias(l, p));
                }
            }
            slots.push(Slot::PostNorm(l));
        }
        slots.push(Slot::FinalNorm);
        if !self.decoder.config.tie_word_embeddings {
            slots.push(Slot::LmHead);
        }
        slots
    }

    pub(crate) fn shape(&self, slot: Slot) -> Result<Vec<usize>> {
        let c = &self.decoder.config;
        Ok(match slot {
            Slot::Embed | Slot::LmHead => vec![c.vocab_size, c.hidden_size],
            Slot::InputNorm(_) | Slot::PostNorm(_) | Slot::FinalNorm => vec![c.hidden_size],
            Slot::Weight(l, p) => {
                let (o, i) = self.decoder.blocks[l].projections[p].weight.dims()?;
                vec![o, i]
            }
            Slot::Bias(l, p) => self.decoder.blocks[l].projections[p]
                .bias
                .as_ref()
                .map(|b| b.dims().to_vec())
                .unwrap_or_default(),
        })
    }

    /// The tensor in f32 on the CPU, merged and checked finite.
    pub(crate) fn tensor(&self, slot: Slot) -> Result<Tensor> {
        let d = self.decoder;
        let device = d.device();
        let name = slot.hf_name();
        let t = match slot {
            Slot::Embed => d.embed_tokens.to_dtype(DType::F32)?,
            Slot::InputNorm(l) => d.blocks[l].input_layernorm.to_dtype(DType::F32)?,
            Slot::PostNorm(l) => d.blocks[l].post_attention_layernorm.to_dtype(DType::F32)?,
            Slot::FinalNorm => d.norm.to_dtype(DType::F32)?,
            Slot::LmHead => d.lm_head.to_dense(DType::F32, device)?,
            Slot::Bias(l, p) => match &d.blocks[l].projections[p].bias {
                Some(b) => b.to_dtype(DType::F32)?,
                None => {
                    return Err(Error::MissingTensor {
                        name,
                        source_name: "the loaded model".into(),
                    })
                }
            },
            Slot::Weight(l, p) => {
                let pair = self.adapter.and_then(|a| a.pair(l, p));
                merged_weight(&d.blocks[l].projections[p].weight, pair, &name, device)?
            }
        };
        if !matches!(slot, Slot::Weight(..)) {
            check_finite(&name, &t)?;
        }
        Ok(t.to_device(&Device::Cpu)?.contiguous()?)
    }
}
