//! What travels with one sequence (one choice of one request) through the workers: its tokens,
//! its sampling state, and the channel its tokens stream back on.

use std::sync::Arc;

use duet_core::types::SeqId;
use duet_model::sampling::{Sampler, SamplingParams};
use tokio::sync::mpsc;

/// Sampling and stopping parameters a worker needs (the gateway keeps the text-level ones:
/// stop strings, reasoning and tool-call parsing).
#[derive(Debug, Clone)]
pub struct SeqParams {
    pub sampling: SamplingParams,
    /// Tokens still to generate (the request's max_tokens less what was already streamed).
    pub max_new_tokens: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1.0 is off.
    pub repetition_penalty: f32,
    /// OpenAI's `logit_bias`: added to these tokens' logits before sampling (after penalties);
    /// sorted by token id, one entry per token.
    pub logit_bias: Vec<(u32, f32)>,
    /// Generation ends after emitting one of these (EOS unless `ignore_eos`, plus the request's
    /// `stop_token_ids`); the token is reported, the gateway decides whether to show it.
    pub stop_token_ids: Vec<u32>,
    /// Top log-probabilities to return per token; `None` returns no log-probabilities.
    pub logprobs: Option<usize>,
    /// After this many reasoning tokens force `\n` then `</think>` (the seed's thinking budget).
    pub thinking: Option<ThinkingBudgetSpec>,
}

#[derive(Debug, Clone, Copy)]
pub struct ThinkingBudgetSpec {
    pub budget: usize,
    pub think_start_id: u32,
    pub think_end_id: u32,
    pub newline_id: u32,
}

/// The log-probability of a sampled token and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

pub use duet_core::pd::{Finish, SeqFailure};

/// Events a worker sends back for one sequence. At most `max_new_tokens + 1` are sent, so the
/// channel is bounded by the request's own validated limit.
#[derive(Debug, Clone)]
pub enum SeqEvent {
    Token {
        token: u32,
        logprob: Option<TokenLogprob>,
        /// Set on the first token: prompt tokens found in the prefill worker's prefix cache.
        cached_tokens: Option<usize>,
        finish: Option<Finish>,
    },
    /// The sequence cannot be served (its KV can never fit, the engine failed); final.
    Failed(SeqFailure),
    /// This worker cannot go on with the sequence (a corrupt KV transfer, a full group): the
    /// gateway re-runs it elsewhere from the tokens streamed so far.
    Retry(SeqFailure),
}

pub type EventTx = mpsc::UnboundedSender<SeqEvent>;
pub type EventRx = mpsc::UnboundedReceiver<SeqEvent>;

/// One sequence as the gateway submits it to a prefill/decode pair.
#[derive(Debug, Clone)]
pub struct SeqJob {
    pub id: SeqId,
    /// Prompt followed by the tokens already streamed to the client (after a worker loss the
    /// gateway resubmits with them, so the stream continues where it stopped).
    pub tokens: Arc<Vec<u32>>,
    /// Length of the original prompt within `tokens`; penalties count only tokens after it.
    pub prompt_len: usize,
    pub params: SeqParams,
    pub events: EventTx,
    /// The span this run of the sequence belongs to; `None` when it is not traced.
    pub trace: Option<crate::trace::TraceCtx>,
}

/// Per-sequence logit processing and sampling: penalties, the thinking budget, the sampler's RNG,
/// log-probabilities. Moves from the prefill worker to the decode worker with the sequence, so a
/// seeded request draws the same random stream as if one worker had run it.
#[derive(Debug, Clone)]
pub struct SeqSampler {
    params: SeqParams,
    sampler: Sampler,
}

impl SeqSampler {
    pub fn new(params: SeqParams) -> Self {
        Self {
            sampler: Sampler::new(params.sampling),
            params,
        }
    }

    pub fn params(&self) -> &SeqParams {
        &self.params
    }

    /// The random stream's state, so another process can continue it ([`Self::resume`]).
    pub fn rng_state(&self) -> [u64; 4] {
        self.sampler.rng_state()
    }

    pub fn resume(params: SeqParams, rng_state: [u64; 4]) -> Self {
        Self {
            sampler: Sampler::resume(params.sampling, rng_state),
            params,
        }
    }

    /// Picks the next token for a sequence whose tokens so far are `tokens` (prompt_len of them
    /// the prompt), given the last position's logits.
    pub fn next(
        &mut self,
        logits: &[f32],
        tokens: &[u32],
        prompt_len: usize,
    ) -> (u32, Option<TokenLogprob>) {
        let generated = &tokens[prompt_len.min(tokens.len())..];
        if let Some(forced) = self.forced(tokens) {
            let lp = self.params.logprobs.map(|k| logprob_of(logits, forced, k));
            return (forced, lp);
        }
        let penalised = self.penalise(logits, tokens, generated);
        let logits = penalised.as_deref().unwrap_or(logits);
        let token = self.sampler.sample(logits);
        let lp = self.params.logprobs.map(|k| logprob_of(logits, token, k));
        (token, lp)
    }

    /// The seed's `ThinkingBudgetLogitProcessor`, on prompt + output tokens: inside a thinking
    /// span (`<think>` present, `</think>` not), once the tokens from `<think>` on reach the
    /// budget, force `\n` and then `</think>`. Stateless, so it survives a handoff or a
    /// resubmission unchanged.
    fn forced(&self, tokens: &[u32]) -> Option<u32> {
        let t = self.params.thinking?;
        let start = tokens.iter().position(|&x| x == t.think_start_id)?;
        if tokens[start..].contains(&t.think_end_id) || tokens.len() - start < t.budget {
            return None;
        }
        Some(if tokens.last() == Some(&t.newline_id) {
            t.think_end_id
        } else {
            t.newline_id
        })
    }

    /// Frequency and presence penalties over generated tokens (OpenAI), repetition penalty over
    /// prompt and generated tokens (CTRL / HF: divide positive logits, multiply negative ones),
    /// then `logit_bias` (OpenAI: added to the logit; -100 bans a token, 100 all but forces it).
    fn penalise(&self, logits: &[f32], tokens: &[u32], generated: &[u32]) -> Option<Vec<f32>> {
        let p = &self.params;
        let freq = p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
        let rep = p.repetition_penalty != 1.0;
        if !freq && !rep && p.logit_bias.is_empty() {
            return None;
        }
        let mut out = logits.to_vec();
        if rep {
            let mut seen: Vec<u32> = tokens.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(v) = out.get_mut(t as usize) {
                    *v = if *v > 0.0 {
                        *v / p.repetition_penalty
                    } else {
                        *v * p.repetition_penalty
                    };
                }
            }
        }
        if freq {
            let mut counts: Vec<u32> = generated.to_vec();
            counts.sort_unstable();
            for run in counts.chunk_by(|a, b| a == b) {
                if let Some(v) = out.get_mut(run[0] as usize) {
                    *v -= p.frequency_penalty * run.len() as f32 + p.presence_penalty;
                }
            }
        }
        for &(t, bias) in &p.logit_bias {
            // A bias from another process is not trusted to be finite or in the vocabulary.
            if let Some(v) = out.get_mut(t as usize)
                && bias.is_finite()
            {
                *v += bias;
            }
        }
        Some(out)
    }
}

/// log-softmax of `token` and the `k` most likely tokens.
fn logprob_of(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + logits
            .iter()
            .map(|&v| ((v - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let lp = |t: u32| {
        logits
            .get(t as usize)
            .map_or(f32::NEG_INFINITY, |&v| v - lse)
    };
    let mut top = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(idx.len());
        let by = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        idx.select_nth_unstable_by(k - 1, by);
        idx.truncate(k);
        idx.sort_unstable_by(by);
        top = idx.into_iter().map(|t| (t, lp(t))).collect();
    }
    TokenLogprob {
        logprob: lp(token),
        top,
    }
}

#[cfg(test)]
#[path = "seq_sampling_tests.rs"]
mod sampling_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SeqParams {
        SeqParams {
            sampling: SamplingParams::greedy(),
            max_new_tokens: 10,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: vec![],
            stop_token_ids: vec![],
            logprobs: None,
            thinking: None,
        }
    }

    #[test]
    fn logit_bias_bans_and_favours_tokens_after_penalties() {
        let logits = [0.0, 2.0, 1.5, -1.0];
        // -100 takes the greedy token out; +3 makes the least likely one the pick.
        let mut s = SeqSampler::new(SeqParams {
            logit_bias: vec![(1, -100.0)],
            ..params()
        });
        assert_eq!(s.next(&logits, &[0], 1).0, 2);
        let mut s = SeqSampler::new(SeqParams {
            logit_bias: vec![(3, 3.5), (99, 5.0), (2, f32::NAN)],
            logprobs: Some(1),
            ..params()
        });
        let (t, lp) = s.next(&logits, &[0], 1);
        assert_eq!(t, 3);
        // Log-probabilities are those of the distribution sampled from (biased).
        assert_eq!(lp.unwrap().top[0].0, 3);
    }

    #[test]
    fn frequency_penalty_moves_greedy_off_a_repeated_token() {
        let logits = [0.0, 2.0, 1.5];
        let mut s = SeqSampler::new(SeqParams {
            frequency_penalty: 0.3,
            ..params()
        });
        // Token 1 generated twice: 2.0 − 0.6 = 1.4 < 1.5.
        assert_eq!(s.next(&logits, &[0, 1, 1], 1).0, 2);
        // In the prompt only, it is not penalised.
        assert_eq!(s.next(&logits, &[1, 1, 0], 3).0, 1);
    }

    #[test]
    fn repetition_penalty_covers_the_prompt() {
        let logits = [0.0, 2.0, 1.5];
        let mut s = SeqSampler::new(SeqParams {
            repetition_penalty: 1.5,
            ..params()
        });
        assert_eq!(s.next(&logits, &[1], 1).0, 2);
    }

    #[test]
    fn thinking_budget_forces_newline_then_end() {
        let spec = ThinkingBudgetSpec {
            budget: 4,
            think_start_id: 7,
            think_end_id: 9,
            newline_id: 8,
        };
        let mut s = SeqSampler::new(SeqParams {
            thinking: Some(spec),
            ..params()
        });
        let logits = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        // The prompt ends with `<think>\n` as R1's template writes it; the seed counts from
        // `<think>`: [7, 8, 1, 1] reaches 4, then `\n` is forced, then `</think>`.
        let mut toks = vec![5u32, 7, 8];
        for _ in 0..6 {
            let (t, _) = s.next(&logits, &toks, 3);
            toks.push(t);
        }
        assert_eq!(&toks[3..], &[1, 1, 8, 9, 1, 1]);
    }

    #[test]
    fn thinking_budget_waits_for_think_and_stops_after_think_end() {
        let spec = ThinkingBudgetSpec {
            budget: 3,
            think_start_id: 7,
            think_end_id: 9,
            newline_id: 8,
        };
        let s = SeqSampler::new(SeqParams {
            thinking: Some(spec),
            ..params()
        });
        // No `<think>` anywhere: nothing is forced, however long.
        assert_eq!(s.forced(&[5, 1, 1, 1, 1, 1]), None);
        // The model opened it: counted from `<think>` itself.
        assert_eq!(s.forced(&[5, 1, 7, 1]), None);
        assert_eq!(s.forced(&[5, 1, 7, 1, 1]), Some(8));
        // The last token already is `\n`: close at once.
        assert_eq!(s.forced(&[5, 7, 1, 8]), Some(9));
        // After `</think>` the budget is spent.
        assert_eq!(s.forced(&[5, 7, 9, 1, 1, 1, 1]), None);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let logits = [1.0f32, 3.0, 2.0];
        let mut s = SeqSampler::new(SeqParams {
            logprobs: Some(2),
            ..params()
        });
        let (t, lp) = s.next(&logits, &[0], 1);
        let lp = lp.unwrap();
        assert_eq!(t, 1);
        let total: f32 = logits.iter().map(|&v| (v - 3.0f32).exp()).sum::<f32>().ln();
        assert!((lp.logprob - (-total)).abs() < 1e-5);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
    }
}
