//! Expert parallelism's decisions, sans IO: where each routed expert's copies live in an EP group,
//! which copy each routed token goes to, and the lock-step exchange of one MoE layer. The engine's
//! ranks and the simulator make these decisions with the same code.
//!
//! An EP group of `ranks` ranks holds `slots` physical expert slots, `slots / ranks` per rank
//! (rank `r` holds slots `r·per_rank .. (r+1)·per_rank`); each slot holds one logical expert and
//! every expert has at least one copy ([`ExpertMap`], from static sharding or from
//! `eplb::rebalance`). In a MoE layer each rank routes its own tokens, then
//! [`plan_dispatch`] sends each (token, k) pair to one copy of its expert: the rank's own copy when
//! it holds one (no traffic), else the copy that has received the fewest rows so far in this
//! layer (ties to the lowest slot), so redundant copies share a hot expert's load. The plan keeps
//! every destination's rows in (token, k) order, which is what lets the combine sum each token's
//! expert outputs in `k` order: the result is bit-identical to running every expert on one rank.
//!
//! [`Exchange`] is one rank's view of one exchange round (dispatch or combine): every rank sends
//! every other rank exactly one block per round, possibly empty (an idle rank still takes part,
//! as SGLang's DP attention runs idle batches), and the round completes when a block from every
//! rank arrived; a rank silent past the deadline fails the round with the ranks that were missing.

use smallvec::SmallVec;
use thiserror::Error;

use crate::eplb::Placement;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EpError {
    #[error("EP group: {0}")]
    Shape(String),
    #[error("token {token} routed to expert {expert}, but the layer has {experts} experts")]
    UnknownExpert {
        token: usize,
        expert: u32,
        experts: usize,
    },
    #[error("routing of {len} entries is not whole tokens of top-{top_k}")]
    Routing { len: usize, top_k: usize },
    #[error("rank {rank} is not in this group of {ranks}")]
    UnknownRank { rank: usize, ranks: usize },
    #[error("block for round {got} while round {want} is open (from rank {from})")]
    WrongRound { from: usize, got: u64, want: u64 },
    #[error("rank {from} sent two blocks in round {round}")]
    Duplicate { from: usize, round: u64 },
    #[error("round {round}: no block from ranks {missing:?} within {waited_ms} ms")]
    Timeout {
        round: u64,
        missing: Vec<usize>,
        waited_ms: u64,
    },
}

/// Where every routed expert's copies live in one MoE layer of an EP group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertMap {
    ranks: usize,
    per_rank: usize,
    /// The logical expert in each physical slot.
    slot_expert: Vec<u32>,
    /// Each logical expert's slots, ascending.
    replicas: Vec<SmallVec<[u32; 2]>>,
}

impl ExpertMap {
    /// Experts `r·E/ranks .. (r+1)·E/ranks` on rank `r`, no copies: what a group runs before it
    /// has seen any load.
    pub fn static_sharding(experts: usize, ranks: usize) -> Result<Self, EpError> {
        if ranks == 0 || experts == 0 || !experts.is_multiple_of(ranks) {
            return Err(EpError::Shape(format!(
                "{experts} routed experts do not split evenly over {ranks} ranks"
            )));
        }
        Self::new((0..experts as u32).collect(), experts, ranks)
    }

    /// The placement `eplb::rebalance` chose (one GPU per rank).
    pub fn from_placement(p: &Placement) -> Result<Self, EpError> {
        Self::new(p.slot_expert.clone(), p.copies.len(), p.gpus())
    }

    /// `slot_expert[s]` is the expert in slot `s`; slots split evenly over `ranks`.
    pub fn new(slot_expert: Vec<u32>, experts: usize, ranks: usize) -> Result<Self, EpError> {
        if ranks == 0 || slot_expert.is_empty() || !slot_expert.len().is_multiple_of(ranks) {
            return Err(EpError::Shape(format!(
                "{} expert slots do not split evenly over {ranks} ranks",
                slot_expert.len()
            )));
        }
        let mut replicas = vec![SmallVec::new(); experts];
        for (slot, &e) in slot_expert.iter().enumerate() {
            match replicas.get_mut(e as usize) {
                Some(r) => r.push(slot as u32),
                None => {
                    return Err(EpError::Shape(format!(
                        "slot {slot} holds expert {e} of {experts}"
                    )));
                }
            }
        }
        if let Some(e) = replicas.iter().position(|r| r.is_empty()) {
            return Err(EpError::Shape(format!("expert {e} has no copy")));
        }
        Ok(Self {
            ranks,
            per_rank: slot_expert.len() / ranks,
            slot_expert,
            replicas,
        })
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    pub fn experts(&self) -> usize {
        self.replicas.len()
    }

    pub fn slots(&self) -> usize {
        self.slot_expert.len()
    }

    pub fn rank_of_slot(&self, slot: u32) -> usize {
        slot as usize / self.per_rank
    }

    pub fn expert_in(&self, slot: u32) -> u32 {
        self.slot_expert[slot as usize]
    }

    /// The slots rank `r` holds and their experts: what that rank loads (shard-only loading).
    pub fn shard(&self, rank: usize) -> impl Iterator<Item = (u32, u32)> + '_ {
        let lo = (rank * self.per_rank).min(self.slot_expert.len());
        let hi = ((rank + 1) * self.per_rank).min(self.slot_expert.len());
        (lo..hi).map(move |s| (s as u32, self.slot_expert[s]))
    }

    /// The copies of expert `e`, ascending.
    pub fn replicas(&self, e: u32) -> &[u32] {
        self.replicas.get(e as usize).map_or(&[], |r| r.as_slice())
    }
}

/// One routed (token, k) pair, sent to the copy in `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// The token's row in the sending rank's batch.
    pub token: u32,
    /// Which of the token's top-k choices this is.
    pub k: u16,
    pub slot: u32,
}

/// One rank's dispatch in one MoE layer: the rows for each destination rank, each list in
/// (token, k) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub to_rank: Vec<Vec<Assignment>>,
}

impl Dispatch {
    pub fn rows(&self) -> usize {
        self.to_rank.iter().map(Vec::len).sum()
    }

    /// Rows that leave this rank (`me`): the all-to-all's traffic.
    pub fn remote_rows(&self, me: usize) -> usize {
        self.to_rank
            .iter()
            .enumerate()
            .filter(|&(r, _)| r != me)
            .map(|(_, v)| v.len())
            .sum()
    }
}

/// Plans rank `me`'s dispatch for `experts` (token-major, `top_k` per token, as the router returns
/// them). `copy_rows[slot]` counts rows each copy received so far in this layer; the plan adds its
/// own (pass zeros for a fresh layer).
pub fn plan_dispatch(
    map: &ExpertMap,
    me: usize,
    experts: &[u32],
    top_k: usize,
    copy_rows: &mut [u64],
) -> Result<Dispatch, EpError> {
    if me >= map.ranks {
        return Err(EpError::UnknownRank {
            rank: me,
            ranks: map.ranks,
        });
    }
    if top_k == 0 || !experts.len().is_multiple_of(top_k) {
        return Err(EpError::Routing {
            len: experts.len(),
            top_k,
        });
    }
    if copy_rows.len() != map.slots() {
        return Err(EpError::Shape(format!(
            "{} copy counters for {} slots",
            copy_rows.len(),
            map.slots()
        )));
    }
    let mut to_rank = vec![Vec::new(); map.ranks];
    for (i, &e) in experts.iter().enumerate() {
        let token = i / top_k;
        let copies = map.replicas(e);
        if copies.is_empty() {
            return Err(EpError::UnknownExpert {
                token,
                expert: e,
                experts: map.experts(),
            });
        }
        let local = copies
            .iter()
            .copied()
            .filter(|&s| map.rank_of_slot(s) == me)
            .min_by_key(|&s| (copy_rows[s as usize], s));
        let slot = local.unwrap_or_else(|| {
            copies
                .iter()
                .copied()
                .min_by_key(|&s| (copy_rows[s as usize], s))
                .expect("non-empty")
        });
        copy_rows[slot as usize] += 1;
        to_rank[map.rank_of_slot(slot)].push(Assignment {
            token: token as u32,
            k: (i % top_k) as u16,
            slot,
        });
    }
    Ok(Dispatch { to_rank })
}

/// One rank's rows for one destination in one exchange round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowBlock {
    /// Routing metadata, e.g. the expert slot of each row; the caller's encoding.
    pub meta: Vec<u32>,
    /// The rows' bytes.
    pub data: Vec<u8>,
}

/// The state of one exchange round at one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundState {
    /// Blocks from these ranks have not arrived yet.
    Waiting {
        missing: Vec<usize>,
    },
    Complete,
}

/// One rank's lock-step exchange: rounds numbered from 0, one block from every rank per round.
#[derive(Debug, Clone)]
pub struct Exchange {
    ranks: usize,
    round: u64,
    got: Vec<bool>,
    /// Blocks of the next round that arrived early (a faster rank moved on).
    early: Vec<bool>,
    deadline_us: u64,
    opened_us: u64,
}

impl Exchange {
    pub fn new(ranks: usize) -> Result<Self, EpError> {
        if ranks == 0 {
            return Err(EpError::Shape("an EP group has at least 1 rank".into()));
        }
        Ok(Self {
            ranks,
            round: 0,
            got: vec![false; ranks],
            early: vec![false; ranks],
            deadline_us: u64::MAX,
            opened_us: 0,
        })
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    /// Opens the current round at `now_us`; every rank's block must be in by `now_us + wait_us`.
    pub fn open(&mut self, now_us: u64, wait_us: u64) {
        self.opened_us = now_us;
        self.deadline_us = now_us.saturating_add(wait_us);
    }

    /// A block from `from` for `round` arrived. A block for the next round is kept for it (a
    /// faster rank may be one round ahead, never more: it cannot finish a round without ours).
    pub fn handle_block(&mut self, from: usize, round: u64) -> Result<(), EpError> {
        if from >= self.ranks {
            return Err(EpError::UnknownRank {
                rank: from,
                ranks: self.ranks,
            });
        }
        let slot = if round == self.round {
            &mut self.got[from]
        } else if round == self.round + 1 {
            &mut self.early[from]
        } else {
            return Err(EpError::WrongRound {
                from,
                got: round,
                want: self.round,
            });
        };
        if std::mem::replace(slot, true) {
            return Err(EpError::Duplicate { from, round });
        }
        Ok(())
    }

    /// Where the round stands at `now_us`: complete, waiting, or failed past its deadline.
    pub fn poll(&self, now_us: u64) -> Result<RoundState, EpError> {
        let missing: Vec<usize> = (0..self.ranks).filter(|&r| !self.got[r]).collect();
        if missing.is_empty() {
            Ok(RoundState::Complete)
        } else if now_us >= self.deadline_us {
            Err(EpError::Timeout {
                round: self.round,
                missing,
                waited_ms: (now_us - self.opened_us) / 1000,
            })
        } else {
            Ok(RoundState::Waiting { missing })
        }
    }

    /// Closes a complete round and moves to the next (blocks that came early count for it).
    pub fn advance(&mut self) -> Result<(), EpError> {
        if let Ok(RoundState::Waiting { missing }) = self.poll(0) {
            return Err(EpError::Timeout {
                round: self.round,
                missing,
                waited_ms: 0,
            });
        }
        self.round += 1;
        self.got = std::mem::replace(&mut self.early, vec![false; self.ranks]);
        self.deadline_us = u64::MAX;
        Ok(())
    }
}

/// An EP group's step clock: every rank takes part in every step (with its own batch, or idle),
/// and a step starts only when the last one finished at every rank. A rank with work asks for a
/// step; the barrier starts one for everybody when none is running.
#[derive(Debug, Clone)]
pub struct StepBarrier {
    ranks: usize,
    /// The step running (`Some`) or the next to start.
    step: u64,
    running: bool,
    done: Vec<bool>,
    wanted: bool,
}

impl StepBarrier {
    pub fn new(ranks: usize) -> Result<Self, EpError> {
        if ranks == 0 {
            return Err(EpError::Shape("an EP group has at least 1 rank".into()));
        }
        Ok(Self {
            ranks,
            step: 0,
            running: false,
            done: vec![false; ranks],
            wanted: false,
        })
    }

    /// Rank `rank` has work. `Some(step)`: start that step at every rank now.
    pub fn handle_request(&mut self, rank: usize) -> Result<Option<u64>, EpError> {
        self.check(rank)?;
        self.wanted = true;
        Ok(self.start())
    }

    /// Rank `rank` finished `step`; `more` if it has work left. `Some(next)`: start it everywhere.
    pub fn handle_done(
        &mut self,
        rank: usize,
        step: u64,
        more: bool,
    ) -> Result<Option<u64>, EpError> {
        self.check(rank)?;
        if !self.running || step != self.step {
            return Err(EpError::WrongRound {
                from: rank,
                got: step,
                want: self.step,
            });
        }
        if std::mem::replace(&mut self.done[rank], true) {
            return Err(EpError::Duplicate {
                from: rank,
                round: step,
            });
        }
        self.wanted |= more;
        if self.done.iter().all(|&d| d) {
            self.running = false;
            self.step += 1;
            self.done.fill(false);
            return Ok(self.start());
        }
        Ok(None)
    }

    /// The step running, if one is.
    pub fn running(&self) -> Option<u64> {
        self.running.then_some(self.step)
    }

    fn start(&mut self) -> Option<u64> {
        if self.running || !self.wanted {
            return None;
        }
        self.running = true;
        self.wanted = false;
        Some(self.step)
    }

    fn check(&self, rank: usize) -> Result<(), EpError> {
        if rank >= self.ranks {
            return Err(EpError::UnknownRank {
                rank,
                ranks: self.ranks,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::eplb::{EplbShape, rebalance};

    #[test]
    fn static_sharding_gives_each_rank_a_contiguous_block() {
        let m = ExpertMap::static_sharding(8, 4).unwrap();
        assert_eq!(m.shard(1).collect::<Vec<_>>(), vec![(2, 2), (3, 3)]);
        assert_eq!(m.replicas(5), &[5]);
        assert!(ExpertMap::static_sharding(8, 3).is_err());
        assert!(
            ExpertMap::new(vec![0, 0, 1, 1], 3, 2).is_err(),
            "expert 2 has no copy"
        );
        assert!(
            ExpertMap::new(vec![0, 1, 7, 1], 3, 2).is_err(),
            "no expert 7"
        );
    }

    #[test]
    fn a_rank_uses_its_own_copy_and_spreads_the_rest_over_copies() {
        // Expert 0 is hot: copies in slots 0 (rank 0) and 3 (rank 1).
        let m = ExpertMap::new(vec![0, 1, 2, 0], 3, 2).unwrap();
        let mut rows = vec![0; 4];
        let d = plan_dispatch(&m, 0, &[0, 1, 0, 2], 2, &mut rows).unwrap();
        // Rank 0 holds a copy of expert 0: both of its rows stay home.
        assert_eq!(
            d.to_rank[0],
            vec![
                Assignment {
                    token: 0,
                    k: 0,
                    slot: 0
                },
                Assignment {
                    token: 0,
                    k: 1,
                    slot: 1
                },
                Assignment {
                    token: 1,
                    k: 0,
                    slot: 0
                }
            ]
        );
        assert_eq!(
            d.to_rank[1],
            vec![Assignment {
                token: 1,
                k: 1,
                slot: 2
            }]
        );
        assert_eq!(d.remote_rows(0), 1);
        // Expert 1's only copy is on rank 0: rank 1 sends it everything.
        let mut rows = vec![0; 4];
        let d = plan_dispatch(&m, 1, &[1, 1, 1, 1], 1, &mut rows).unwrap();
        assert_eq!(d.to_rank[0].len(), 4);
        assert_eq!(rows, vec![0, 4, 0, 0]);
        assert!(matches!(
            plan_dispatch(&m, 0, &[9], 1, &mut [0; 4]),
            Err(EpError::UnknownExpert { expert: 9, .. })
        ));
        assert!(matches!(
            plan_dispatch(&m, 0, &[0, 1, 2], 2, &mut [0; 4]),
            Err(EpError::Routing { .. })
        ));
    }

    #[test]
    fn remote_copies_share_a_hot_expert() {
        // Expert 0 has copies on ranks 1 and 2; rank 0 sends it 10 rows.
        let m = ExpertMap::new(vec![1, 2, 0, 3, 0, 4], 5, 3).unwrap();
        let mut rows = vec![0; 6];
        let d = plan_dispatch(&m, 0, &[0; 10], 1, &mut rows).unwrap();
        assert_eq!((d.to_rank[1].len(), d.to_rank[2].len()), (5, 5));
    }

    #[test]
    fn a_round_completes_with_one_block_from_every_rank_and_times_out_naming_the_silent() {
        let mut x = Exchange::new(3).unwrap();
        x.open(1_000, 5_000);
        x.handle_block(0, 0).unwrap();
        x.handle_block(2, 0).unwrap();
        // Rank 2 is fast: its block for round 1 is kept for round 1.
        x.handle_block(2, 1).unwrap();
        assert_eq!(x.poll(2_000), Ok(RoundState::Waiting { missing: vec![1] }));
        assert_eq!(
            x.poll(6_000),
            Err(EpError::Timeout {
                round: 0,
                missing: vec![1],
                waited_ms: 5
            })
        );
        assert!(x.advance().is_err());
        x.handle_block(1, 0).unwrap();
        assert_eq!(x.poll(6_000), Ok(RoundState::Complete));
        x.advance().unwrap();
        x.open(7_000, 5_000);
        assert_eq!(
            x.poll(7_000),
            Ok(RoundState::Waiting {
                missing: vec![0, 1]
            })
        );
        assert_eq!(
            x.handle_block(2, 1),
            Err(EpError::Duplicate { from: 2, round: 1 })
        );
        assert!(matches!(
            x.handle_block(0, 5),
            Err(EpError::WrongRound {
                got: 5,
                want: 1,
                ..
            })
        ));
        assert!(matches!(
            x.handle_block(4, 1),
            Err(EpError::UnknownRank { rank: 4, .. })
        ));
    }

    #[test]
    fn steps_start_for_everyone_and_wait_for_the_slowest() {
        let mut b = StepBarrier::new(3).unwrap();
        assert_eq!(b.handle_request(1), Ok(Some(0)));
        // Asked again while step 0 runs: remembered for the next.
        assert_eq!(b.handle_request(2), Ok(None));
        assert_eq!(b.handle_done(0, 0, false), Ok(None));
        assert_eq!(b.handle_done(1, 0, false), Ok(None));
        assert!(matches!(
            b.handle_done(1, 0, false),
            Err(EpError::Duplicate { .. })
        ));
        assert_eq!(b.handle_done(2, 0, false), Ok(Some(1)));
        // Nobody has work after step 1: the group rests.
        for r in 0..3 {
            b.handle_done(r, 1, false).unwrap();
        }
        assert_eq!(b.running(), None);
        assert!(matches!(
            b.handle_done(0, 2, false),
            Err(EpError::WrongRound { .. })
        ));
        assert_eq!(b.handle_request(0), Ok(Some(2)));
        assert!(matches!(
            b.handle_request(5),
            Err(EpError::UnknownRank { .. })
        ));
    }

    fn arb_map() -> impl Strategy<Value = (ExpertMap, usize)> {
        (1usize..=4, 1usize..=4, 0usize..=4).prop_flat_map(|(ranks, per_rank_experts, extra)| {
            let experts = ranks * per_rank_experts;
            let slots = experts + extra * ranks;
            prop::collection::vec(0.0f64..100.0, experts).prop_map(move |load| {
                let shape = EplbShape {
                    experts,
                    groups: 1,
                    nodes: 1,
                    gpus: ranks,
                    slots,
                };
                let p = rebalance(&shape, &load).expect("valid shape");
                (
                    ExpertMap::from_placement(&p).expect("valid placement"),
                    experts,
                )
            })
        })
    }

    proptest! {
        /// Every (token, k) pair goes to exactly one copy of its own expert, each destination's
        /// rows are in (token, k) order, and a rank never sends a row away for an expert it holds.
        #[test]
        fn dispatch_sends_every_pair_once_to_a_copy_of_its_expert(
            (map, experts) in arb_map(),
            me_seed in 0usize..64,
            top_k in 1usize..=3,
            routing in prop::collection::vec(0u32..1024, 0..60),
        ) {
            let me = me_seed % map.ranks();
            let n = routing.len() / top_k * top_k;
            let routing: Vec<u32> = routing[..n].iter().map(|e| e % experts as u32).collect();
            let mut rows = vec![0u64; map.slots()];
            let d = plan_dispatch(&map, me, &routing, top_k, &mut rows).unwrap();
            prop_assert_eq!(d.rows(), n);
            prop_assert_eq!(rows.iter().sum::<u64>(), n as u64);
            let mut seen = vec![false; n];
            for (rank, list) in d.to_rank.iter().enumerate() {
                for w in list.windows(2) {
                    prop_assert!((w[0].token, w[0].k) < (w[1].token, w[1].k));
                }
                for a in list {
                    let i = a.token as usize * top_k + a.k as usize;
                    prop_assert!(!std::mem::replace(&mut seen[i], true));
                    prop_assert_eq!(map.rank_of_slot(a.slot), rank);
                    prop_assert_eq!(map.expert_in(a.slot), routing[i]);
                    let held_here = map.replicas(routing[i]).iter().any(|&s| map.rank_of_slot(s) == me);
                    prop_assert!(!held_here || rank == me);
                }
            }
            prop_assert!(seen.iter().all(|&s| s));
        }

        /// Rounds complete in order whatever the arrival order, with a rank at most one round
        /// ahead, and no round completes without a block from every rank.
        #[test]
        fn rounds_complete_only_with_every_rank(
            ranks in 1usize..=5,
            order in prop::collection::vec(0usize..64, 0..40),
        ) {
            let mut x = Exchange::new(ranks).unwrap();
            x.open(0, 1_000);
            // Each rank's next round to send; a rank may run one round ahead of ours.
            let mut next = vec![0u64; ranks];
            let mut completed = 0u64;
            let mut per_round = vec![std::collections::BTreeSet::new(); 64];
            for pick in order {
                let r = pick % ranks;
                if next[r] > x.round() + 1 {
                    continue;
                }
                x.handle_block(r, next[r]).unwrap();
                per_round[next[r] as usize].insert(r);
                next[r] += 1;
                while x.poll(0) == Ok(RoundState::Complete) {
                    prop_assert_eq!(per_round[x.round() as usize].len(), ranks);
                    x.advance().unwrap();
                    x.open(0, 1_000);
                    completed += 1;
                }
            }
            prop_assert_eq!(completed, x.round());
            prop_assert!(next.iter().all(|&n| n >= completed));
        }

        /// Under any interleaving of requests and completions, steps run one at a time, every
        /// rank finishes each step exactly once, and a request is never lost: after it, a step
        /// starts (or is running) until every request has been served by a later step.
        #[test]
        fn no_request_is_lost_and_steps_never_overlap(
            ranks in 1usize..=4,
            ops in prop::collection::vec((0usize..8, any::<bool>(), any::<bool>()), 1..80),
        ) {
            let mut b = StepBarrier::new(ranks).unwrap();
            let mut finished = vec![false; ranks];
            // A request made while a step ran is served by a step that starts after it.
            let mut owed = false;
            for (r, request, more) in ops {
                let r = r % ranks;
                let started = if request || b.running().is_none() && owed {
                    b.handle_request(r).unwrap()
                } else if let Some(step) = b.running() {
                    if finished[r] {
                        None
                    } else {
                        finished[r] = true;
                        if more {
                            owed = true;
                        }
                        b.handle_done(r, step, more).unwrap()
                    }
                } else {
                    None
                };
                if request {
                    owed = true;
                }
                if let Some(_step) = started {
                    prop_assert!(finished.iter().all(|&f| f) || finished.iter().all(|&f| !f));
                    finished.fill(false);
                    owed = false;
                }
                prop_assert!(!owed || b.running().is_some(), "a request waits with no step running");
            }
        }
    }
}
