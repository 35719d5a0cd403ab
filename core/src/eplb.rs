//! Expert-parallel load balancing: which routed experts each GPU of an EP group holds, and which
//! experts get redundant copies, from each expert's load (DeepSeek's EPLB, `deepseek-ai/EPLB`,
//! anchors-performance §5b).
//!
//! A MoE layer's step lasts as long as its busiest GPU, so placement aims at an even load per GPU.
//! With `slots` physical expert slots for `experts` logical ones (`slots − experts` redundant), the
//! **hierarchical** policy runs when the expert groups divide evenly among the nodes (V3: 8 groups):
//!
//! 1. pack whole expert groups onto nodes, balancing their summed load, so that group-limited
//!    routing keeps a token's traffic on few nodes;
//! 2. inside each node, give the redundant slots one at a time to the expert with the largest load
//!    per copy (a token goes to one copy, so a copy carries `load / copies`);
//! 3. pack the node's copies onto its GPUs, heaviest first into the lightest GPU with a free slot.
//!
//! Otherwise the **global** policy does steps 2 and 3 over the whole group (one node, one group).
//! Every GPU ends with exactly `slots / gpus` copies, every expert with at least one. Ties go to
//! the lowest index, so a load vector always gives the same placement.
//!
//! Load prediction is the caller's: the simulator draws it, a serving engine would average what it
//! observed over a window (the EPLB repository leaves that choice out of scope too).

use thiserror::Error;

/// The EP group a placement is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EplbShape {
    /// Logical routed experts per MoE layer (V3: 256).
    pub experts: usize,
    /// Expert groups of group-limited routing (V3: 8); 1 when the model has none.
    pub groups: usize,
    /// Nodes the group spans.
    pub nodes: usize,
    /// GPUs in the group, a multiple of `nodes`.
    pub gpus: usize,
    /// Physical expert slots in all: `experts` plus the redundant ones, a multiple of `gpus`.
    pub slots: usize,
}

impl EplbShape {
    pub fn slots_per_gpu(&self) -> usize {
        self.slots / self.gpus.max(1)
    }

    fn check(&self) -> Result<(), EplbError> {
        let bad = |why: String| Err(EplbError::Shape(why));
        if self.experts == 0 || self.groups == 0 || self.nodes == 0 || self.gpus == 0 {
            return bad(format!(
                "experts ({}), groups ({}), nodes ({}) and GPUs ({}) must each be at least 1",
                self.experts, self.groups, self.nodes, self.gpus
            ));
        }
        if !self.experts.is_multiple_of(self.groups) {
            return bad(format!(
                "{} experts do not split into {} equal groups",
                self.experts, self.groups
            ));
        }
        if !self.gpus.is_multiple_of(self.nodes) {
            return bad(format!(
                "{} GPUs do not split evenly over {} nodes",
                self.gpus, self.nodes
            ));
        }
        if self.slots < self.experts || !self.slots.is_multiple_of(self.gpus) {
            return bad(format!(
                "{} expert slots must be at least the {} experts and a multiple of the {} GPUs",
                self.slots, self.experts, self.gpus
            ));
        }
        Ok(())
    }

    /// Whether the hierarchical policy applies: more than one node, and the groups divide among them.
    fn hierarchical(&self) -> bool {
        self.nodes > 1 && self.groups.is_multiple_of(self.nodes)
    }
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum EplbError {
    #[error("EPLB shape: {0}")]
    Shape(String),
    #[error("expert load has {got} entries, the layer has {want} experts")]
    LoadLen { got: usize, want: usize },
    #[error("expert {expert}'s load {load} is not a finite number ≥ 0")]
    BadLoad { expert: usize, load: f64 },
}

/// Where each expert copy lives. GPU `g` holds slots `g·slots_per_gpu .. (g+1)·slots_per_gpu`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The logical expert in each physical slot.
    pub slot_expert: Vec<u32>,
    /// Copies of each logical expert (each ≥ 1); they sum to the slot count.
    pub copies: Vec<u32>,
    pub slots_per_gpu: usize,
}

impl Placement {
    pub fn gpus(&self) -> usize {
        self.slot_expert.len() / self.slots_per_gpu.max(1)
    }

    /// Each GPU's load when expert `e` receives `load[e]` (tokens, or any additive unit) split evenly
    /// over its copies.
    pub fn gpu_loads(&self, load: &[f64]) -> Result<Vec<f64>, EplbError> {
        check_load(load, self.copies.len())?;
        let mut out = vec![0.0; self.gpus()];
        for (slot, &e) in self.slot_expert.iter().enumerate() {
            let e = e as usize;
            out[slot / self.slots_per_gpu] += load[e] / self.copies[e] as f64;
        }
        Ok(out)
    }

    /// [`imbalance`] of this placement under `load`.
    pub fn imbalance(&self, load: &[f64]) -> Result<f64, EplbError> {
        Ok(imbalance(&self.gpu_loads(load)?))
    }
}

/// Each GPU's load under static sharding, what an engine runs before it has seen any load: expert
/// `e` on GPU `e·gpus/experts` (uneven when `gpus` does not divide the experts), no copies.
pub fn static_gpu_loads(load: &[f64], gpus: usize) -> Result<Vec<f64>, EplbError> {
    if gpus == 0 {
        return Err(EplbError::Shape(
            "static sharding needs at least 1 GPU".into(),
        ));
    }
    check_load(load, load.len())?;
    let mut out = vec![0.0; gpus];
    for (e, l) in load.iter().enumerate() {
        out[e * gpus / load.len()] += l;
    }
    Ok(out)
}

/// Busiest GPU over the mean GPU: how much longer a layer's expert compute takes than it would
/// perfectly balanced. 1 for no load at all.
pub fn imbalance(gpu_loads: &[f64]) -> f64 {
    let mean = gpu_loads.iter().sum::<f64>() / gpu_loads.len().max(1) as f64;
    let max = gpu_loads.iter().copied().fold(0.0, f64::max);
    if mean > 0.0 { max / mean } else { 1.0 }
}

fn check_load(load: &[f64], experts: usize) -> Result<(), EplbError> {
    if load.len() != experts {
        return Err(EplbError::LoadLen {
            got: load.len(),
            want: experts,
        });
    }
    match load.iter().position(|l| !(l.is_finite() && *l >= 0.0)) {
        Some(expert) => Err(EplbError::BadLoad {
            expert,
            load: load[expert],
        }),
        None => Ok(()),
    }
}

/// Places `shape.slots` expert copies on `shape.gpus` GPUs for the per-expert `load`. See the module
/// doc for the policy.
pub fn rebalance(shape: &EplbShape, load: &[f64]) -> Result<Placement, EplbError> {
    shape.check()?;
    check_load(load, shape.experts)?;
    let (nodes, groups) = if shape.hierarchical() {
        (shape.nodes, shape.groups)
    } else {
        (1, 1)
    };
    let group_size = shape.experts / groups;
    let group_load: Vec<f64> = load.chunks(group_size).map(|g| g.iter().sum()).collect();
    let group_node = balanced_packing(&group_load, nodes);
    let slots_per_node = shape.slots / nodes;
    let gpus_per_node = shape.gpus / nodes;
    let slots_per_gpu = shape.slots_per_gpu();

    let mut slot_expert = vec![0u32; shape.slots];
    let mut copies = vec![0u32; shape.experts];
    for node in 0..nodes {
        let experts: Vec<usize> = (0..groups)
            .filter(|&g| group_node[g] == node)
            .flat_map(|g| g * group_size..(g + 1) * group_size)
            .collect();
        let node_load: Vec<f64> = experts.iter().map(|&e| load[e]).collect();
        let (phys, node_copies) = replicate(&node_load, slots_per_node);
        for (i, &e) in experts.iter().enumerate() {
            copies[e] = node_copies[i];
        }
        let phys_load: Vec<f64> = phys
            .iter()
            .map(|&i| node_load[i] / node_copies[i] as f64)
            .collect();
        let phys_gpu = balanced_packing(&phys_load, gpus_per_node);
        let mut filled = vec![0usize; gpus_per_node];
        for (p, &i) in phys.iter().enumerate() {
            let gpu = node * gpus_per_node + phys_gpu[p];
            slot_expert[gpu * slots_per_gpu + filled[phys_gpu[p]]] = experts[i] as u32;
            filled[phys_gpu[p]] += 1;
        }
    }
    Ok(Placement {
        slot_expert,
        copies,
        slots_per_gpu,
    })
}

/// Splits items into `packs` packs of exactly `items / packs` each, heaviest item first into the
/// lightest pack with room. Returns each item's pack. `packs` divides the item count.
fn balanced_packing(weights: &[f64], packs: usize) -> Vec<usize> {
    let per_pack = weights.len() / packs;
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // Stable: equal weights keep index order.
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]));
    let mut pack_weight = vec![0.0f64; packs];
    let mut pack_items = vec![0usize; packs];
    let mut pack_of = vec![0usize; weights.len()];
    for i in order {
        let p = (0..packs)
            .filter(|&p| pack_items[p] < per_pack)
            .min_by(|&a, &b| pack_weight[a].total_cmp(&pack_weight[b]))
            .expect("items = packs × per_pack, so a pack has room while items remain");
        pack_of[i] = p;
        pack_weight[p] += weights[i];
        pack_items[p] += 1;
    }
    pack_of
}

/// One copy of every expert, then each extra slot to the expert with the largest load per copy.
/// Returns the expert of each physical copy (the originals first, in order) and each expert's copies.
fn replicate(load: &[f64], slots: usize) -> (Vec<usize>, Vec<u32>) {
    let mut phys: Vec<usize> = (0..load.len()).collect();
    let mut copies = vec![1u32; load.len()];
    for _ in load.len()..slots {
        let e = (0..load.len())
            .max_by(|&a, &b| {
                (load[a] / copies[a] as f64)
                    .total_cmp(&(load[b] / copies[b] as f64))
                    // max_by keeps the last of equals; reversing the index keeps the first.
                    .then(b.cmp(&a))
            })
            .expect("a shape has at least one expert");
        copies[e] += 1;
        phys.push(e);
    }
    (phys, copies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v3(nodes: usize, gpus: usize, slots: usize) -> EplbShape {
        EplbShape {
            experts: 256,
            groups: 8,
            nodes,
            gpus,
            slots,
        }
    }

    /// One expert far hotter than the rest: EPLB gives it the redundant slots and spreads the
    /// copies, so the busiest GPU drops from carrying the hot expert alone to near the mean.
    #[test]
    fn a_hot_expert_is_copied_and_spread() {
        let mut load = vec![1.0; 256];
        load[17] = 16.0;
        let naive_imb = imbalance(&static_gpu_loads(&load, 32).unwrap());
        let global = EplbShape {
            groups: 1,
            nodes: 1,
            ..v3(1, 32, 288)
        };
        let p = rebalance(&global, &load).unwrap();
        let imb = p.imbalance(&load).unwrap();
        assert!(naive_imb > 2.5, "static placement {naive_imb}");
        assert!(imb < 1.15, "EPLB placement {imb}");
        assert!(p.copies[17] >= 16, "hot expert copies {}", p.copies[17]);
    }

    /// Hierarchical placement can only copy an expert inside its group's node, so a very hot expert
    /// still leaves its node heavier, but far less than static sharding does.
    #[test]
    fn hierarchical_placement_beats_static_sharding() {
        let mut load = vec![1.0; 256];
        load[17] = 16.0;
        let naive = imbalance(&static_gpu_loads(&load, 32).unwrap());
        let p = rebalance(&v3(4, 32, 288), &load).unwrap();
        let imb = p.imbalance(&load).unwrap();
        assert!(imb < 0.6 * naive, "EPLB {imb} vs static {naive}");
        assert!(p.copies[17] > 1);
    }

    /// Hierarchical: each expert group's copies stay on one node, so group-limited routing keeps
    /// a token's traffic on the nodes its groups live on.
    #[test]
    fn groups_stay_on_one_node() {
        let load: Vec<f64> = (0..256).map(|e| 1.0 + (e % 7) as f64).collect();
        let p = rebalance(&v3(4, 32, 288), &load).unwrap();
        let gpus_per_node = 8;
        for g in 0..8 {
            let nodes: std::collections::BTreeSet<usize> = p
                .slot_expert
                .iter()
                .enumerate()
                .filter(|&(_, &e)| e as usize / 32 == g)
                .map(|(s, _)| s / p.slots_per_gpu / gpus_per_node)
                .collect();
            assert_eq!(nodes.len(), 1, "group {g} on nodes {nodes:?}");
        }
    }

    #[test]
    fn bad_shapes_and_loads_are_errors() {
        let ok = v3(4, 32, 288);
        for (shape, needle) in [
            (EplbShape { slots: 250, ..ok }, "at least the 256 experts"),
            (EplbShape { slots: 300, ..ok }, "multiple of the 32 GPUs"),
            (EplbShape { gpus: 30, ..ok }, "split evenly over 4 nodes"),
            (EplbShape { groups: 7, ..ok }, "7 equal groups"),
            (EplbShape { gpus: 0, ..ok }, "at least 1"),
        ] {
            let e = rebalance(&shape, &[1.0; 256]).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        assert_eq!(
            rebalance(&ok, &[1.0; 255]),
            Err(EplbError::LoadLen {
                got: 255,
                want: 256
            })
        );
        let mut nan = vec![1.0; 256];
        nan[3] = f64::NAN;
        assert!(matches!(
            rebalance(&ok, &nan),
            Err(EplbError::BadLoad { expert: 3, .. })
        ));
        assert!(static_gpu_loads(&[1.0; 256], 0).is_err());
        // Static sharding over a GPU count that does not divide the experts: uneven, every expert
        // somewhere, nothing lost.
        let uneven = static_gpu_loads(&[1.0; 256], 144).unwrap();
        assert_eq!(uneven.iter().sum::<f64>(), 256.0);
        assert_eq!(imbalance(&uneven), 2.0 / (256.0 / 144.0));
    }

    fn shapes() -> impl Strategy<Value = EplbShape> {
        // groups | experts, nodes | gpus, gpus | slots ≥ experts; nodes may or may not divide groups.
        (1usize..=4, 1usize..=8, 1usize..=3, 1usize..=4, 0usize..=3).prop_flat_map(
            |(groups, per_group, nodes, gpus_per_node, extra_per_gpu)| {
                let experts = groups * per_group * 4;
                let gpus = nodes * gpus_per_node;
                let slots = experts.div_ceil(gpus) * gpus + extra_per_gpu * gpus;
                Just(EplbShape {
                    experts,
                    groups,
                    nodes,
                    gpus,
                    slots,
                })
            },
        )
    }

    proptest! {
        /// Every slot holds an expert, every expert has a copy, every GPU the same slot count, and
        /// the copies counted from the slots match `copies`. The load each GPU carries sums to
        /// the total load.
        #[test]
        fn placements_are_complete(
            (shape, load) in shapes().prop_flat_map(|s| {
                (Just(s), proptest::collection::vec(0.0f64..100.0, s.experts))
            })
        ) {
            let p = rebalance(&shape, &load).unwrap();
            prop_assert_eq!(p.slot_expert.len(), shape.slots);
            prop_assert_eq!(p.gpus(), shape.gpus);
            let mut counted = vec![0u32; shape.experts];
            for &e in &p.slot_expert {
                counted[e as usize] += 1;
            }
            prop_assert_eq!(&counted, &p.copies);
            prop_assert!(p.copies.iter().all(|&c| c >= 1));
            let gpu = p.gpu_loads(&load).unwrap();
            let total: f64 = load.iter().sum();
            prop_assert!((gpu.iter().sum::<f64>() - total).abs() <= 1e-9 * total.max(1.0));
        }

        /// The same load always gives the same placement.
        #[test]
        fn placement_is_deterministic(load in proptest::collection::vec(0.0f64..10.0, 64)) {
            let shape = EplbShape { experts: 64, groups: 8, nodes: 2, gpus: 8, slots: 72 };
            prop_assert_eq!(rebalance(&shape, &load).unwrap(), rebalance(&shape, &load).unwrap());
        }
    }
}
