//! The gateway's placement policy: where each sequence is prefilled and decoded, and when. The
//! server's gateway actor and the simulator both drive this one core, so `duet plan` predicts
//! the policy the server runs.
//!
//! # Policy
//!
//! Arriving sequences wait in one FIFO queue. The head is placed when there is room for it, and a
//! head that does not fit holds the ones behind it (no head-of-line skipping, as core's schedulers
//! do, so a long request is never starved):
//!
//! 1. **Decode first** (DESIGN.md step 2): a decode rank whose *committed* pages — the pages every
//!    sequence placed there holds at its full length, prompt plus `max_new_tokens` (or at most
//!    `commit_new_tokens_max` of them) — leave room
//!    for this one, and whose placed sequences are below its batch cap. Admitting against
//!    commitments rather than today's free pages means sequences placed together cannot outgrow
//!    the pool and force recompute (DeepSeek's decode load balancing by KV usage). The choice is
//!    two-level, as in SGLang PD (router → server → DP rank): core's [`DecodeBalancer`] picks a
//!    group, then a rank in it.
//! 2. **Then prefill**, while some prefill rank's queued prompt tokens are below
//!    `prefill_queued_tokens_max` (the gateway holds the rest, so prefix affinity binds late):
//!    core's [`PrefillRouter`] (prefix affinity, then load) picks a group, then a rank.
//! 3. A sequence whose full length exceeds every live decode rank's pool can never be placed: it
//!    is refused at once instead of blocking the queue.
//!
//! A sequence's commitment is released when it finishes or is aborted ([`GatewayCore::handle_done`]);
//! drivers that see tokens stream ([`GatewayCore::handle_tokens`]) also shrink its outstanding
//! tokens, which the balancer prefers low.
//!
//! Membership is dynamic: groups join, report and leave ([`GatewayCore::set_prefill_group`],
//! [`GatewayCore::set_decode_group`], …); a group that leaves takes its commitments with it (its
//! sequences are re-run under new ids).

use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashMap;

use crate::pages_for;
use crate::route::{
    BalancePolicy, DecodeBalancer, GroupLoad, PrefillLoad, PrefillRouter, PrefillRouterConfig,
};
use crate::types::{SeqId, WorkerId};

/// A rank: one scheduler and KV pool (a DP-attention rank) inside a group (an EP group, or a
/// worker process holding one rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RankId {
    pub group: u32,
    pub rank: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GatewayConfig {
    /// Whether sequences need a prefill placement (false: decode-only measurements).
    pub prefill: bool,
    /// Whether sequences need a decode placement (false: prefill-only measurements).
    pub decode: bool,
    /// A prefill rank accepts new prompts while its queued prompt tokens are below this.
    pub prefill_queued_tokens_max: u64,
    /// The router's model of one rank's prefix cache (bounded by the rank's pool).
    pub rank_router: PrefillRouterConfig,
    /// The router's model of a group's prefix cache (all its ranks' pools).
    pub group_router: PrefillRouterConfig,
    pub balance: BalancePolicy,
    /// A sequence commits its prompt plus at most this many new tokens on its decode rank.
    /// `usize::MAX` (the default) commits full lengths and never overcommits; less lets more
    /// sequences share a pool, and a rank that runs out preempts and recomputes (SGLang's
    /// reserved decode tokens).
    pub commit_new_tokens_max: usize,
    /// While no rank of a needed role is alive, a sequence waits at most this long, then fails
    /// ([`GatewayCore::handle_tick`]); waiting for room has no limit of its own.
    pub no_worker_wait_max_us: u64,
}

/// A sequence to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PdRequest {
    pub seq: SeqId,
    pub prompt_len: usize,
    pub max_new_tokens: usize,
    /// [`crate::route::page_chain_hashes`] of the prompt.
    pub page_hashes: Vec<u64>,
}

impl PdRequest {
    /// Pages the sequence holds on its decode rank at its full length.
    pub fn full_pages(&self) -> usize {
        pages_for(self.prompt_len.saturating_add(self.max_new_tokens))
    }
}

/// The gateway's decision for one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayAction {
    /// Send the sequence to these ranks (`None` where the role is not in use).
    Place {
        req: PdRequest,
        prefill: Option<RankId>,
        decode: Option<RankId>,
        /// Prompt tokens the chosen prefill group's cache is known to hold (0: chosen by load).
        prefix_tokens: usize,
    },
    /// No live decode rank can ever hold the sequence: fail it.
    Refuse { req: PdRequest, pool_pages: usize },
    /// It waited longer than `no_worker_wait_max_us` while a role had no live rank.
    Expire { req: PdRequest },
}

#[derive(Debug, Clone, Copy, Default)]
struct PrefillRank {
    queued_tokens: u64,
    running: usize,
    alive: bool,
}

#[derive(Debug)]
struct PrefillGroup {
    ranks: Vec<PrefillRank>,
    router: PrefillRouter,
}

#[derive(Debug, Clone, Copy, Default)]
struct DecodeRank {
    pages_total: usize,
    max_running: usize,
    /// Pages the placed sequences hold at their full length.
    committed_pages: usize,
    /// Tokens still to generate for the placed sequences.
    outstanding_tokens: u64,
    /// Sequences placed and not finished.
    assigned: usize,
    alive: bool,
}

impl DecodeRank {
    fn load(&self, id: u32) -> GroupLoad {
        GroupLoad {
            group: WorkerId(id),
            outstanding_tokens: self.outstanding_tokens,
            pages_free: self.pages_total.saturating_sub(self.committed_pages),
            running: self.assigned,
            max_running: self.max_running,
            alive: self.alive,
        }
    }
}

#[derive(Debug)]
struct DecodeGroup {
    ranks: Vec<DecodeRank>,
    balancer: DecodeBalancer,
}

#[derive(Debug, Clone, Copy)]
struct Placed {
    at: RankId,
    pages: usize,
    /// Tokens still counted in its rank's `outstanding_tokens`.
    charged: u64,
}

#[derive(Debug)]
struct Waiting {
    req: PdRequest,
    since_us: u64,
}

/// The gateway's placement state. See the module doc.
#[derive(Debug)]
pub struct GatewayCore {
    cfg: GatewayConfig,
    /// By group id (worker ids of processes are sparse), iterated in id order.
    prefill: BTreeMap<u32, PrefillGroup>,
    decode: BTreeMap<u32, DecodeGroup>,
    group_router: PrefillRouter,
    group_balancer: DecodeBalancer,
    queue: VecDeque<Waiting>,
    placed: FxHashMap<SeqId, Placed>,
    /// Live prefill ranks whose queued tokens are below the limit (asked before every placement;
    /// counting would scan every rank).
    prefill_ranks_with_room: usize,
    /// The largest live decode rank's pool, kept current on membership changes (asked before
    /// every placement; scanning every rank there doubled the simulator's time).
    largest_decode_pool: Option<usize>,
    actions: VecDeque<GatewayAction>,
    scratch_prefill: Vec<PrefillLoad>,
    scratch_decode: Vec<GroupLoad>,
}

impl GatewayCore {
    pub fn new(cfg: GatewayConfig) -> Self {
        Self {
            group_router: PrefillRouter::new(cfg.group_router),
            group_balancer: DecodeBalancer::new(cfg.balance),
            cfg,
            prefill: BTreeMap::new(),
            decode: BTreeMap::new(),
            queue: VecDeque::new(),
            placed: FxHashMap::default(),
            prefill_ranks_with_room: 0,
            largest_decode_pool: None,
            actions: VecDeque::new(),
            scratch_prefill: Vec::new(),
            scratch_decode: Vec::new(),
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Membership and load
    // ---------------------------------------------------------------------------------------------

    /// A prefill group with `ranks` ranks joined (or is already there: unchanged).
    pub fn set_prefill_group(&mut self, group: u32, ranks: usize) {
        if self
            .prefill
            .get(&group)
            .is_some_and(|g| g.ranks.len() == ranks)
        {
            return;
        }
        if let Some(old) = self.prefill.remove(&group) {
            self.prefill_ranks_with_room -= old.ranks.iter().filter(|r| self.has_room(r)).count();
        }
        let ranks = vec![
            PrefillRank {
                alive: true,
                ..PrefillRank::default()
            };
            ranks
        ];
        self.prefill_ranks_with_room += ranks.len();
        self.prefill.insert(
            group,
            PrefillGroup {
                ranks,
                router: PrefillRouter::new(self.cfg.rank_router),
            },
        );
    }

    /// A prefill group left: its prefix trees go (a restarted worker's cache is empty).
    pub fn remove_prefill_group(&mut self, group: u32) {
        if let Some(g) = self.prefill.remove(&group) {
            self.prefill_ranks_with_room -= g.ranks.iter().filter(|r| self.has_room(r)).count();
            self.group_router.forget_worker(WorkerId(group));
        }
    }

    fn has_room(&self, r: &PrefillRank) -> bool {
        r.alive && r.queued_tokens < self.cfg.prefill_queued_tokens_max
    }

    /// A prefill rank's queued prompt tokens and running sequences, as of now.
    pub fn update_prefill(&mut self, at: RankId, queued_tokens: u64, running: usize) {
        let max = self.cfg.prefill_queued_tokens_max;
        let Some(g) = self.prefill.get_mut(&at.group) else {
            return;
        };
        let Some(r) = g.ranks.get_mut(at.rank as usize) else {
            return;
        };
        let had = r.alive && r.queued_tokens < max;
        r.queued_tokens = queued_tokens;
        r.running = running;
        let has = r.alive && r.queued_tokens < max;
        match (had, has) {
            (true, false) => self.prefill_ranks_with_room -= 1,
            (false, true) => self.prefill_ranks_with_room += 1,
            _ => {}
        }
    }

    /// A decode group joined, or its ranks' pools and batch caps changed: `(pages_total,
    /// max_running)` per rank. Commitments of a rank that stays are kept.
    pub fn set_decode_group(&mut self, group: u32, ranks: &[(usize, usize)]) {
        let balance = self.cfg.balance;
        let g = self.decode.entry(group).or_insert_with(|| DecodeGroup {
            ranks: Vec::new(),
            balancer: DecodeBalancer::new(balance),
        });
        g.ranks.resize(ranks.len(), DecodeRank::default());
        for (r, &(pages_total, max_running)) in g.ranks.iter_mut().zip(ranks) {
            r.pages_total = pages_total;
            r.max_running = max_running;
            r.alive = true;
        }
        self.largest_decode_pool = self.scan_largest_decode_pool();
    }

    /// A decode group left: its commitments go with it (its sequences are re-run under new ids).
    pub fn remove_decode_group(&mut self, group: u32) {
        if self.decode.remove(&group).is_some() {
            self.placed.retain(|_, p| p.at.group != group);
            self.largest_decode_pool = self.scan_largest_decode_pool();
        }
    }

    pub fn prefill_groups(&self) -> impl Iterator<Item = u32> + '_ {
        self.prefill.keys().copied()
    }

    pub fn decode_groups(&self) -> impl Iterator<Item = u32> + '_ {
        self.decode.keys().copied()
    }

    // ---------------------------------------------------------------------------------------------
    // Sequences
    // ---------------------------------------------------------------------------------------------

    /// A sequence arrived; [`Self::pump`] places what fits.
    pub fn handle_arrival(&mut self, now_us: u64, req: PdRequest) {
        self.queue.push_back(Waiting {
            req,
            since_us: now_us,
        });
    }

    /// A placement the driver could not deliver (the worker died in between): its commitment is
    /// released and it goes back to the head of the queue.
    pub fn handle_undelivered(&mut self, now_us: u64, req: PdRequest) {
        self.handle_done(req.seq);
        self.queue.push_front(Waiting {
            req,
            since_us: now_us,
        });
    }

    /// `n` tokens of `seq` were generated: its outstanding tokens shrink.
    pub fn handle_tokens(&mut self, seq: SeqId, n: u64) {
        let Some(p) = self.placed.get_mut(&seq) else {
            return;
        };
        let n = n.min(p.charged);
        p.charged -= n;
        let at = p.at;
        if let Some(r) = self.decode_rank_mut(at) {
            r.outstanding_tokens -= n;
        }
    }

    /// `seq` finished, was aborted or failed: its commitment is released, or it leaves the queue.
    /// Returns whether it was known.
    pub fn handle_done(&mut self, seq: SeqId) -> bool {
        if let Some(p) = self.placed.remove(&seq) {
            if let Some(r) = self.decode_rank_mut(p.at) {
                r.assigned -= 1;
                r.outstanding_tokens -= p.charged;
                r.committed_pages -= p.pages;
            }
            return true;
        }
        if let Some(i) = self.queue.iter().position(|w| w.req.seq == seq) {
            self.queue.remove(i);
            return true;
        }
        false
    }

    /// Fails sequences that waited too long while a needed role had no live rank.
    pub fn handle_tick(&mut self, now_us: u64) {
        let missing = (self.cfg.prefill && self.prefill_groups().next().is_none())
            || (self.cfg.decode && self.decode_groups().next().is_none());
        if !missing {
            return;
        }
        let max = self.cfg.no_worker_wait_max_us;
        let (late, keep): (VecDeque<Waiting>, VecDeque<Waiting>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|w| now_us.saturating_sub(w.since_us) > max);
        self.queue = keep;
        self.actions.extend(
            late.into_iter()
                .map(|w| GatewayAction::Expire { req: w.req }),
        );
    }

    /// Places sequences from the head of the queue while there is room (see the module doc).
    pub fn pump(&mut self, now_us: u64) {
        self.pump_with(now_us, &mut |_| Vec::new());
    }

    /// [`Self::pump`] for a driver that leaves `page_hashes` empty at arrival and hashes a prompt
    /// only when it is placed (`hashes`), so a long queue does not hold every prompt's hashes
    /// (the simulator's saturating runs queue a million).
    pub fn pump_with(&mut self, now_us: u64, hashes: &mut dyn FnMut(&PdRequest) -> Vec<u64>) {
        while let Some(front) = self.queue.front() {
            if self.cfg.prefill && self.prefill_ranks_with_room == 0 {
                break;
            }
            let decode = if self.cfg.decode {
                let pages = front.req.full_pages();
                let pool = self.largest_decode_pool;
                if pool.is_some_and(|p| pages > p) {
                    let w = self.queue.pop_front().expect("front exists");
                    self.actions.push_back(GatewayAction::Refuse {
                        req: w.req,
                        pool_pages: pool.unwrap_or(0),
                    });
                    continue;
                }
                let (seq, charged) = (front.req.seq, front.req.max_new_tokens as u64);
                let commit =
                    pages_for(front.req.prompt_len.saturating_add(
                        front.req.max_new_tokens.min(self.cfg.commit_new_tokens_max),
                    ));
                match self.place_decode(seq, commit, charged) {
                    Some(at) => Some(at),
                    None => break,
                }
            } else {
                None
            };
            let w = self.queue.pop_front().expect("front exists");
            let (prefill, prefix_tokens) = if self.cfg.prefill {
                let computed;
                let page_hashes = if w.req.page_hashes.is_empty() && w.req.prompt_len > 0 {
                    computed = hashes(&w.req);
                    &computed
                } else {
                    &w.req.page_hashes
                };
                let at = self.place_prefill(page_hashes, w.req.prompt_len, now_us);
                debug_assert!(at.is_some(), "a prefill rank has room");
                (at.map(|(r, _)| r), at.map_or(0, |(_, m)| m))
            } else {
                (None, 0)
            };
            self.actions.push_back(GatewayAction::Place {
                req: w.req,
                prefill,
                decode,
                prefix_tokens,
            });
        }
    }

    /// The next decision for the driver.
    pub fn poll_action(&mut self) -> Option<GatewayAction> {
        self.actions.pop_front()
    }

    /// Sequences waiting to be placed.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Sequences placed and not done.
    pub fn placed(&self) -> usize {
        self.placed.len()
    }

    fn scan_largest_decode_pool(&self) -> Option<usize> {
        self.decode
            .values()
            .flat_map(|g| g.ranks.iter().filter(|r| r.alive))
            .map(|r| r.pages_total)
            .max()
    }

    fn decode_rank_mut(&mut self, at: RankId) -> Option<&mut DecodeRank> {
        self.decode
            .get_mut(&at.group)?
            .ranks
            .get_mut(at.rank as usize)
    }

    /// Chooses a decode group and rank with room and commits the sequence's full length there.
    fn place_decode(&mut self, seq: SeqId, pages_needed: usize, charged: u64) -> Option<RankId> {
        // Group loads are sums over ranks; only the chosen group's ranks are listed one by one.
        let mut loads = std::mem::take(&mut self.scratch_decode);
        loads.clear();
        for (&g, grp) in &self.decode {
            let mut load = GroupLoad {
                group: WorkerId(g),
                outstanding_tokens: 0,
                pages_free: 0,
                running: 0,
                max_running: 0,
                alive: false,
            };
            for (k, rank) in grp.ranks.iter().enumerate() {
                let l = rank.load(k as u32);
                load.outstanding_tokens += l.outstanding_tokens;
                load.running += l.running;
                load.max_running += l.max_running;
                load.alive |= l.alive;
                if l.alive && l.running < l.max_running && l.pages_free >= pages_needed {
                    load.pages_free = load.pages_free.max(l.pages_free);
                }
            }
            loads.push(load);
        }
        let chosen = self.group_balancer.route(&loads, pages_needed);
        let chosen = chosen.and_then(|g| {
            let grp = self.decode.get_mut(&g.0)?;
            loads.clear();
            loads.extend(grp.ranks.iter().enumerate().map(|(k, r)| r.load(k as u32)));
            let k = grp.balancer.route(&loads, pages_needed)?;
            Some(RankId {
                group: g.0,
                rank: k.0,
            })
        });
        self.scratch_decode = loads;
        let at = chosen?;
        let rank = self.decode_rank_mut(at).expect("chosen above");
        rank.assigned += 1;
        rank.outstanding_tokens += charged;
        rank.committed_pages += pages_needed;
        if let Some(old) = self.placed.insert(
            seq,
            Placed {
                at,
                pages: pages_needed,
                charged,
            },
        ) {
            // A sequence id placed twice: release the first placement's commitment.
            if let Some(r) = self.decode_rank_mut(old.at) {
                r.assigned -= 1;
                r.outstanding_tokens -= old.charged;
                r.committed_pages -= old.pages;
            }
        }
        Some(at)
    }

    fn prefill_rank_load(&self, g: &PrefillGroup, k: usize) -> PrefillLoad {
        let r = &g.ranks[k];
        PrefillLoad {
            worker: WorkerId(k as u32),
            queued_tokens: r.queued_tokens,
            running: r.running,
            alive: self.has_room(r),
        }
    }

    /// Routes a prompt to a prefill group and rank (core's PrefillRouter at both levels) and
    /// counts its tokens as queued there.
    fn place_prefill(
        &mut self,
        page_hashes: &[u64],
        prompt_len: usize,
        now_us: u64,
    ) -> Option<(RankId, usize)> {
        let mut loads = std::mem::take(&mut self.scratch_prefill);
        loads.clear();
        for (&g, grp) in &self.prefill {
            let mut load = PrefillLoad {
                worker: WorkerId(g),
                queued_tokens: 0,
                running: 0,
                alive: false,
            };
            for k in 0..grp.ranks.len() {
                let l = self.prefill_rank_load(grp, k);
                load.queued_tokens += l.queued_tokens;
                load.running += l.running;
                load.alive |= l.alive;
            }
            loads.push(load);
        }
        let chosen = self.group_router.route_pages(page_hashes, &loads, now_us);
        let matched = chosen.map_or(0, |(_, m)| m);
        let at = chosen.and_then(|(gw, _)| {
            let grp = self.prefill.get(&gw.0)?;
            loads.clear();
            loads.extend((0..grp.ranks.len()).map(|k| self.prefill_rank_load(grp, k)));
            let grp = self.prefill.get_mut(&gw.0)?;
            let (kw, _) = grp.router.route_pages(page_hashes, &loads, now_us)?;
            Some(RankId {
                group: gw.0,
                rank: kw.0,
            })
        });
        self.scratch_prefill = loads;
        let at = at?;
        let grp = self.prefill.get(&at.group)?;
        let r = grp.ranks[at.rank as usize];
        self.update_prefill(at, r.queued_tokens + prompt_len as u64, r.running);
        Some((at, matched))
    }

    /// Panics naming the first broken invariant: commitments add up per rank, and the count of
    /// prefill ranks with room is right.
    pub fn check_invariants(&self) {
        let mut sums: FxHashMap<RankId, (usize, usize, u64)> = FxHashMap::default();
        for p in self.placed.values() {
            let e = sums.entry(p.at).or_default();
            e.0 += 1;
            e.1 += p.pages;
            e.2 += p.charged;
        }
        for (&g, grp) in &self.decode {
            for (k, r) in grp.ranks.iter().enumerate() {
                let at = RankId {
                    group: g,
                    rank: k as u32,
                };
                let (n, pages, charged) = sums.get(&at).copied().unwrap_or_default();
                assert_eq!(
                    (r.assigned, r.committed_pages, r.outstanding_tokens),
                    (n, pages, charged),
                    "decode rank {at:?}: commitments"
                );
            }
        }
        let with_room = self
            .prefill
            .values()
            .flat_map(|g| &g.ranks)
            .filter(|r| self.has_room(r))
            .count();
        assert_eq!(
            with_room, self.prefill_ranks_with_room,
            "prefill ranks with room"
        );
    }
}
