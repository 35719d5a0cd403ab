//! One prefill worker's side of the protocol: prompts queue in its scheduler (chunked prefill over
//! its own pool with the radix prefix cache); when a prompt's last chunk is computed its first
//! token is sampled by the driver and this core decides what follows — the sequence ends here (a
//! stop token, `max_tokens` of 1, the context), is handed to its decode group, or, when its KV
//! could not be delivered, goes back to the gateway for a re-run. Either way its pages here are
//! freed once, with its computed prompt pages kept in the prefix cache.
//!
//! `J` is what the driver keeps with a job (the request, its destination, its sampler).

use std::collections::{BTreeMap, VecDeque};

use crate::kv::KvManager;
use crate::sched::{NewSeq, Scheduler, StepPlan, Submit};
use crate::types::SeqId;

use super::{Finish, SeqFailure, SeqLimits};

#[derive(Debug)]
pub struct PrefillJobState<J> {
    pub job: J,
    pub limits: SeqLimits,
    /// Prompt tokens found in the prefix cache, known when the sequence is first scheduled.
    pub cached: Option<usize>,
}

/// What the first token did to a sequence. Each variant hands the job back: the sequence no
/// longer holds pages here.
#[derive(Debug)]
pub enum FirstToken<J> {
    /// Emit the token; the sequence ends with it (tell the decode group to free its reservation).
    Finished {
        finish: Finish,
        cached: usize,
        job: J,
    },
    /// Emit the token and hand the sequence to its decode group.
    Handoff { cached: usize, job: J },
    /// Its KV did not reach the decode group: free the reservation there, re-run elsewhere.
    Retry { reason: SeqFailure, job: J },
}

/// A sequence this worker refuses or gives up; the driver frees its decode reservation and tells
/// the gateway (re-run when `reason.retryable()`).
#[derive(Debug)]
pub struct Refused<J> {
    pub seq: SeqId,
    pub reason: SeqFailure,
    pub job: J,
}

#[derive(Debug)]
pub struct PrefillCore<J> {
    worker: u32,
    max_positions: usize,
    sched: Scheduler,
    kv: KvManager,
    jobs: BTreeMap<SeqId, PrefillJobState<J>>,
    refused: VecDeque<Refused<J>>,
    stepping: bool,
    double_releases: u64,
}

impl<J> PrefillCore<J> {
    pub fn new(worker: u32, max_positions: usize, sched: Scheduler, kv: KvManager) -> Self {
        Self {
            worker,
            max_positions,
            sched,
            kv,
            jobs: BTreeMap::new(),
            refused: VecDeque::new(),
            stepping: false,
            double_releases: 0,
        }
    }

    /// Sequences refused or given up since the last call.
    pub fn poll_refused(&mut self) -> Option<Refused<J>> {
        self.refused.pop_front()
    }

    /// A prompt (with any tokens already streamed) to compute.
    pub fn handle_submit(
        &mut self,
        now_us: u64,
        seq: SeqId,
        tokens: Vec<u32>,
        limits: SeqLimits,
        job: J,
    ) {
        if self.jobs.contains_key(&seq) {
            self.refused.push_back(Refused {
                seq,
                reason: SeqFailure::Internal(format!("sequence {seq} is already here")),
                job,
            });
            return;
        }
        let submitted = self.sched.submit(
            NewSeq {
                id: seq,
                tokens,
                computed: 0,
                arrival_us: now_us,
            },
            &mut self.kv,
            now_us,
        );
        let reason = match submitted {
            Ok(Submit::Queued) => {
                self.jobs.insert(
                    seq,
                    PrefillJobState {
                        job,
                        limits,
                        cached: None,
                    },
                );
                return;
            }
            Ok(Submit::Full) => SeqFailure::PrefillFull {
                worker: self.worker,
            },
            Err(e) => SeqFailure::Internal(e.to_string()),
        };
        self.refused.push_back(Refused { seq, reason, job });
    }

    /// Whether a prompt waits to be computed here.
    pub fn has_work(&self) -> bool {
        !self.jobs.is_empty()
    }

    /// Plans the next step if none is running and there is work.
    pub fn plan_step(&mut self, now_us: u64) -> Option<StepPlan> {
        if self.stepping || self.jobs.is_empty() {
            return None;
        }
        let plan = self.sched.schedule(&mut self.kv, now_us);
        for seq in self.sched.take_unservable() {
            // The scheduler closed its KV already: only the job goes.
            if let Some(j) = self.jobs.remove(&seq) {
                self.refused.push_back(Refused {
                    seq,
                    reason: SeqFailure::TooLong {
                        tokens: 0,
                        what: format!("prefill worker {}", self.worker),
                        pages: self.kv.pages_total(),
                    },
                    job: j.job,
                });
            }
        }
        if plan.items.is_empty() {
            return None;
        }
        for it in &plan.items {
            if let Some(j) = self.jobs.get_mut(&it.seq) {
                j.cached.get_or_insert(it.start);
            }
        }
        self.stepping = true;
        Some(plan)
    }

    pub fn handle_step_done(&mut self, plan: &StepPlan) {
        self.stepping = false;
        self.sched.complete(plan);
    }

    /// The engine refused `plan`: its sequences are given up with the reason.
    pub fn handle_step_failed(&mut self, now_us: u64, plan: &StepPlan, error: String) {
        self.stepping = false;
        for it in &plan.items {
            if let Some(j) = self.release(it.seq, false, now_us) {
                self.refused.push_back(Refused {
                    seq: it.seq,
                    reason: SeqFailure::Engine(error.clone()),
                    job: j.job,
                });
            }
        }
    }

    /// The tokens and the driver's payload of a sequence whose prompt is computed, to sample.
    pub fn sample_ctx(&mut self, seq: SeqId) -> Option<(&[u32], &mut J)> {
        let j = self.jobs.get_mut(&seq)?;
        Some((self.sched.tokens(seq)?, &mut j.job))
    }

    pub fn job(&self, seq: SeqId) -> Option<&J> {
        self.jobs.get(&seq).map(|j| &j.job)
    }

    /// The first token of `seq`, and whether its KV reached the decode group (`transfer`).
    pub fn handle_first_token(
        &mut self,
        now_us: u64,
        seq: SeqId,
        token: u32,
        transfer: Result<(), String>,
    ) -> Option<FirstToken<J>> {
        let len = self.sched.tokens(seq)?.len() + 1;
        // Its computed prompt pages go into the prefix cache for later requests.
        let j = self.release(seq, true, now_us)?;
        let cached = j.cached.unwrap_or(0);
        if let Err(e) = transfer {
            return Some(FirstToken::Retry {
                reason: SeqFailure::Transfer(e),
                job: j.job,
            });
        }
        Some(match j.limits.finish(token, 1, len, self.max_positions) {
            Some(finish) => FirstToken::Finished {
                finish,
                cached,
                job: j.job,
            },
            None => FirstToken::Handoff { cached, job: j.job },
        })
    }

    /// The client went away or the gateway re-routed: the job comes back to be dropped (and its
    /// decode reservation freed).
    pub fn handle_abort(&mut self, now_us: u64, seq: SeqId) -> Option<J> {
        if !self.jobs.contains_key(&seq) {
            return None;
        }
        self.release(seq, false, now_us).map(|j| j.job)
    }

    /// Ends `seq`'s job and frees its pages: the one place this core frees a sequence's pages.
    fn release(&mut self, seq: SeqId, cache: bool, now_us: u64) -> Option<PrefillJobState<J>> {
        let Some(j) = self.jobs.remove(&seq) else {
            self.double_releases += 1;
            debug_assert!(false, "release of sequence {seq}, which holds nothing here");
            return None;
        };
        if let Err(e) = self.sched.finish(seq, cache, &mut self.kv, now_us) {
            self.double_releases += 1;
            debug_assert!(false, "sequence {seq} had no pages to free: {e}");
        }
        Some(j)
    }

    pub fn jobs(&self) -> impl Iterator<Item = (&SeqId, &PrefillJobState<J>)> {
        self.jobs.iter()
    }

    pub fn sched(&self) -> &Scheduler {
        &self.sched
    }

    pub fn kv(&self) -> &KvManager {
        &self.kv
    }

    pub fn double_releases(&self) -> u64 {
        self.double_releases
    }

    /// Panics naming the first broken invariant.
    pub fn check_invariants(&self) {
        self.sched.check_invariants(&self.kv);
        assert_eq!(
            self.jobs.len(),
            self.sched.running() + self.sched.waiting(),
            "jobs vs scheduler"
        );
        assert_eq!(self.double_releases, 0, "a sequence was released twice");
    }
}
