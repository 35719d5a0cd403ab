//! The continuous-batching scheduler of one worker (prefill or decode: the same struct).
//!
//! # Algorithm
//!
//! vLLM's v1 scheduler (vllm/v1/core/sched/scheduler.py) at page granularity, with SGLang's admission
//! headroom check (sglang/srt/managers/schedule_policy.py, `PrefillAdder`):
//!
//! A sequence has `tokens` (the prompt, plus generated tokens on a decode worker) and `computed` (tokens
//! whose KV is in its pages). Each step gives a running sequence the chunk `[computed, end)`; when
//! `end == tokens.len()` the engine samples a token for it (`StepItem::samples`).
//!
//! 1. **Running sequences** in admission order, those with one token left (decodes) first, then prefill
//!    chunks of at most `chunk_tokens`, all within `token_budget` tokens per step. Each grows its pages to
//!    cover its chunk. When a grow comes back [`Alloc::Later`], the most recently admitted running
//!    sequence is preempted by *recompute* (its KV is dropped, `computed = 0`, it goes back to the front of
//!    the waiting queue) until the grow fits or the sequence preempted itself. Preempted sequences are
//!    never dropped; they run again when pages free up.
//! 2. **Admission**, skipped in a step that preempted (vLLM: admitting right after preempting thrashes),
//!    while `running < max_running` and budget remains:
//!    - first, waiting sequences whose KV already sits in reserved pages (decode workers, see
//!      [`Scheduler::reserve`]). They may pass fresh prompts: they hold pages that only running them
//!      frees, and need at most one more page each, so holding them back behind a prompt waiting for
//!      pages could deadlock;
//!    - then fresh prompts strictly FIFO: `kv.open` matches the cached prefix, and the sequence is
//!      admitted only if the pages for its *whole* remaining prompt fit into the available pages minus
//!      what running prefills still need (so an admitted prefill is rarely preempted half-way), and the
//!      first chunk is allocated. The first prompt that does not fit stops admission: no head-of-line
//!      skipping, so a long prompt cannot be starved by short ones.
//! 3. A sequence needing more pages than the whole pool can never run: it is removed and reported by
//!    [`Scheduler::take_unservable`] instead of livelocking (the actor fails it with an error).
//!
//! The scheduler owns its worker's [`KvManager`]: every open sequence in it is one of the scheduler's
//! (running, waiting with reserved pages, or reserved). [`Scheduler::check_invariants`] checks that.

use std::collections::{BTreeSet, VecDeque};

use rustc_hash::FxHashMap;

use crate::kv::{Alloc, KvError, KvManager, PAGE_TOKENS};
use crate::pages_for;
use crate::types::SeqId;

/// Scheduler limits. Zeros in the three step limits are read as 1 so that a bad value slows a worker
/// down rather than stalling it (the config's `validate` rejects them anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedConfig {
    /// Most sequences running at once: the decode batch cap.
    pub max_running: usize,
    /// Most tokens per step: prefill chunks plus one per decode.
    pub token_budget: usize,
    /// Most prefill tokens per sequence per step, so long prompts interleave with decodes.
    pub chunk_tokens: usize,
    /// Bound of the waiting queue; beyond it `submit` answers `Full` (the caller answers 429/503).
    pub waiting_max: usize,
}

/// A sequence handed to [`Scheduler::submit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSeq {
    pub id: SeqId,
    pub tokens: Vec<u32>,
    /// 0 normally; > 0 when the KV arrived from a prefill worker into pages taken by `reserve`.
    pub computed: usize,
    pub arrival_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submit {
    Queued,
    /// The waiting queue is at `waiting_max`.
    Full,
}

/// One sequence's share of a step: compute tokens `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepItem {
    pub seq: SeqId,
    pub start: usize,
    pub len: usize,
    /// `start + len == tokens.len()`: the engine samples a token for this sequence.
    pub samples: bool,
}

/// What one step runs, and which sequences lost their KV to make room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub items: Vec<StepItem>,
    pub preempted: Vec<SeqId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Running,
}

#[derive(Debug)]
struct Seq {
    tokens: Vec<u32>,
    computed: usize,
    arrival_us: u64,
    /// Open in the KV manager: running, or waiting with reserved pages holding `computed` tokens.
    in_kv: bool,
    phase: Phase,
}

/// One worker's scheduler. See the module doc.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedConfig,
    /// Looked up, never iterated in an order that matters (queues hold the order).
    seqs: FxHashMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    /// Admission order: the last is the most recently admitted, the first to be preempted.
    running: Vec<SeqId>,
    /// Reserved and not yet submitted: prompt length whose KV is on its way.
    reserved: FxHashMap<SeqId, usize>,
    unservable: Vec<SeqId>,
    /// `schedule_running`'s visiting order, kept to reuse its allocation every step.
    order_scratch: Vec<SeqId>,
}

impl Scheduler {
    pub fn new(cfg: SchedConfig) -> Self {
        let cfg = SchedConfig {
            max_running: cfg.max_running.max(1),
            token_budget: cfg.token_budget.max(1),
            chunk_tokens: cfg.chunk_tokens.max(1),
            waiting_max: cfg.waiting_max,
        };
        Scheduler {
            cfg,
            seqs: FxHashMap::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: FxHashMap::default(),
            unservable: Vec::new(),
            order_scratch: Vec::new(),
        }
    }

    pub fn config(&self) -> SchedConfig {
        self.cfg
    }

    /// Queues a sequence (FIFO). A sequence submitted after [`Scheduler::reserve`] reuses its reserved
    /// pages and is queued even when the queue is full: its pages are already spent, and reservations
    /// are bounded by the pool.
    pub fn submit(
        &mut self,
        seq: NewSeq,
        kv: &mut KvManager,
        _now_us: u64,
    ) -> Result<Submit, KvError> {
        let id = seq.id;
        if self.seqs.contains_key(&id) {
            return Err(KvError::DuplicateSeq(id));
        }
        if seq.tokens.is_empty() {
            return Err(KvError::EmptySeq(id));
        }
        if seq.computed >= seq.tokens.len() {
            return Err(KvError::NothingToCompute {
                seq: id,
                computed: seq.computed,
                len: seq.tokens.len(),
            });
        }
        let reserved = self.reserved.contains_key(&id);
        let covered = kv.block_table(id).map_or(0, |t| t.len() * PAGE_TOKENS);
        if (reserved && seq.computed > covered) || (!reserved && seq.computed > 0) {
            return Err(KvError::NotReserved {
                seq: id,
                computed: seq.computed,
                covered: if reserved { covered } else { 0 },
            });
        }
        if !reserved && self.waiting.len() >= self.cfg.waiting_max {
            return Ok(Submit::Full);
        }
        self.reserved.remove(&id);
        self.seqs.insert(
            id,
            Seq {
                tokens: seq.tokens,
                computed: seq.computed,
                arrival_us: seq.arrival_us,
                in_kv: reserved,
                phase: Phase::Waiting,
            },
        );
        self.waiting.push_back(id);
        Ok(Submit::Queued)
    }

    /// Plans one step: grows the running sequences (preempting when pages run out), admits waiting ones,
    /// and returns the chunks to compute. See the module doc for the order.
    pub fn schedule(&mut self, kv: &mut KvManager, now_us: u64) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.token_budget;
        self.schedule_running(kv, now_us, &mut plan, &mut budget);
        if plan.preempted.is_empty() {
            self.admit_resident(kv, now_us, &mut plan, &mut budget);
            self.admit_fresh(kv, now_us, &mut plan, &mut budget);
        }
        debug_assert!(plan.items.iter().map(|i| i.len).sum::<usize>() <= self.cfg.token_budget);
        plan
    }

    fn schedule_running(
        &mut self,
        kv: &mut KvManager,
        now_us: u64,
        plan: &mut StepPlan,
        budget: &mut usize,
    ) {
        let remaining = |s: &Seq| s.tokens.len() - s.computed;
        // Decodes first, then prefill chunks, each in admission order; one lookup per sequence.
        let mut order = std::mem::take(&mut self.order_scratch);
        order.clear();
        let mut prefills = 0;
        for &id in &self.running {
            if remaining(&self.seqs[&id]) == 1 {
                order.push(id);
            } else {
                prefills += 1;
            }
        }
        if prefills > 0 {
            order.extend(
                self.running
                    .iter()
                    .filter(|id| remaining(&self.seqs[id]) > 1),
            );
        }
        for &id in &order {
            if *budget == 0 {
                break;
            }
            // Preempted earlier in this loop to make room for an older sequence.
            let Some(s) = self.seqs.get(&id).filter(|s| s.phase == Phase::Running) else {
                continue;
            };
            if pages_for(s.tokens.len()) > kv.pages_total() {
                self.drop_unservable(id, kv, now_us);
                continue;
            }
            let chunk = remaining(s).min(self.cfg.chunk_tokens).min(*budget);
            let (start, len) = (s.computed, s.tokens.len());
            loop {
                match kv.grow(id, start + chunk, now_us) {
                    Ok(Alloc::Ok) => {
                        plan.items.push(StepItem {
                            seq: id,
                            start,
                            len: chunk,
                            samples: start + chunk == len,
                        });
                        *budget -= chunk;
                        break;
                    }
                    Ok(Alloc::Later { .. }) => {
                        let victim = *self.running.last().expect("`id` itself is running");
                        self.preempt(victim, kv, now_us, plan, budget);
                        if victim == id {
                            break;
                        }
                    }
                    Err(e) => {
                        // Running sequences are open in kv; someone closed it behind our back.
                        debug_assert!(false, "running sequence {id}: {e}");
                        self.drop_unservable(id, kv, now_us);
                        break;
                    }
                }
            }
        }
        self.order_scratch = order;
    }

    /// Admits waiting sequences whose KV is already in reserved pages.
    fn admit_resident(
        &mut self,
        kv: &mut KvManager,
        now_us: u64,
        plan: &mut StepPlan,
        budget: &mut usize,
    ) {
        let resident: Vec<SeqId> = self
            .waiting
            .iter()
            .copied()
            .filter(|id| self.seqs[id].in_kv)
            .collect();
        for id in resident {
            if self.running.len() >= self.cfg.max_running || *budget == 0 {
                return;
            }
            let s = &self.seqs[&id];
            if pages_for(s.tokens.len()) > kv.pages_total() {
                self.drop_unservable(id, kv, now_us);
                continue;
            }
            let (start, len) = (s.computed, s.tokens.len());
            let chunk = (len - start).min(self.cfg.chunk_tokens).min(*budget);
            match kv.grow(id, start + chunk, now_us) {
                Ok(Alloc::Ok) => self.admit(id, start, chunk, plan, budget),
                // Waits for pages; others behind it may still fit (see the module doc).
                Ok(Alloc::Later { .. }) => {}
                Err(e) => {
                    debug_assert!(false, "reserved sequence {id}: {e}");
                    self.drop_unservable(id, kv, now_us);
                }
            }
        }
    }

    /// Admits fresh prompts FIFO while their whole prompt fits into the pages not promised to running
    /// prefills.
    fn admit_fresh(
        &mut self,
        kv: &mut KvManager,
        now_us: u64,
        plan: &mut StepPlan,
        budget: &mut usize,
    ) {
        let mut promised: usize = self
            .running
            .iter()
            .map(|id| {
                let held = kv.block_table(*id).map_or(0, <[u32]>::len);
                pages_for(self.seqs[id].tokens.len()).saturating_sub(held)
            })
            .sum();
        let fresh: Vec<SeqId> = self
            .waiting
            .iter()
            .copied()
            .filter(|id| !self.seqs[id].in_kv)
            .collect();
        for id in fresh {
            if self.running.len() >= self.cfg.max_running || *budget == 0 {
                return;
            }
            let s = &self.seqs[&id];
            let len = s.tokens.len();
            if pages_for(len) > kv.pages_total() {
                self.drop_unservable(id, kv, now_us);
                continue;
            }
            let Ok(cached) = kv.open(id, &s.tokens, now_us) else {
                debug_assert!(false, "waiting sequence {id} is already open in kv");
                self.drop_unservable(id, kv, now_us);
                continue;
            };
            let held = kv.block_table(id).map_or(0, <[u32]>::len);
            let need = pages_for(len) - held;
            let chunk = (len - cached).min(self.cfg.chunk_tokens).min(*budget);
            let fits = need + promised <= kv.pages_available()
                && kv.grow(id, cached + chunk, now_us) == Ok(Alloc::Ok);
            if !fits {
                kv.cancel_open(id).expect("opened above");
                return;
            }
            promised += pages_for(len) - kv.block_table(id).map_or(0, <[u32]>::len);
            let s = self.seqs.get_mut(&id).expect("waiting sequence exists");
            s.computed = cached;
            s.in_kv = true;
            self.admit(id, cached, chunk, plan, budget);
        }
    }

    fn admit(
        &mut self,
        id: SeqId,
        start: usize,
        chunk: usize,
        plan: &mut StepPlan,
        budget: &mut usize,
    ) {
        let s = self.seqs.get_mut(&id).expect("admitted sequence exists");
        debug_assert!(s.phase == Phase::Waiting && s.in_kv && s.computed == start);
        s.phase = Phase::Running;
        self.waiting.retain(|&w| w != id);
        self.running.push(id);
        plan.items.push(StepItem {
            seq: id,
            start,
            len: chunk,
            samples: start + chunk == s.tokens.len(),
        });
        *budget -= chunk;
    }

    /// Recompute preemption: drops `id`'s KV and puts it back at the front of the waiting queue. Its item
    /// in this step's plan, if any, is taken out and its tokens go back into the budget.
    fn preempt(
        &mut self,
        id: SeqId,
        kv: &mut KvManager,
        now_us: u64,
        plan: &mut StepPlan,
        budget: &mut usize,
    ) {
        if let Some(k) = plan.items.iter().position(|i| i.seq == id) {
            *budget += plan.items.remove(k).len;
        }
        self.running.retain(|&r| r != id);
        let s = self.seqs.get_mut(&id).expect("preempted sequence exists");
        let _ = kv.close(id, None, now_us);
        s.computed = 0;
        s.in_kv = false;
        s.phase = Phase::Waiting;
        self.waiting.push_front(id);
        plan.preempted.push(id);
    }

    fn drop_unservable(&mut self, id: SeqId, kv: &mut KvManager, now_us: u64) {
        if let Some(s) = self.seqs.remove(&id)
            && s.in_kv
        {
            let _ = kv.close(id, None, now_us);
        }
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        self.unservable.push(id);
    }

    /// Sequences removed because they need more pages than the whole pool; the actor fails them.
    pub fn take_unservable(&mut self) -> Vec<SeqId> {
        std::mem::take(&mut self.unservable)
    }

    /// After the engine ran `plan`: advances `computed` for every item. Items of sequences finished or
    /// aborted since `schedule` are ignored.
    pub fn complete(&mut self, plan: &StepPlan) {
        for item in &plan.items {
            let Some(s) = self.seqs.get_mut(&item.seq) else {
                continue;
            };
            if s.phase == Phase::Running && s.computed == item.start {
                s.computed = (item.start + item.len).min(s.tokens.len());
            } else {
                debug_assert!(false, "stale step item {item:?}: computed {}", s.computed);
            }
        }
    }

    /// Appends a sampled token (decode workers). Unknown sequences (aborted meanwhile) are ignored.
    pub fn append_token(&mut self, seq: SeqId, token: u32) {
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.tokens.push(token);
        }
    }

    pub fn tokens(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|s| s.tokens.as_slice())
    }

    /// Tokens of `seq` whose KV is in its pages.
    pub fn computed(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.computed)
    }

    pub fn arrival_us(&self, seq: SeqId) -> Option<u64> {
        self.seqs.get(&seq).map(|s| s.arrival_us)
    }

    /// Removes a running, waiting or reserved sequence (finished or aborted) and closes its KV; with
    /// `cache` its computed full pages go into the prefix cache.
    pub fn finish(
        &mut self,
        seq: SeqId,
        cache: bool,
        kv: &mut KvManager,
        now_us: u64,
    ) -> Result<(), KvError> {
        if self.reserved.remove(&seq).is_some() {
            return kv.close(seq, None, now_us);
        }
        let s = self.seqs.remove(&seq).ok_or(KvError::UnknownSeq(seq))?;
        match s.phase {
            Phase::Running => self.running.retain(|&r| r != seq),
            Phase::Waiting => self.waiting.retain(|&w| w != seq),
        }
        if s.in_kv {
            kv.close(seq, cache.then(|| &s.tokens[..s.computed]), now_us)?;
        }
        Ok(())
    }

    /// Decode workers: opens `seq` in kv without prefix matching and grows it to `prompt_len` tokens, for a
    /// prefill worker to write into. Returns the block table, or `Alloc::Later` (nothing changed; `needed`
    /// above `kv.pages_total()` never fits). Submit the sequence once its KV arrived.
    pub fn reserve(
        &mut self,
        seq: SeqId,
        prompt_len: usize,
        kv: &mut KvManager,
        now_us: u64,
    ) -> Result<Result<Vec<u32>, Alloc>, KvError> {
        if self.seqs.contains_key(&seq) || self.reserved.contains_key(&seq) {
            return Err(KvError::DuplicateSeq(seq));
        }
        kv.open(seq, &[], now_us)?;
        match kv.grow(seq, prompt_len, now_us)? {
            Alloc::Ok => {
                self.reserved.insert(seq, prompt_len);
                Ok(Ok(kv.block_table(seq).expect("opened above").to_vec()))
            }
            later => {
                kv.cancel_open(seq)?;
                Ok(Err(later))
            }
        }
    }

    /// The KV transfer for a reserved sequence failed or was aborted: frees its pages. Also aborts the
    /// sequence if it was submitted already. Unknown sequences are ignored.
    pub fn unreserve(&mut self, seq: SeqId, kv: &mut KvManager, now_us: u64) {
        let _ = self.finish(seq, false, kv, now_us);
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Reserved sequences not submitted yet.
    pub fn reserved(&self) -> usize {
        self.reserved.len()
    }

    /// Tokens still to compute over all running and waiting sequences.
    pub fn outstanding_tokens(&self) -> u64 {
        self.seqs
            .values()
            .map(|s| (s.tokens.len() - s.computed) as u64)
            .sum()
    }

    /// Panics naming the first broken invariant. Assumes `kv` belongs to this scheduler alone.
    pub fn check_invariants(&self, kv: &KvManager) {
        kv.check_invariants();
        assert!(
            self.running.len() <= self.cfg.max_running,
            "running over max_running"
        );
        let running: BTreeSet<SeqId> = self.running.iter().copied().collect();
        let waiting: BTreeSet<SeqId> = self.waiting.iter().copied().collect();
        assert_eq!(running.len(), self.running.len(), "duplicate in running");
        assert_eq!(waiting.len(), self.waiting.len(), "duplicate in waiting");
        assert!(
            running.is_disjoint(&waiting),
            "sequence both running and waiting"
        );
        let all: BTreeSet<SeqId> = running.union(&waiting).copied().collect();
        assert!(
            all == self.seqs.keys().copied().collect::<BTreeSet<SeqId>>(),
            "sequences outside both queues"
        );
        let mut held = BTreeSet::new();
        for (id, s) in &self.seqs {
            assert!(
                s.computed <= s.tokens.len(),
                "seq {id}: computed past its tokens"
            );
            assert_eq!(
                s.phase == Phase::Running,
                running.contains(id),
                "seq {id}: phase"
            );
            assert!(
                s.phase == Phase::Waiting || s.in_kv,
                "seq {id}: running without KV"
            );
            assert_eq!(kv.is_open(*id), s.in_kv, "seq {id}: in_kv");
            match kv.block_table(*id) {
                Some(t) => {
                    assert!(t.len() * PAGE_TOKENS >= s.computed, "seq {id}: pages short");
                    held.extend(t.iter().copied());
                }
                None => assert_eq!(s.computed, 0, "seq {id}: computed without pages"),
            }
        }
        for (id, &prompt_len) in &self.reserved {
            assert!(
                !self.seqs.contains_key(id),
                "seq {id}: reserved and submitted"
            );
            let t = kv.block_table(*id).expect("reserved sequence is open");
            assert!(
                t.len() * PAGE_TOKENS >= prompt_len,
                "seq {id}: reservation short"
            );
            held.extend(t.iter().copied());
        }
        assert_eq!(
            held.len(),
            kv.pages_used(),
            "pages used by sequences the scheduler does not know"
        );
    }
}

#[cfg(test)]
mod tests;
