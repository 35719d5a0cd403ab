//! Expert parallelism inside the model: a rank of an EP group holds only its shard of every MoE
//! layer's routed experts (`core::ep::ExpertMap::shard`), runs attention, dense layers and the
//! shared experts on its own batch, and reaches the other ranks' experts through two exchange
//! rounds per MoE layer — dispatch (hidden rows to the ranks holding their experts) and combine
//! (expert outputs back). The exchange is the caller's ([`ExpertExchange`]: the serving actors
//! bridge it to `duet_transport::a2a`), so the model stays free of IO.
//!
//! Results are those of one rank holding every expert: each expert row is computed by the same
//! kernel, and the combine adds a token's expert outputs in ascending expert order into the
//! shared expert's output, as [`crate::Model`]'s single-rank path does.

use std::collections::BTreeMap;
use std::sync::Arc;

use duet_core::ep::{ExpertMap, RowBlock, plan_dispatch};
use duet_kernels::moe::{self, RouterConfig, Routing};
use duet_kernels::{DType, Device, Tensor, ops};

use crate::ffn::Ffn;
use crate::{Error, Result};

/// One lock-step exchange round with every rank of the group: `blocks[r]` goes to rank `r`, and
/// the answer holds the block each rank sent this one, by sender. Every rank calls it the same
/// number of times (twice per MoE layer per step, idle ranks included).
pub trait ExpertExchange: Send + Sync {
    fn exchange(&self, blocks: Vec<RowBlock>) -> std::result::Result<Vec<RowBlock>, String>;
}

/// This rank's place in its EP group.
pub struct EpRank {
    pub me: usize,
    /// Where every routed expert lives (the same map for every MoE layer).
    pub map: ExpertMap,
    pub exchange: Arc<dyn ExpertExchange>,
}

impl EpRank {
    /// The logical experts this rank loads, in slot order.
    pub fn shard_experts(&self) -> Vec<usize> {
        self.map.shard(self.me).map(|(_, e)| e as usize).collect()
    }

    fn exchange(&self, blocks: Vec<RowBlock>) -> Result<Vec<RowBlock>> {
        let got = self
            .exchange
            .exchange(blocks)
            .map_err(|e| Error::Invalid(format!("expert-parallel exchange: {e}")))?;
        if got.len() != self.map.ranks() {
            return Err(Error::Invalid(format!(
                "expert-parallel exchange returned {} blocks for {} ranks",
                got.len(),
                self.map.ranks()
            )));
        }
        Ok(got)
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8], row: usize, what: &str) -> Result<Vec<f32>> {
    if row == 0 || !b.len().is_multiple_of(4 * row) {
        return Err(Error::Invalid(format!(
            "expert-parallel {what}: {} bytes are not rows of {row} f32",
            b.len()
        )));
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// One expert's rows of this rank's tokens: token indices, routing weights, output rows.
type ExpertRows = (Vec<u32>, Vec<f32>, Vec<f32>);

/// The routed experts this rank holds, by local slot, run over a list of input matrices.
fn run_experts(experts: &[(&Ffn, Tensor)]) -> Result<Vec<Tensor>> {
    if experts.is_empty() {
        return Ok(Vec::new());
    }
    let pairs: Vec<(&Tensor, &Tensor)> = experts.iter().map(|(f, x)| (x, &f.gate_up)).collect();
    let gate_up = ops::matmul_grouped(&pairs)?;
    let acts: Vec<Tensor> = gate_up
        .iter()
        .map(ops::silu_mul)
        .collect::<std::result::Result<_, _>>()?;
    let pairs: Vec<(&Tensor, &Tensor)> = acts
        .iter()
        .zip(experts)
        .map(|(x, (f, _))| (x, &f.down))
        .collect();
    Ok(ops::matmul_grouped(&pairs)?)
}

/// One MoE layer at one rank: route this rank's tokens, dispatch, run the experts held here on
/// what arrived, combine. `experts` are this rank's shard by local slot. With no tokens (an idle
/// rank) it still serves the other ranks' rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn moe_layer(
    ep: &EpRank,
    h: &Tensor,
    gate: &Tensor,
    bias: Option<&Tensor>,
    router: &RouterConfig,
    experts: &[Ffn],
    shared: Option<&Ffn>,
    device: Device,
) -> Result<Tensor> {
    let (tokens, hidden) = h.dims2("moe")?;
    let routing = if tokens > 0 {
        moe::route(&ops::matmul(h, gate)?, bias, router)?
    } else {
        Routing {
            top_k: router.top_k,
            experts: Vec::new(),
            weights: Vec::new(),
        }
    };
    let map = &ep.map;
    let mut copy_rows = vec![0u64; map.slots()];
    let plan = plan_dispatch(map, ep.me, &routing.experts, router.top_k, &mut copy_rows)
        .map_err(|e| Error::Invalid(e.to_string()))?;

    // Dispatch: each destination gets its rows' hidden states and their slots.
    let hv = if tokens > 0 {
        h.to_vec_f32()
    } else {
        Vec::new()
    };
    let blocks = plan
        .to_rank
        .iter()
        .map(|list| {
            let mut data = Vec::with_capacity(list.len() * hidden * 4);
            for a in list {
                let row = &hv[a.token as usize * hidden..(a.token as usize + 1) * hidden];
                data.extend(f32_bytes(row));
            }
            RowBlock {
                meta: list.iter().map(|a| a.slot).collect(),
                data,
            }
        })
        .collect();
    let arrived = ep.exchange(blocks)?;

    // The experts held here, over every row that arrived for them (senders in rank order).
    let first_slot = ep.me * (map.slots() / map.ranks());
    let mut per_slot: BTreeMap<u32, Vec<(usize, usize)>> = BTreeMap::new();
    let mut inputs: Vec<Vec<f32>> = Vec::with_capacity(arrived.len());
    for (from, b) in arrived.iter().enumerate() {
        let rows = if b.meta.is_empty() {
            Vec::new()
        } else {
            bytes_f32(&b.data, hidden, "dispatch")?
        };
        if rows.len() != b.meta.len() * hidden {
            return Err(Error::Invalid(format!(
                "expert-parallel dispatch from rank {from}: {} rows of metadata for {} values",
                b.meta.len(),
                rows.len()
            )));
        }
        for (i, &slot) in b.meta.iter().enumerate() {
            let local = (slot as usize)
                .checked_sub(first_slot)
                .filter(|&l| l < experts.len())
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "expert-parallel dispatch from rank {from}: slot {slot} is not held by \
                         rank {}",
                        ep.me
                    ))
                })?;
            per_slot.entry(local as u32).or_default().push((from, i));
        }
        inputs.push(rows);
    }
    let mut batches = Vec::with_capacity(per_slot.len());
    for (&local, rows) in &per_slot {
        let mut x = Vec::with_capacity(rows.len() * hidden);
        for &(from, i) in rows {
            x.extend_from_slice(&inputs[from][i * hidden..(i + 1) * hidden]);
        }
        let x = Tensor::from_f32(&[rows.len(), hidden], x, device)?;
        batches.push((&experts[local as usize], x));
    }
    let outputs = run_experts(&batches)?;
    // Combine: each sender gets its rows' outputs back in the order it sent them.
    let mut back: Vec<Vec<f32>> = arrived
        .iter()
        .map(|b| vec![0.0; b.meta.len() * hidden])
        .collect();
    for ((_, rows), y) in per_slot.iter().zip(&outputs) {
        let y = y.to_vec_f32();
        for (j, &(from, i)) in rows.iter().enumerate() {
            back[from][i * hidden..(i + 1) * hidden]
                .copy_from_slice(&y[j * hidden..(j + 1) * hidden]);
        }
    }
    let blocks = back
        .iter()
        .map(|v| RowBlock {
            meta: Vec::new(),
            data: f32_bytes(v),
        })
        .collect();
    let returned = ep.exchange(blocks)?;

    let mut out = Tensor::zeros(h.shape(), DType::F32, device);
    if tokens == 0 {
        return Ok(out);
    }
    if let Some(sh) = shared {
        let y = run_experts(&[(sh, h.clone())])?
            .pop()
            .expect("one output per input");
        ops::add_inplace(&mut out, &y)?;
    }
    // By logical expert, ascending: the order the single-rank path adds them in.
    let mut per_expert: BTreeMap<u32, ExpertRows> = BTreeMap::new();
    for (r, list) in plan.to_rank.iter().enumerate() {
        let ys = if list.is_empty() {
            Vec::new()
        } else {
            bytes_f32(&returned[r].data, hidden, "combine")?
        };
        if ys.len() != list.len() * hidden {
            return Err(Error::Invalid(format!(
                "expert-parallel combine from rank {r}: {} values for {} rows",
                ys.len(),
                list.len()
            )));
        }
        for (i, a) in list.iter().enumerate() {
            let e = map.expert_in(a.slot);
            let w = routing.weights[a.token as usize * routing.top_k + a.k as usize];
            let entry = per_expert.entry(e).or_default();
            entry.0.push(a.token);
            entry.1.push(w);
            entry.2.extend_from_slice(&ys[i * hidden..(i + 1) * hidden]);
        }
    }
    for (rows, weights, ys) in per_expert.into_values() {
        let y = Tensor::from_f32(&[rows.len(), hidden], ys, device)?;
        ops::scatter_add_rows(&mut out, &y, &rows, &weights)?;
    }
    Ok(out)
}
