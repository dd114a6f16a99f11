//! AdamW (PyTorch semantics, decoupled weight decay) with state that can be checkpointed: candle's
//! own AdamW keeps its moments private, so a resumed run could not continue bit for bit.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The optimizer over named vars (PEFT keys), so its state saves under stable names.
///
/// The moments of all vars live in two flat buffers and one step updates them with a handful of
/// whole-buffer ops instead of a dozen ops per var: on a GPU every op is a kernel launch, and the
/// hundreds of small LoRA factors made the per-var update a quarter of the step. Elementwise the
/// arithmetic is unchanged, so the result is bit for bit the per-var one.
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<(String, Var)>,
    /// Where each var's elements start in the flat buffers.
    offsets: Vec<usize>,
    /// First and second moments, flat: `[Σ numel]`.
    m: Tensor,
    v: Tensor,
    /// Number of updates taken.
    pub step: usize,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let mut offsets = Vec::with_capacity(vars.len());
        let mut total = 0;
        for (_, var) in &vars {
            offsets.push(total);
            total += var.elem_count();
        }
        let (dtype, device) = match vars.first() {
            Some((_, var)) => (var.dtype(), var.device().clone()),
            None => (candle_core::DType::F32, candle_core::Device::Cpu),
        };
        if let Some((key, _)) = vars
            .iter()
            .find(|(_, var)| var.dtype() != dtype || !var.device().same_device(&device))
        {
            return Err(Error::InvalidArgument(format!(
                "AdamW: `{key}` differs in dtype or device from the other parameters"
            )));
        }
        let m = Tensor::zeros(total, dtype, &device)?;
        let v = m.clone();
        Ok(Self {
            params,
            vars,
            offsets,
            m,
            v,
            step: 0,
        })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Var `i`'s slice of a flat buffer, in the var's shape.
    fn slice_of(&self, flat: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        let var = &self.vars[i].1;
        flat.narrow(0, self.offsets[i], var.elem_count())?
            .reshape(var.dims())
    }

    /// One update with `grads[i]` the gradient of `vars[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::InvalidArgument(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.vars.len()
            )));
        }
        let flat = grads
            .iter()
            .zip(&self.vars)
            .map(|(g, (key, var))| {
                if g.dims() != var.dims() {
                    return Err(Error::ShapeMismatch {
                        name: format!("gradient of {key}"),
                        expected: var.dims().to_vec(),
                        actual: g.dims().to_vec(),
                    });
                }
                Ok(g.flatten_all()?)
            })
            .collect::<Result<Vec<_>>>()?;
        self.step += 1;
        if flat.is_empty() {
            return Ok(());
        }
        let g = Tensor::cat(&flat, 0)?;
        let p = self.params;
        let t = self.step as i32;
        let bias1 = 1.0 - p.beta1.powi(t);
        let bias2 = 1.0 - p.beta2.powi(t);
        let m = ((&self.m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
        let v = ((&self.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
        let m_hat = (&m / bias1)?;
        let v_hat = (&v / bias2)?;
        let update = ((m_hat / (v_hat.sqrt()? + p.eps)?)? * lr)?;
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let theta = var.as_tensor().detach();
            let theta = if p.weight_decay > 0.0 {
                (&theta * (1.0 - lr * p.weight_decay))?
            } else {
                theta
            };
            var.set(&(theta - self.slice_of(&update, i)?)?)?;
        }
        self.m = m;
        self.v = v;
        Ok(())
    }

    /// Moments as named tensors (`m.<key>`, `v.<key>`) for a checkpoint.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.vars.len());
        for (i, (key, _)) in self.vars.iter().enumerate() {
            for (prefix, flat) in [("m", &self.m), ("v", &self.v)] {
                let t = self.slice_of(flat, i)?.contiguous()?;
                out.push((format!("{prefix}.{key}"), t));
            }
        }
        Ok(out)
    }

    /// Restores moments saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        let mut flat = [Vec::new(), Vec::new()];
        for (key, var) in &self.vars {
            for (prefix, parts) in ["m", "v"].iter().zip(flat.iter_mut()) {
                let name = format!("{prefix}.{key}");
                let t = tensors.get(&name).ok_or_else(|| Error::MissingTensor {
                    name: name.clone(),
                    source_name: "optimizer state".into(),
                })?;
                if t.dims() != var.dims() {
                    return Err(Error::ShapeMismatch {
                        name,
                        expected: var.dims().to_vec(),
                        actual: t.dims().to_vec(),
                    });
                }
                parts.push(
                    t.to_device(var.device())?
                        .to_dtype(var.dtype())?
                        .flatten_all()?,
                );
            }
        }
        if !self.vars.is_empty() {
            let [m, v] = flat;
            self.m = Tensor::cat(&m, 0)?;
            self.v = Tensor::cat(&v, 0)?;
        }
        self.step = step;
        Ok(())
    }
}

/// Learning-rate schedule shape after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    #[default]
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            other => Err(Error::InvalidArgument(format!(
                "unknown schedule `{other}` (constant, linear, cosine)"
            ))),
        }
    }
}

/// The learning rate for update number `step` (0-based) of `total`, as transformers' schedulers
/// compute it: linear warmup from 0, then constant / linear decay to 0 / half-cosine to 0.
pub fn learning_rate(
    schedule: Schedule,
    base_lr: f64,
    step: usize,
    warmup: usize,
    total: usize,
) -> f64 {
    if step < warmup {
        return base_lr * step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).min(1.0);
    match schedule {
        Schedule::Constant => base_lr,
        Schedule::Linear => base_lr * (1.0 - progress).max(0.0),
        Schedule::Cosine => base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// The gradients of one optimizer step, summed over its micro-batches (each micro-batch's loss
/// is already divided by the whole step's denominator, so the sum is the step's gradient).
pub struct GradAccumulator {
    vars: Vec<(String, Var)>,
    grads: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    pub fn new(vars: &[(String, Var)]) -> Self {
        Self {
            vars: vars.to_vec(),
            grads: vec![None; vars.len()],
        }
    }

    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, store: &candle_core::backprop::GradStore) -> Result<()> {
        for (slot, (_, var)) in self.grads.iter_mut().zip(&self.vars) {
            if let Some(g) = store.get(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    None => g.clone(),
                    Some(acc) => (acc + g)?,
                });
            }
        }
        Ok(())
    }

    /// The step's gradients (zeros for a variable no micro-batch reached), clipped to
    /// `max_norm`, and their norm before clipping; a non-finite norm stops the run at `step`
    /// (1-based).
    pub fn clipped(self, max_norm: Option<f64>, step: usize) -> Result<(Vec<Tensor>, f64)> {
        let mut grads: Vec<Tensor> = self
            .grads
            .into_iter()
            .zip(&self.vars)
            .map(|(g, (_, v))| g.map(Ok).unwrap_or_else(|| v.as_tensor().zeros_like()))
            .collect::<candle_core::Result<_>>()?;
        let norm = clip_grad_norm(&mut grads, max_norm)?;
        if !norm.is_finite() {
            return Err(Error::NonFiniteLoss {
                step,
                value: norm as f32,
            });
        }
        Ok((grads, norm))
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: Option<f64>) -> Result<f64> {
    // Each tensor's sum of squares in its own dtype, the total in f64, read back once: one
    // device round trip per step rather than one per tensor.
    let sums = grads
        .iter()
        .map(|g| g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let total = match sums.is_empty() {
        true => 0.0,
        false => Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?,
    };
    let norm = total.sqrt();
    if let Some(max) = max_norm {
        if norm > max && norm.is_finite() {
            let scale = max / (norm + 1e-6);
            for g in grads.iter_mut() {
                *g = (&*g * scale)?;
            }
        }
    }
    Ok(norm)
}

/// Optimizer steps of a run: `max_steps` when given, else `epochs` passes over `n_items` in
/// micro-batches of `batch_size`, `grad_accum` micro-batches to a step (at least one step).
pub fn optimizer_steps(
    max_steps: Option<usize>,
    epochs: usize,
    n_items: usize,
    batch_size: usize,
    grad_accum: usize,
) -> usize {
    if let Some(steps) = max_steps {
        return steps;
    }
    let batches = n_items.div_ceil(batch_size.max(1));
    (epochs * batches).div_ceil(grad_accum.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn adamw_matches_hand_computed_pytorch_step() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) with p=[1, -2], grad=[0.5, 0.25]:
        // p' = p*(1-0.1*0.01) - 0.1 * g/(|g| + 1e-8) per element = [0.8990, -2.0980].
        let var = Var::from_slice(&[1f32, -2.0], 2, &Device::Cpu).unwrap();
        let params = AdamWParams {
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("p".into(), var.clone())], params).unwrap();
        let g = Tensor::new(&[0.5f32, 0.25], &Device::Cpu).unwrap();
        opt.step(&[g], 0.1).unwrap();
        let p: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert!(
            (p[0] - 0.8990).abs() < 1e-5 && (p[1] + 2.0980).abs() < 1e-5,
            "{p:?}"
        );
    }

    /// The per-var update the flat buffers replaced, as the reference.
    fn per_var_step(
        theta: &Tensor,
        m: &Tensor,
        v: &Tensor,
        g: &Tensor,
        p: AdamWParams,
        t: i32,
        lr: f64,
    ) -> (Tensor, Tensor, Tensor) {
        let m = ((m * p.beta1).unwrap() + (g * (1.0 - p.beta1)).unwrap()).unwrap();
        let v = ((v * p.beta2).unwrap() + (g.sqr().unwrap() * (1.0 - p.beta2)).unwrap()).unwrap();
        let theta = (theta * (1.0 - lr * p.weight_decay)).unwrap();
        let m_hat = (&m / (1.0 - p.beta1.powi(t))).unwrap();
        let v_hat = (&v / (1.0 - p.beta2.powi(t))).unwrap();
        let update = (m_hat / (v_hat.sqrt().unwrap() + p.eps).unwrap()).unwrap();
        ((theta - (update * lr).unwrap()).unwrap(), m, v)
    }

    #[test]
    fn flat_moments_update_every_var_bit_for_bit_as_per_var_adamw() {
        let dev = Device::Cpu;
        let shapes: [&[usize]; 3] = [&[4, 3], &[5], &[2, 2, 2]];
        let vars: Vec<(String, Var)> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("p{i}"), Var::randn(0f32, 1.0, *s, &dev).unwrap()))
            .collect();
        let params = AdamWParams {
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut reference: Vec<(Tensor, Tensor, Tensor)> = vars
            .iter()
            .map(|(_, v)| {
                let t = v.as_tensor().copy().unwrap();
                (t.clone(), t.zeros_like().unwrap(), t.zeros_like().unwrap())
            })
            .collect();
        let mut opt = AdamW::new(vars.clone(), params).unwrap();
        for step in 1..=3 {
            let grads: Vec<Tensor> = shapes
                .iter()
                .map(|s| Tensor::randn(0f32, 1.0, *s, &dev).unwrap())
                .collect();
            let lr = 0.1 / step as f64;
            opt.step(&grads, lr).unwrap();
            for (r, g) in reference.iter_mut().zip(&grads) {
                *r = per_var_step(&r.0, &r.1, &r.2, g, params, step, lr);
            }
        }
        let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        for ((key, var), (theta, m, v)) in vars.iter().zip(&reference) {
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            assert_eq!(bits(var.as_tensor()), bits(theta), "{key}");
            assert_eq!(bits(&state[&format!("m.{key}")]), bits(m), "m.{key}");
            assert_eq!(bits(&state[&format!("v.{key}")]), bits(v), "v.{key}");
        }
        // The saved moments load back into a fresh optimizer unchanged.
        let mut resumed = AdamW::new(vars.clone(), params).unwrap();
        resumed.load_state(&state, 3).unwrap();
        let reloaded = resumed.state_tensors().unwrap();
        assert_eq!(reloaded.len(), state.len());
        for (name, t) in &reloaded {
            let saved = &state[name];
            assert_eq!(
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                saved.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{name} after a reload"
            );
        }
        let g: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::ones(*s, DType::F32, &dev).unwrap())
            .collect();
        let wrong = [g[1].clone(), g[0].clone(), g[2].clone()];
        let err = resumed.step(&wrong, 0.1).unwrap_err();
        assert!(err.to_string().contains("gradient of p0"), "{err}");
    }

    #[test]
    fn schedules_warm_up_then_decay() {
        assert_eq!(learning_rate(Schedule::Linear, 1.0, 0, 10, 110), 0.0);
        assert!((learning_rate(Schedule::Linear, 1.0, 5, 10, 110) - 0.5).abs() < 1e-12);
        assert!((learning_rate(Schedule::Linear, 1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!((learning_rate(Schedule::Cosine, 1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(Schedule::Constant, 2.0, 100, 10, 110), 2.0);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut g = vec![Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap()];
        let norm = clip_grad_norm(&mut g, Some(1.0)).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let after = clip_grad_norm(&mut g, None).unwrap();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }
}
