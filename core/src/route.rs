//! Gateway-side routing: which prefill worker runs a prompt, and which decode DP-attention group
//! generates its tokens.
//!
//! # Prefill: cache-aware routing ([`PrefillRouter`])
//!
//! SGLang router's cache-aware policy (sgl-router, `policies/cache_aware.rs`), at page granularity: the
//! gateway cannot see the workers' radix caches, so it keeps an *approximate* tree per prefill worker
//! of the page-aligned prompts it sent there. A prompt goes to the live worker whose tree matches the
//! longest prefix when that match is at least `affinity_min_tokens` (below it, the saved prefill is
//! not worth an imbalance) and that worker is not overloaded: its `queued_tokens` is at most
//! `balance_abs_tokens + balance_rel × (least queued_tokens)`. Otherwise the least-loaded live worker
//! (queued tokens, then running sequences, then id) gets it. Each tree is bounded at
//! `tree_pages_max` pages, least recently routed leaves trimmed first, like the worker's own LRU.
//!
//! # Decode: DP-group balancing ([`DecodeBalancer`])
//!
//! Among live groups with room (`pages_free ≥ pages_needed` and `running < max_running`), either the
//! exact minimum of outstanding tokens (ties: most free pages, then id), or Mitzenmacher's *power of two
//! choices* ("The Power of Two Choices in Randomized Load Balancing", 2001): sample two distinct groups,
//! take the better. Two choices are the classic remedy when load information is stale, because exact-min
//! sends every request between two load reports to the same group. Which one is the default was
//! measured, see [`BalancePolicy`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasherDefault;

use smallvec::SmallVec;

use crate::PAGE_TOKENS;
use crate::rng::mix64;
use crate::types::WorkerId;

// ---------------------------------------------------------------------------------------------------
// Prefill routing
// ---------------------------------------------------------------------------------------------------

/// A prefill worker's load as last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillLoad {
    pub worker: WorkerId,
    /// Prompt tokens queued or being prefilled on the worker.
    pub queued_tokens: u64,
    pub running: usize,
    pub alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillRouterConfig {
    /// Shortest prefix match worth routing for.
    pub affinity_min_tokens: usize,
    /// A worker with affinity may be this many queued tokens above the least queued one…
    pub balance_abs_tokens: u64,
    /// …plus this factor times the least queued tokens.
    pub balance_rel: f64,
    /// Bound of each worker's approximate tree, in pages.
    pub tree_pages_max: usize,
}

impl Default for PrefillRouterConfig {
    fn default() -> Self {
        PrefillRouterConfig {
            // Four pages: below that, the prefill saved is smaller than one chunk of queueing.
            affinity_min_tokens: 4 * PAGE_TOKENS,
            // About four default prefill steps (token_budget 2048) of extra queueing for a hit.
            balance_abs_tokens: 8192,
            // SGLang's default relative threshold is ~1; allow half again for a long hit.
            balance_rel: 1.5,
            // 64 Ki pages (4 Mi tokens) per worker: more than a worker's own KV pool holds, so the
            // approximation errs on "cached" only for prompts the worker evicted anyway.
            tree_pages_max: 64 * 1024,
        }
    }
}

/// Cache-aware prefill routing. See the module doc.
#[derive(Debug)]
pub struct PrefillRouter {
    cfg: PrefillRouterConfig,
    index: PageIndex,
}

impl PrefillRouter {
    pub fn new(cfg: PrefillRouterConfig) -> Self {
        PrefillRouter {
            cfg,
            index: PageIndex::default(),
        }
    }

    /// Picks a live worker for `tokens` and records the prompt in its tree. Returns the worker and the
    /// tokens its tree matched (a multiple of [`PAGE_TOKENS`]), or `None` when no worker is alive.
    pub fn route(
        &mut self,
        tokens: &[u32],
        workers: &[PrefillLoad],
        now_us: u64,
    ) -> Option<(WorkerId, usize)> {
        self.route_pages(&page_chain_hashes(tokens), workers, now_us)
    }

    /// [`PrefillRouter::route`] for a prompt already turned into [`page_chain_hashes`] (several
    /// routers, one per level, can share one hashing).
    pub fn route_pages(
        &mut self,
        hashes: &[u64],
        workers: &[PrefillLoad],
        now_us: u64,
    ) -> Option<(WorkerId, usize)> {
        let (depths, path) = self.index.match_depths(hashes);
        let matched = |w: &PrefillLoad| {
            depths
                .binary_search_by_key(&w.worker, |&(id, _)| id)
                .map_or(0, |i| depths[i].1 * PAGE_TOKENS)
        };
        let mut least_queued = None::<u64>;
        let mut best: Option<(&PrefillLoad, usize)> = None;
        let mut least: Option<(&PrefillLoad, usize)> = None;
        for w in workers.iter().filter(|w| w.alive) {
            let m = matched(w);
            least_queued = Some(least_queued.map_or(w.queued_tokens, |q| q.min(w.queued_tokens)));
            let better = |(b, bm): (&PrefillLoad, usize)| {
                (m, Reverse(w.queued_tokens), Reverse(w.worker))
                    > (bm, Reverse(b.queued_tokens), Reverse(b.worker))
            };
            if best.is_none_or(better) {
                best = Some((w, m));
            }
            let lighter = |(l, _): (&PrefillLoad, usize)| {
                (w.queued_tokens, w.running, w.worker) < (l.queued_tokens, l.running, l.worker)
            };
            if least.is_none_or(lighter) {
                least = Some((w, m));
            }
        }
        let least_queued = least_queued?;
        let ((best, best_match), (least, least_match)) = (best?, least?);
        let queued_max =
            self.cfg.balance_abs_tokens as f64 + self.cfg.balance_rel * least_queued as f64;
        let affinity = best_match > 0
            && best_match >= self.cfg.affinity_min_tokens
            && best.queued_tokens as f64 <= queued_max;
        let (chosen, chosen_match) = if affinity {
            (best.worker, best_match)
        } else {
            (least.worker, least_match)
        };
        self.index.insert(chosen, hashes, &path, now_us);
        self.index.trim(chosen, self.cfg.tree_pages_max);
        Some((chosen, chosen_match))
    }

    /// Drops a worker's tree (it left, or restarted with an empty cache).
    pub fn forget_worker(&mut self, w: WorkerId) {
        self.index.forget(w);
    }

    /// Pages in `w`'s tree.
    pub fn tree_pages(&self, w: WorkerId) -> usize {
        self.index.workers.get(&w).map_or(0, |t| t.pages)
    }
}

/// One 64-bit hash per full page of `tokens`, each covering the whole prefix up to that page's end
/// (a hash chain), so that one hash-map probe per page walks a radix tree of prefixes. Two different
/// prefixes share a hash with probability ~2⁻⁶⁴ per pair; the router is approximate anyway (a
/// collision can only misjudge one prompt's cache affinity, never correctness).
pub fn page_chain_hashes(tokens: &[u32]) -> Vec<u64> {
    let mut h = 0x243F_6A88_85A3_08D3_u64;
    tokens
        .chunks_exact(PAGE_TOKENS)
        .map(|page| {
            for pair in page.chunks_exact(2) {
                let v = u64::from(pair[0]) | (u64::from(pair[1]) << 32);
                h = (h ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
            }
            h = mix64(h);
            h
        })
        .collect()
}

/// Keys are already well-mixed 64-bit hashes: hashing them again would only cost time.
#[derive(Debug, Default, Clone, Copy)]
struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type PassThroughMap<V> = HashMap<u64, V, BuildHasherDefault<PassThrough>>;

/// The gateway's model of every worker's prefix cache in one structure (Dynamo's KV indexer keeps
/// the same shape): a radix tree of page-aligned prefixes keyed by chain hash, each node listing the
/// workers whose tree holds it. One walk matches a prompt against all workers at once — the cost is
/// O(pages + holders on the path), not O(workers × pages) — and a page shared by many workers is
/// stored once. A worker on a node is on its parent too (inserts add whole paths, trimming removes
/// a worker's leaves only), so holders shrink down the path.
#[derive(Debug, Default)]
struct PageIndex {
    by_hash: PassThroughMap<u32>,
    /// Slab of nodes; freed slots are reused.
    nodes: Vec<IndexNode>,
    free_nodes: Vec<u32>,
    workers: BTreeMap<WorkerId, WorkerTree>,
}

#[derive(Debug, Default)]
struct IndexNode {
    hash: u64,
    /// `NO_NODE` for a first page.
    parent: u32,
    /// Sorted by worker id.
    holders: SmallVec<[Holder; 1]>,
}

#[derive(Debug, Clone, Copy)]
struct Holder {
    worker: WorkerId,
    last_access_us: u64,
    /// Child nodes that this worker also holds; zero makes the node one of the worker's leaves.
    children: u32,
}

#[derive(Debug, Default)]
struct WorkerTree {
    pages: usize,
    /// The worker's leaves by (last access, node): the trim order.
    leaves: BTreeSet<(u64, u32)>,
}

const NO_NODE: u32 = u32::MAX;

impl IndexNode {
    fn holder(&self, w: WorkerId) -> Option<usize> {
        self.holders.binary_search_by_key(&w, |h| h.worker).ok()
    }
}

impl PageIndex {
    /// For every worker holding the prompt's first page: how many leading pages its tree holds.
    /// Sorted by worker id.
    /// Also returns the nodes found along the path, which `insert` then need not look up again.
    fn match_depths(&self, hashes: &[u64]) -> (Vec<(WorkerId, usize)>, Vec<u32>) {
        let mut depths: Vec<(WorkerId, usize)> = Vec::new();
        let mut path = Vec::new();
        for (i, h) in hashes.iter().enumerate() {
            let Some(&id) = self.by_hash.get(h) else {
                break;
            };
            path.push(id);
            let node = &self.nodes[id as usize];
            if i == 0 {
                depths.extend(node.holders.iter().map(|h| (h.worker, 1)));
                continue;
            }
            // Holders here are a subset of the previous level's, so each is already in `depths`.
            for h in &node.holders {
                if let Ok(j) = depths.binary_search_by_key(&h.worker, |&(w, _)| w) {
                    depths[j].1 = i + 1;
                }
            }
            if node.holders.is_empty() {
                break;
            }
        }
        (depths, path)
    }

    /// Adds the pages `hashes` to `w`'s tree, refreshing the path's access time. `known` are the
    /// nodes of the path's first pages, as `match_depths` found them.
    fn insert(&mut self, w: WorkerId, hashes: &[u64], known: &[u32], now_us: u64) {
        let tree = self.workers.entry(w).or_default();
        // The previous node on the path, and its leaf-set key if it was one of `w`'s leaves.
        let mut prev: Option<(u32, Option<u64>)> = None;
        for (i, &h) in hashes.iter().enumerate() {
            let found = known
                .get(i)
                .copied()
                .or_else(|| self.by_hash.get(&h).copied());
            let id = match found {
                Some(id) => id,
                None => {
                    let id = match self.free_nodes.pop() {
                        Some(id) => id,
                        None => {
                            self.nodes.push(IndexNode::default());
                            (self.nodes.len() - 1) as u32
                        }
                    };
                    self.nodes[id as usize] = IndexNode {
                        hash: h,
                        parent: prev.map_or(NO_NODE, |(p, _)| p),
                        holders: SmallVec::new(),
                    };
                    self.by_hash.insert(h, id);
                    id
                }
            };
            let node = &mut self.nodes[id as usize];
            let (added, leaf_key) = match node.holder(w) {
                Some(i) => {
                    let holder = &mut node.holders[i];
                    let old = holder.last_access_us;
                    holder.last_access_us = old.max(now_us);
                    (false, (holder.children == 0).then_some(old))
                }
                None => {
                    let at = node.holders.partition_point(|x| x.worker < w);
                    let holder = Holder {
                        worker: w,
                        last_access_us: now_us,
                        children: 0,
                    };
                    node.holders.insert(at, holder);
                    (true, None)
                }
            };
            if added {
                tree.pages += 1;
                if let Some((p, p_leaf)) = prev {
                    // The parent gains a child for `w`: it stops being one of `w`'s leaves.
                    if let Some(old) = p_leaf {
                        tree.leaves.remove(&(old, p));
                    }
                    let pn = &mut self.nodes[p as usize];
                    if let Some(i) = pn.holder(w) {
                        pn.holders[i].children += 1;
                    }
                }
            }
            prev = Some((id, leaf_key));
        }
        // Only the path's last node can be a leaf now: re-key it under its new access time.
        let Some((end, leaf_key)) = prev else {
            return;
        };
        if let Some(old) = leaf_key {
            tree.leaves.remove(&(old, end));
        }
        let node = &self.nodes[end as usize];
        if let Some(i) = node.holder(w) {
            let h = node.holders[i];
            if h.children == 0 {
                tree.leaves.insert((h.last_access_us, end));
            }
        }
    }

    /// Removes `w`'s least recently used leaves until its tree has at most `pages_max` pages.
    fn trim(&mut self, w: WorkerId, pages_max: usize) {
        let Some(tree) = self.workers.get_mut(&w) else {
            return;
        };
        // A parent that just became a leaf is usually the oldest leaf now (it was last touched no later
        // than its child): it is held here and trimmed next without a round trip through the set.
        let mut pending: Option<(u64, u32)> = None;
        while tree.pages > pages_max {
            let next = match pending.take() {
                Some(p) if tree.leaves.first().is_none_or(|f| p < *f) => Some(p),
                Some(p) => {
                    tree.leaves.insert(p);
                    tree.leaves.pop_first()
                }
                None => tree.leaves.pop_first(),
            };
            let Some((_, id)) = next else {
                return;
            };
            tree.pages -= 1;
            let node = &mut self.nodes[id as usize];
            if let Some(i) = node.holder(w) {
                node.holders.remove(i);
            }
            let parent = node.parent;
            if node.holders.is_empty() {
                let hash = node.hash;
                self.by_hash.remove(&hash);
                node.holders = SmallVec::new();
                self.free_nodes.push(id);
            }
            // A parent that `w` does not hold can only come from a hash collision: nothing to do.
            if let Some(p) = self.nodes.get_mut(parent as usize)
                && let Some(i) = p.holder(w)
            {
                let ph = &mut p.holders[i];
                ph.children = ph.children.saturating_sub(1);
                if ph.children == 0 {
                    pending = Some((ph.last_access_us, parent));
                }
            }
        }
        if let Some(p) = pending {
            tree.leaves.insert(p);
        }
    }

    /// Drops every page of `w`'s tree. O(nodes): workers leave rarely.
    fn forget(&mut self, w: WorkerId) {
        if self.workers.remove(&w).is_none() {
            return;
        }
        let free: BTreeSet<u32> = self.free_nodes.iter().copied().collect();
        for id in 0..self.nodes.len() as u32 {
            if free.contains(&id) {
                continue;
            }
            let node = &mut self.nodes[id as usize];
            if let Some(i) = node.holder(w) {
                node.holders.remove(i);
                if node.holders.is_empty() {
                    let hash = node.hash;
                    self.by_hash.remove(&hash);
                    node.holders = SmallVec::new();
                    self.free_nodes.push(id);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Decode DP-group balancing
// ---------------------------------------------------------------------------------------------------

/// A decode DP-attention group's load: the last report plus what the gateway routed there since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLoad {
    pub group: WorkerId,
    /// Tokens left to generate plus tokens being prefilled for the group's sequences.
    pub outstanding_tokens: u64,
    pub pages_free: usize,
    pub running: usize,
    pub max_running: usize,
    pub alive: bool,
}

/// How [`DecodeBalancer`] picks among groups with room.
///
/// # Measured: exact-min against power-of-two-choices
///
/// `cargo run --release -p duet-core --example balance` (core/examples/balance.rs): G groups of
/// `max_running` 128 and 4096 pages; Poisson arrivals at 60% and 90% of all decode slots; prompts of
/// 64–4096 tokens; `max_tokens` 256/1024/4096 with actual lengths exponential (mean 400, capped at
/// `max_tokens`), so `outstanding_tokens`, which can only count `max_tokens`, is an estimate; 2–12
/// steps of prefill before a sequence joins its group. The balancer sees a fresh report every R steps
/// plus the gateway's own increments for what it routed since. 10 000 steps after 2 000 of warm-up,
/// mean of 3 seeds. "out", "batch" and "ctx" are max/mean across groups of outstanding tokens, batch
/// size and KV tokens attended over, averaged over steps (with DP attention + EP every group waits for
/// the slowest at each all-to-all, so the largest batch and context set the step time); "p99" is the
/// 99th percentile of per-group batch size; "queued" the mean number of requests the gateway held
/// because no group had room.
///
/// ```text
/// load   G   R  policy        out max/mean  batch max/mean  ctx max/mean  batch p99  queued
/// 0.60   8   1  exact-min            1.023           1.157         1.159       94.3    0.00
/// 0.60   8   1  power-of-two         1.043           1.145         1.162       93.0    0.00
/// 0.60   8   4  exact-min            1.028           1.144         1.163       93.7    0.00
/// 0.60   8   4  power-of-two         1.047           1.137         1.147       93.0    0.00
/// 0.60   8  16  exact-min            1.044           1.147         1.164       93.7    0.00
/// 0.60   8  16  power-of-two         1.057           1.136         1.153       92.3    0.00
/// 0.60  32   1  exact-min            1.030           1.227         1.238       94.7    0.00
/// 0.60  32   1  power-of-two         1.065           1.207         1.232       93.3    0.00
/// 0.60  32   4  exact-min            1.038           1.224         1.238       94.7    0.00
/// 0.60  32   4  power-of-two         1.069           1.208         1.228       93.3    0.00
/// 0.60  32  16  exact-min            1.060           1.210         1.226       93.7    0.00
/// 0.60  32  16  power-of-two         1.083           1.198         1.224       92.7    0.00
/// 0.90   8   1  exact-min            1.024           1.093         1.125      127.3    0.01
/// 0.90   8   1  power-of-two         1.039           1.091         1.128      127.0    0.01
/// 0.90   8   4  exact-min            1.031           1.088         1.131      127.0    0.03
/// 0.90   8   4  power-of-two         1.044           1.083         1.128      126.7    0.03
/// 0.90   8  16  exact-min            1.076           1.073         1.173      125.3    6.46
/// 0.90   8  16  power-of-two         1.093           1.072         1.176      125.3    6.86
/// 0.90  32   1  exact-min            1.026           1.120         1.184      127.0    0.00
/// 0.90  32   1  power-of-two         1.051           1.116         1.176      127.0    0.00
/// 0.90  32   4  exact-min            1.034           1.115         1.192      127.0    0.00
/// 0.90  32   4  power-of-two         1.058           1.113         1.178      127.0    0.00
/// 0.90  32  16  exact-min            1.084           1.098         1.226      125.0    0.09
/// 0.90  32  16  power-of-two         1.106           1.096         1.208      125.0    0.13
/// ```
///
/// Conclusion: neither dominates, and the differences are small. Exact-min keeps outstanding tokens
/// 1.3–3.5 points tighter in every row and queues less at saturation with stale reports (R = 16).
/// Power-of-two keeps batch sizes up to 2 points tighter and its p99 batch up to 1.4 sequences lower at
/// 60% load, because exact-min equalises an estimate of remaining work, not batch size; near
/// saturation, where step time matters most, that edge shrinks to under 0.5 point. Staleness costs
/// both little: the gateway adds what it routed since the last report, which removes the herding that
/// motivates two choices. So [`BalancePolicy::ExactMin`] is the default; power-of-two remains for
/// setups where the gateway cannot count its own routings (several gateways sharing the groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BalancePolicy {
    #[default]
    ExactMin,
    PowerOfTwo {
        seed: u64,
    },
}

impl BalancePolicy {
    /// Names used by the config file.
    pub const NAMES: [&'static str; 2] = ["exact-min", "power-of-two"];

    pub fn name(&self) -> &'static str {
        match self {
            BalancePolicy::ExactMin => Self::NAMES[0],
            BalancePolicy::PowerOfTwo { .. } => Self::NAMES[1],
        }
    }

    /// The policy a config name stands for; `seed` seeds power-of-two's sampling.
    pub fn from_name(name: &str, seed: u64) -> Option<Self> {
        match name {
            "exact-min" => Some(BalancePolicy::ExactMin),
            "power-of-two" => Some(BalancePolicy::PowerOfTwo { seed }),
            _ => None,
        }
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014; the seeder of xoshiro): a tiny, seeded, reproducible generator,
/// so routing decisions replay exactly from a seed.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; bias below 2^-64 · n). `n` must be > 0.
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Decode DP-group balancing. See the module doc and [`BalancePolicy`].
#[derive(Debug)]
pub struct DecodeBalancer {
    policy: BalancePolicy,
    rng: SplitMix64,
}

impl DecodeBalancer {
    pub fn new(policy: BalancePolicy) -> Self {
        let seed = match policy {
            BalancePolicy::PowerOfTwo { seed } => seed,
            BalancePolicy::ExactMin => 0,
        };
        DecodeBalancer {
            policy,
            rng: SplitMix64::new(seed),
        }
    }

    pub fn policy(&self) -> BalancePolicy {
        self.policy
    }

    /// The group for a sequence needing `pages_needed` pages, or `None` when no live group has room.
    pub fn route(&mut self, groups: &[GroupLoad], pages_needed: usize) -> Option<WorkerId> {
        let eligible: Vec<&GroupLoad> = groups
            .iter()
            .filter(|g| g.alive && g.pages_free >= pages_needed && g.running < g.max_running)
            .collect();
        // Lower is better: fewest outstanding tokens, then most free pages, then lowest id.
        let key = |g: &GroupLoad| (g.outstanding_tokens, Reverse(g.pages_free), g.group);
        let chosen = match (self.policy, eligible.len()) {
            (_, 0) => return None,
            (BalancePolicy::PowerOfTwo { .. }, n) if n >= 2 => {
                let i = self.rng.below(n);
                let mut j = self.rng.below(n - 1);
                if j >= i {
                    j += 1;
                }
                std::cmp::min_by_key(eligible[i], eligible[j], |g| key(g))
            }
            _ => *eligible.iter().min_by_key(|g| key(g)).expect("not empty"),
        };
        Some(chosen.group)
    }
}

#[cfg(test)]
mod tests;
