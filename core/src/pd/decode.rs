//! One decode DP group's side of the protocol (DESIGN.md steps 2–5): `Reserve` → pages reserved
//! in arrival order while pages last → the job goes to its prefill worker with the destination
//! pages → KV layers arrive and are verified by the driver → the handoff (first token, the
//! request's limits, the job) → once every layer is in, the sequence joins the batch and gets one
//! token per step until it ends.
//!
//! `Q` is what the driver keeps with a queued reservation (the job and its prefill worker), `R`
//! what it keeps with a handed-off sequence (the job and its sampler). Both come back to the driver
//! in the action or outcome that ends their stage.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::kv::KvManager;
use crate::pages_for;
use crate::sched::{NewSeq, Scheduler, StepPlan, Submit};
use crate::types::SeqId;

use super::{Finish, SeqFailure, SeqLimits};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeConfig {
    /// The group's id, for messages.
    pub group: u32,
    /// KV layers a sequence's transfer carries (0: the echo engine, no KV).
    pub layers: usize,
    /// The model's positions: with the pool, what bounds a sequence's length.
    pub max_positions: usize,
    /// Once the handoff arrived, every layer must be in within this time, or the sequence is
    /// re-run (a frame lost with a cut link).
    pub kv_arrival_deadline_us: u64,
    /// A reservation that never got its handoff (its prefill worker died with the unreserve)
    /// frees its pages after this long.
    pub reservation_ttl_us: u64,
    /// Reservations waiting for pages before the newest is refused (re-run on another group).
    pub reserve_queue_max: usize,
}

/// What the driver must do.
#[derive(Debug)]
pub enum DecodeAction<Q, R> {
    /// Pages reserved: send the job to its prefill worker with `pages` as the destination.
    Prefill { seq: SeqId, pages: Vec<u32>, job: Q },
    /// The group cannot go on with the sequence: the gateway re-runs it elsewhere.
    Retry {
        seq: SeqId,
        reason: SeqFailure,
        job: Held<Q, R>,
    },
    /// The sequence can never be served: the request fails with the reason.
    Fail {
        seq: SeqId,
        reason: SeqFailure,
        job: Held<Q, R>,
    },
}

/// The driver's payload of a sequence at the stage where it ended.
#[derive(Debug)]
pub enum Held<Q, R> {
    Queued(Q),
    HandedOff(R),
    /// Reserved, its job with the prefill worker.
    AtPrefill,
}

/// The verdict on a KV frame before the driver verifies and writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameCheck {
    /// For a live reservation, naming its pages: verify the checksums and write it, then report
    /// [`DecodeCore::handle_layer_written`] or [`DecodeCore::handle_bad_transfer`].
    Write,
    /// No such reservation (aborted, expired, or never ours): drop the frame.
    Unknown,
    /// The frame names other pages or a layer the model does not have: the reservation is
    /// poisoned (already reported through an action if its handoff is in).
    Rejected,
}

/// What a sampled token did to its sequence.
#[derive(Debug)]
pub struct TokenOutcome<R> {
    /// Set when the sequence ends with this token; its pages are free and `ended` holds its job.
    pub finish: Option<Finish>,
    pub ended: Option<R>,
}

#[derive(Debug)]
struct Queued<Q> {
    seq: SeqId,
    prompt_len: usize,
    job: Q,
}

#[derive(Debug)]
struct Handoff<R> {
    tokens: Vec<u32>,
    first_token: u32,
    layers: usize,
    limits: SeqLimits,
    job: R,
}

#[derive(Debug)]
struct Reservation<R> {
    since_us: u64,
    handoff_at_us: Option<u64>,
    pages: Vec<u32>,
    layers_in: BTreeSet<u32>,
    handoff: Option<Handoff<R>>,
    /// Some layer failed verification, or a frame named the wrong pages: never decoded from.
    bad: Option<SeqFailure>,
}

#[derive(Debug)]
struct Running<R> {
    job: R,
    limits: SeqLimits,
    /// Tokens generated in this run, counting the prefill worker's first token.
    generated: usize,
}

/// The owner of a sequence's pages in this group: exactly one entry per live sequence.
#[derive(Debug)]
enum Entry<R> {
    Reserved(Reservation<R>),
    Running(Running<R>),
}

/// One decode group's protocol state. See the module doc.
#[derive(Debug)]
pub struct DecodeCore<Q, R> {
    cfg: DecodeConfig,
    sched: Scheduler,
    kv: KvManager,
    queued: VecDeque<Queued<Q>>,
    entries: BTreeMap<SeqId, Entry<R>>,
    actions: VecDeque<DecodeAction<Q, R>>,
    stepping: bool,
    preemptions: u64,
    double_releases: u64,
}

impl<Q, R> DecodeCore<Q, R> {
    pub fn new(cfg: DecodeConfig, sched: Scheduler, kv: KvManager) -> Self {
        Self {
            cfg,
            sched,
            kv,
            queued: VecDeque::new(),
            entries: BTreeMap::new(),
            actions: VecDeque::new(),
            stepping: false,
            preemptions: 0,
            double_releases: 0,
        }
    }

    /// The most tokens a sequence may reach here: the model's positions, and what the pool can
    /// hold (the last token's KV is never computed, so `pages × PAGE_TOKENS + 1` would fit; a
    /// round bound is what the gateway advertises).
    pub fn context_tokens(&self) -> usize {
        self.cfg
            .max_positions
            .min(self.kv.pages_total() * crate::PAGE_TOKENS)
    }

    fn too_long(&self, tokens: usize) -> SeqFailure {
        SeqFailure::TooLong {
            tokens,
            what: format!("decode group {}", self.cfg.group),
            pages: self.kv.pages_total(),
        }
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<DecodeAction<Q, R>> {
        self.actions.pop_front()
    }

    /// A sequence to reserve pages for (from the gateway).
    pub fn handle_reserve(&mut self, now_us: u64, seq: SeqId, prompt_len: usize, job: Q) {
        let duplicate = self.entries.contains_key(&seq) || self.queued.iter().any(|q| q.seq == seq);
        if duplicate {
            self.actions.push_back(DecodeAction::Fail {
                seq,
                reason: SeqFailure::Internal(format!("sequence {seq} is already in this group")),
                job: Held::Queued(job),
            });
            return;
        }
        if pages_for(prompt_len) > self.kv.pages_total() {
            self.actions.push_back(DecodeAction::Fail {
                seq,
                reason: self.too_long(prompt_len),
                job: Held::Queued(job),
            });
            return;
        }
        self.queued.push_back(Queued {
            seq,
            prompt_len,
            job,
        });
        self.admit_reservations(now_us);
    }

    /// Reserves pages for queued sequences in arrival order while pages last.
    fn admit_reservations(&mut self, now_us: u64) {
        while let Some(front) = self.queued.front() {
            let (seq, len) = (front.seq, front.prompt_len);
            match self.sched.reserve(seq, len, &mut self.kv, now_us) {
                Ok(Ok(pages)) => {
                    let q = self.queued.pop_front().expect("front exists");
                    self.entries.insert(
                        seq,
                        Entry::Reserved(Reservation {
                            since_us: now_us,
                            handoff_at_us: None,
                            pages: pages.clone(),
                            layers_in: BTreeSet::new(),
                            handoff: None,
                            bad: None,
                        }),
                    );
                    self.actions.push_back(DecodeAction::Prefill {
                        seq,
                        pages,
                        job: q.job,
                    });
                }
                Ok(Err(_)) => {
                    if self.queued.len() > self.cfg.reserve_queue_max {
                        let q = self.queued.pop_back().expect("non-empty");
                        self.actions.push_back(DecodeAction::Retry {
                            seq: q.seq,
                            reason: SeqFailure::GroupFull {
                                group: self.cfg.group,
                            },
                            job: Held::Queued(q.job),
                        });
                        continue;
                    }
                    break;
                }
                Err(e) => {
                    let q = self.queued.pop_front().expect("front exists");
                    self.actions.push_back(DecodeAction::Fail {
                        seq,
                        reason: SeqFailure::Internal(e.to_string()),
                        job: Held::Queued(q.job),
                    });
                }
            }
        }
    }

    /// The driver could not reach the prefill worker with the job: the reservation is freed (the
    /// driver drops the job, which the gateway reads as "re-run").
    pub fn handle_prefill_unreachable(&mut self, now_us: u64, seq: SeqId) {
        self.release(seq, now_us);
        self.admit_reservations(now_us);
    }

    /// The prefill worker gave the sequence up (or the gateway re-routed it): free the
    /// reservation.
    pub fn handle_unreserve(&mut self, now_us: u64, seq: SeqId) {
        if let Some(Entry::Reserved(_)) = self.entries.get(&seq) {
            drop(self.release(seq, now_us));
        }
        self.admit_reservations(now_us);
    }

    /// Checks a frame before the driver verifies and writes it.
    pub fn check_frame(
        &mut self,
        now_us: u64,
        seq: SeqId,
        layer: u32,
        pages: &[u32],
    ) -> FrameCheck {
        let Some(Entry::Reserved(r)) = self.entries.get_mut(&seq) else {
            return FrameCheck::Unknown;
        };
        if r.pages != pages || layer as usize >= self.cfg.layers {
            r.bad = Some(SeqFailure::Transfer(format!(
                "KV frame for layer {layer} names pages other than the {} reserved",
                r.pages.len()
            )));
            self.try_start(now_us, seq);
            return FrameCheck::Rejected;
        }
        FrameCheck::Write
    }

    /// A layer of `seq` was verified and written into its pages.
    pub fn handle_layer_written(&mut self, now_us: u64, seq: SeqId, layer: u32) {
        if let Some(Entry::Reserved(r)) = self.entries.get_mut(&seq) {
            r.layers_in.insert(layer);
        }
        self.try_start(now_us, seq);
    }

    /// A frame of `seq` failed verification (or could not be written): the sequence is re-run,
    /// never decoded from bad KV.
    pub fn handle_bad_transfer(&mut self, now_us: u64, seq: SeqId, reason: String) {
        if let Some(Entry::Reserved(r)) = self.entries.get_mut(&seq) {
            r.bad.get_or_insert(SeqFailure::Transfer(reason));
        }
        self.try_start(now_us, seq);
    }

    /// The prefill worker is done: the prompt's `tokens` (its KV is on its way), the first token,
    /// how many layers it sent, and the request's limits.
    pub fn handle_handoff(
        &mut self,
        now_us: u64,
        seq: SeqId,
        tokens: Vec<u32>,
        first_token: u32,
        layers: usize,
        limits: SeqLimits,
        job: R,
    ) -> Result<(), R> {
        let Some(Entry::Reserved(r)) = self.entries.get_mut(&seq) else {
            // Aborted or expired meanwhile: the job goes back to be dropped.
            return Err(job);
        };
        r.handoff = Some(Handoff {
            tokens,
            first_token,
            layers,
            limits,
            job,
        });
        r.handoff_at_us = Some(now_us);
        self.try_start(now_us, seq);
        Ok(())
    }

    /// Moves a reservation into the batch once its handoff and every layer are in.
    fn try_start(&mut self, now_us: u64, seq: SeqId) {
        let Some(Entry::Reserved(r)) = self.entries.get(&seq) else {
            return;
        };
        let Some(h) = &r.handoff else { return };
        if let Some(bad) = r.bad.clone() {
            self.release_with(seq, now_us, |job| DecodeAction::Retry {
                seq,
                reason: bad,
                job,
            });
            return;
        }
        if r.layers_in.len() < h.layers.min(self.cfg.layers) {
            return;
        }
        let Some(Entry::Reserved(r)) = self.entries.remove(&seq) else {
            unreachable!("checked above");
        };
        let h = r.handoff.expect("checked above");
        let computed = h.tokens.len();
        let mut tokens = h.tokens;
        tokens.push(h.first_token);
        let submitted = self.sched.submit(
            NewSeq {
                id: seq,
                tokens,
                computed,
                arrival_us: now_us,
            },
            &mut self.kv,
            now_us,
        );
        self.entries.insert(
            seq,
            Entry::Running(Running {
                job: h.job,
                limits: h.limits,
                generated: 1,
            }),
        );
        let reason = match submitted {
            Ok(Submit::Queued) => return,
            Ok(Submit::Full) => SeqFailure::BatchFull,
            Err(e) => SeqFailure::Internal(e.to_string()),
        };
        let retry = reason.retryable();
        self.release_with(seq, now_us, |job| {
            if retry {
                DecodeAction::Retry { seq, reason, job }
            } else {
                DecodeAction::Fail { seq, reason, job }
            }
        });
    }

    /// Enforces the transfer deadline and the reservation TTL.
    pub fn handle_tick(&mut self, now_us: u64) {
        let mut late = Vec::new();
        for (&seq, e) in &self.entries {
            let Entry::Reserved(r) = e else { continue };
            match r.handoff_at_us {
                Some(at) if now_us.saturating_sub(at) > self.cfg.kv_arrival_deadline_us => {
                    late.push((seq, true));
                }
                None if now_us.saturating_sub(r.since_us) > self.cfg.reservation_ttl_us => {
                    late.push((seq, false));
                }
                _ => {}
            }
        }
        for (seq, handed_off) in late {
            if handed_off {
                if let Some(Entry::Reserved(r)) = self.entries.get_mut(&seq) {
                    r.bad.get_or_insert(SeqFailure::TransferDeadline {
                        layers_in: r.layers_in.len(),
                        layers: self.cfg.layers,
                        deadline_ms: self.cfg.kv_arrival_deadline_us / 1000,
                    });
                }
                self.try_start(now_us, seq);
            } else {
                drop(self.release(seq, now_us));
            }
        }
        self.admit_reservations(now_us);
    }

    /// The client went away, a stop string matched, or the gateway re-routed: the sequence ends
    /// here wherever it is; its payload comes back to be dropped.
    pub fn handle_abort(&mut self, now_us: u64, seq: SeqId) -> Option<Held<Q, R>> {
        // A reservation made in this same round and not yet carried out goes back with the rest.
        let undelivered = self
            .actions
            .iter()
            .position(|a| matches!(a, DecodeAction::Prefill { seq: s, .. } if *s == seq));
        if let Some(k) = undelivered {
            let Some(DecodeAction::Prefill { job, .. }) = self.actions.remove(k) else {
                unreachable!("matched above");
            };
            self.release(seq, now_us);
            self.admit_reservations(now_us);
            return Some(Held::Queued(job));
        }
        let held = if let Some(k) = self.queued.iter().position(|q| q.seq == seq) {
            self.queued.remove(k).map(|q| Held::Queued(q.job))
        } else if self.entries.contains_key(&seq) {
            self.release(seq, now_us)
        } else {
            None
        };
        self.admit_reservations(now_us);
        held
    }

    /// Whether a sequence is running here (a step would have work).
    pub fn has_work(&self) -> bool {
        self.entries
            .values()
            .any(|e| matches!(e, Entry::Running(_)))
    }

    /// Plans the next step if none is running and the batch has work. Sequences that can never
    /// fit the pool fail here (the gateway's context check makes this unreachable for requests it
    /// admitted against this group's size).
    pub fn plan_step(&mut self, now_us: u64) -> Option<StepPlan> {
        if self.stepping
            || !self
                .entries
                .values()
                .any(|e| matches!(e, Entry::Running(_)))
        {
            return None;
        }
        let plan = self.sched.schedule(&mut self.kv, now_us);
        self.preemptions += plan.preempted.len() as u64;
        for seq in self.sched.take_unservable() {
            // The scheduler closed its KV already: only the entry goes.
            if let Some(Entry::Running(r)) = self.entries.remove(&seq) {
                self.actions.push_back(DecodeAction::Fail {
                    seq,
                    reason: self.too_long(0),
                    job: Held::HandedOff(r.job),
                });
            }
        }
        if plan.items.is_empty() {
            return None;
        }
        self.stepping = true;
        Some(plan)
    }

    /// The engine ran `plan`. Then sample each item with [`Self::sample_ctx`] and report each
    /// token with [`Self::handle_token`].
    pub fn handle_step_done(&mut self, plan: &StepPlan) {
        self.stepping = false;
        self.sched.complete(plan);
    }

    /// The engine refused `plan` (a bug or a corrupt pool): its sequences fail with the reason.
    pub fn handle_step_failed(&mut self, now_us: u64, plan: &StepPlan, error: String) {
        self.stepping = false;
        for it in &plan.items {
            let reason = SeqFailure::Engine(error.clone());
            self.release_with(it.seq, now_us, |job| DecodeAction::Fail {
                seq: it.seq,
                reason,
                job,
            });
        }
        self.admit_reservations(now_us);
    }

    /// The tokens so far and the driver's payload of a running sequence, to sample its next token.
    pub fn sample_ctx(&mut self, seq: SeqId) -> Option<(&[u32], &mut R)> {
        let Some(Entry::Running(r)) = self.entries.get_mut(&seq) else {
            return None;
        };
        Some((self.sched.tokens(seq)?, &mut r.job))
    }

    /// A token sampled for `seq`; `None` if the sequence ended meanwhile (nothing to emit).
    pub fn handle_token(&mut self, now_us: u64, seq: SeqId, token: u32) -> Option<TokenOutcome<R>> {
        let context = self.context_tokens();
        let len = self.sched.tokens(seq)?.len() + 1;
        let Some(Entry::Running(r)) = self.entries.get_mut(&seq) else {
            return None;
        };
        r.generated += 1;
        let finish = r.limits.finish(token, r.generated, len, context);
        self.sched.append_token(seq, token);
        let ended = if finish.is_some() {
            let ended = match self.release(seq, now_us) {
                Some(Held::HandedOff(job)) => Some(job),
                _ => None,
            };
            self.admit_reservations(now_us);
            ended
        } else {
            None
        };
        Some(TokenOutcome { finish, ended })
    }

    /// Ends `seq`'s entry and frees its pages: the one place this core frees a sequence's pages.
    fn release(&mut self, seq: SeqId, now_us: u64) -> Option<Held<Q, R>> {
        let Some(entry) = self.entries.remove(&seq) else {
            self.double_releases += 1;
            debug_assert!(false, "release of sequence {seq}, which holds nothing here");
            return None;
        };
        if let Err(e) = self.sched.finish(seq, false, &mut self.kv, now_us) {
            self.double_releases += 1;
            debug_assert!(false, "sequence {seq} had no pages to free: {e}");
        }
        Some(match entry {
            Entry::Reserved(Reservation {
                handoff: Some(h), ..
            }) => Held::HandedOff(h.job),
            Entry::Reserved(_) => Held::AtPrefill,
            Entry::Running(r) => Held::HandedOff(r.job),
        })
    }

    /// Releases `seq` and queues the action `make` builds from its payload.
    fn release_with(
        &mut self,
        seq: SeqId,
        now_us: u64,
        make: impl FnOnce(Held<Q, R>) -> DecodeAction<Q, R>,
    ) {
        if let Some(held) = self.release(seq, now_us) {
            self.actions.push_back(make(held));
        }
    }

    /// Sequences in the batch (running or preempted, waiting to run again).
    pub fn running(&self) -> usize {
        self.entries
            .values()
            .filter(|e| matches!(e, Entry::Running(_)))
            .count()
    }

    /// Reservations queued for pages or waiting for their KV.
    pub fn waiting(&self) -> usize {
        self.queued.len() + self.entries.len() - self.running()
    }

    /// Tokens still to generate over the batch, plus reserved pages: the balancer's load.
    pub fn outstanding_tokens(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match e {
                Entry::Running(r) => r.limits.max_new_tokens.saturating_sub(r.generated) as u64,
                Entry::Reserved(r) => r.pages.len() as u64,
            })
            .sum()
    }

    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    pub fn sched(&self) -> &Scheduler {
        &self.sched
    }

    pub fn kv(&self) -> &KvManager {
        &self.kv
    }

    /// Releases of a sequence that held nothing: zero unless the protocol is broken.
    pub fn double_releases(&self) -> u64 {
        self.double_releases
    }

    /// Panics naming the first broken invariant: the scheduler's (every used page is held by a
    /// sequence it knows), and one entry per sequence the scheduler holds.
    pub fn check_invariants(&self) {
        self.sched.check_invariants(&self.kv);
        let reserved = self
            .entries
            .values()
            .filter(|e| matches!(e, Entry::Reserved(_)))
            .count();
        assert_eq!(reserved, self.sched.reserved(), "reservations vs scheduler");
        assert_eq!(
            self.running(),
            self.sched.running() + self.sched.waiting(),
            "batch entries vs scheduler"
        );
        assert_eq!(self.double_releases, 0, "a sequence was released twice");
        for (seq, e) in &self.entries {
            if let Entry::Running(_) = e {
                assert!(
                    self.sched.tokens(*seq).is_some(),
                    "seq {seq}: not scheduled"
                );
            }
        }
    }
}
