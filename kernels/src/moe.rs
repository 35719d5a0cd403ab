//! DeepSeekMoE routing: which experts each token goes to, and with what weight.
//!
//! - `greedy` (V2, V2-Lite): softmax scores, top-k.
//! - `group_limited_greedy` (V2): experts in `n_group` groups; a group's score is its best
//!   expert's; keep the `topk_group` best groups, then top-k among their experts.
//! - `noaux_tc` (V3, R1): sigmoid scores; *selection* uses `score + e_score_correction_bias`
//!   (the auxiliary-loss-free balancing bias), a group's score is the sum of its two best biased
//!   scores; the *weights* are the unbiased scores of the chosen experts.
//!
//! Then, if `norm_topk_prob` (and top_k > 1), weights are divided by their sum (+1e-20), and
//! multiplied by `routed_scaling_factor` — see `RouterConfig::scale_after_norm` for the one place
//! V2 and V3 differ.

use crate::{Result, Tensor, shape_err};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    Greedy,
    GroupLimitedGreedy,
    NoauxTc,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterConfig {
    pub n_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub scoring: Scoring,
    pub method: TopkMethod,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    /// V3 multiplies by `routed_scaling_factor` always; V2's released code only when the weights
    /// were not normalised.
    pub scale_after_norm: bool,
}

/// `top_k` experts and weights per token, token-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Indices of the `k` largest values, largest first; ties go to the lower index (as torch.topk
/// on CPU does for distinct inputs — ties between random floats do not occur in practice).
fn top_k_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Routes each row of `logits` (`[tokens, n_experts]`, the router gate's output).
pub fn route(logits: &Tensor, bias: Option<&Tensor>, cfg: &RouterConfig) -> Result<Routing> {
    let (t, e) = logits.dims2("moe_route")?;
    let groups_ok = cfg.n_group > 0 && e % cfg.n_group == 0 && cfg.topk_group <= cfg.n_group;
    if e != cfg.n_experts || cfg.top_k == 0 || cfg.top_k > e || !groups_ok {
        return shape_err(
            "moe_route",
            format!("logits {:?} for {cfg:?}", logits.shape()),
        );
    }
    let bias = match bias {
        Some(b) if b.elem_count() != e => {
            return shape_err("moe_route", format!("bias {:?} for {e} experts", b.shape()));
        }
        Some(b) => Some(b.to_vec_f32()),
        None => None,
    };
    let ls = logits.f32s("moe_route")?;
    let mut experts = Vec::with_capacity(t * cfg.top_k);
    let mut weights = Vec::with_capacity(t * cfg.top_k);
    let per_group = e / cfg.n_group;
    for row in ls.chunks(e) {
        let scores: Vec<f32> = match cfg.scoring {
            Scoring::Softmax => {
                let mut s = row.to_vec();
                crate::cpu::softmax(&mut s);
                s
            }
            Scoring::Sigmoid => row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        };
        let choice: Vec<f32> = match (&bias, cfg.method) {
            (Some(b), TopkMethod::NoauxTc) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
            _ => scores.clone(),
        };
        let chosen = match cfg.method {
            TopkMethod::Greedy => top_k_indices(&choice, cfg.top_k),
            TopkMethod::GroupLimitedGreedy | TopkMethod::NoauxTc => {
                let group_scores: Vec<f32> = choice
                    .chunks(per_group)
                    .map(|g| {
                        if cfg.method == TopkMethod::NoauxTc {
                            top_k_indices(g, 2.min(g.len())).iter().map(|&i| g[i]).sum()
                        } else {
                            g.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                        }
                    })
                    .collect();
                let keep = top_k_indices(&group_scores, cfg.topk_group);
                let masked: Vec<f32> = choice
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| {
                        if keep.contains(&(i / per_group)) {
                            s
                        } else if cfg.method == TopkMethod::NoauxTc {
                            f32::NEG_INFINITY
                        } else {
                            // V2 zeroes the other groups' softmax scores (HF and the released code
                            // alike); it only differs from -inf when top_k exceeds the kept experts.
                            0.0
                        }
                    })
                    .collect();
                top_k_indices(&masked, cfg.top_k)
            }
        };
        let mut w: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
        let normalise = cfg.top_k > 1 && cfg.norm_topk_prob;
        if normalise {
            let sum: f32 = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|x| *x /= sum);
        }
        if !normalise || cfg.scale_after_norm {
            w.iter_mut().for_each(|x| *x *= cfg.routed_scaling_factor);
        }
        experts.extend(chosen.iter().map(|&i| i as u32));
        weights.extend(w);
    }
    Ok(Routing {
        top_k: cfg.top_k,
        experts,
        weights,
    })
}
