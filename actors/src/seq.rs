//! What travels with one sequence (one choice of one request) through the workers: its tokens,
//! its sampling state, and the channel its tokens stream back on.

use std::sync::{Arc, Mutex};

use duet_core::types::SeqId;
use duet_model::grammar::{GrammarCompiler, GrammarMatcher, GrammarSpec, TokenMask};
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
    /// Constrained decoding: the output (after `</think>` when the sequence starts reasoning)
    /// is a sentence of this grammar. Only the spec travels; each worker compiles it and replays
    /// the sequence's tokens, so the matcher's state follows the tokens across a handoff.
    pub grammar: Option<Arc<GrammarSpec>>,
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
    grammar: GrammarState,
}

/// Where a sequence's grammar is on this worker.
#[derive(Debug)]
enum GrammarState {
    /// No grammar, or it could not be held (logged once): sampling is unconstrained.
    Off,
    /// Not compiled here yet (compiled at the first constrained token).
    Pending,
    /// Shared with the [`MaskJob`] of a running step, which fills `ready` while the model
    /// computes the step's logits.
    Active(Arc<Mutex<GrammarSlot>>),
}

/// A grammar's matcher and, once computed, the mask of the token after `ready.0` output tokens.
#[derive(Debug, Clone)]
struct GrammarSlot {
    matcher: GrammarMatcher,
    ready: Option<(usize, TokenMask)>,
}

impl Clone for GrammarState {
    /// A copy owns its own matcher (a clone of a sampler never shares a job's slot).
    fn clone(&self) -> Self {
        match self {
            GrammarState::Off => GrammarState::Off,
            GrammarState::Pending => GrammarState::Pending,
            GrammarState::Active(slot) => {
                GrammarState::Active(Arc::new(Mutex::new(lock(slot).clone())))
            }
        }
    }
}

/// A slot's lock; a job that panicked while holding it left a matcher that is still whole (the
/// matcher's own state changes are all-or-error), so the poison is ignored.
fn lock(slot: &Mutex<GrammarSlot>) -> std::sync::MutexGuard<'_, GrammarSlot> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// The mask of one constrained sequence's next token, to compute while the step that produces
/// its logits runs (the mask depends only on the tokens so far): a step's masks then cost no
/// time of their own when the model's forward is longer, as on an accelerator.
#[derive(Debug)]
pub struct MaskJob {
    slot: Arc<Mutex<GrammarSlot>>,
    /// The output tokens the matcher has not consumed yet (the last sampled one, usually).
    new_tokens: Vec<u32>,
    output_len: usize,
}

impl MaskJob {
    /// Brings the matcher up to date and stores the mask; on an error nothing is stored and the
    /// sampler meets the error itself (and drops the grammar, logged).
    pub fn run(&self) {
        let mut slot = lock(&self.slot);
        if slot.matcher.consumed() + self.new_tokens.len() != self.output_len {
            return;
        }
        if slot.matcher.consume(&self.new_tokens).is_err() {
            return;
        }
        if let Ok(mask) = slot.matcher.next_mask() {
            slot.ready = Some((self.output_len, mask));
        }
    }
}

impl SeqSampler {
    pub fn new(params: SeqParams) -> Self {
        Self {
            sampler: Sampler::new(params.sampling),
            grammar: GrammarState::new(&params),
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
            grammar: GrammarState::new(&params),
            params,
        }
    }

    /// Picks the next token for a sequence whose tokens so far are `tokens` (prompt_len of them
    /// the prompt), given the last position's logits. `grammars` compiles the sequence's grammar
    /// on this worker (a worker without one samples unconstrained, which only the echo engine,
    /// which never samples, may be).
    pub fn next(
        &mut self,
        logits: &[f32],
        tokens: &[u32],
        prompt_len: usize,
        grammars: Option<&GrammarCompiler>,
    ) -> (u32, Option<TokenLogprob>) {
        let generated = &tokens[prompt_len.min(tokens.len())..];
        if let Some(forced) = self.forced(tokens) {
            let lp = self.params.logprobs.map(|k| logprob_of(logits, forced, k));
            return (forced, lp);
        }
        let mut penalised = self.penalise(logits, tokens, generated);
        if let Some(output) = self.constrained_output(generated) {
            let mut masked = penalised.take().unwrap_or_else(|| logits.to_vec());
            self.grammar
                .mask(&self.params, grammars, output, &mut masked);
            penalised = Some(masked);
        }
        let logits = penalised.as_deref().unwrap_or(logits);
        let token = self.sampler.sample(logits);
        let lp = self.params.logprobs.map(|k| logprob_of(logits, token, k));
        (token, lp)
    }

    /// The mask job of the next token, for a constrained sequence whose tokens so far are
    /// `tokens` (compiling its grammar here first if needed); `None` when nothing is to be
    /// masked (no grammar, still reasoning, a forced token).
    pub fn mask_job(
        &mut self,
        tokens: &[u32],
        prompt_len: usize,
        grammars: Option<&GrammarCompiler>,
    ) -> Option<MaskJob> {
        if self.forced(tokens).is_some() {
            return None;
        }
        let generated = &tokens[prompt_len.min(tokens.len())..];
        let output_len = self.constrained_output(generated)?.len();
        self.grammar.compile(&self.params, grammars);
        let GrammarState::Active(slot) = &self.grammar else {
            return None;
        };
        let consumed = lock(slot).matcher.consumed();
        let output = &generated[generated.len() - output_len..];
        Some(MaskJob {
            slot: slot.clone(),
            new_tokens: output.get(consumed..)?.to_vec(),
            output_len,
        })
    }

    /// The part of the generated tokens the grammar constrains: all of them, or those after the
    /// first `</think>` for a sequence that starts reasoning (`None` while it still reasons, or
    /// without a grammar).
    fn constrained_output<'t>(&self, generated: &'t [u32]) -> Option<&'t [u32]> {
        let spec = self.params.grammar.as_ref()?;
        if matches!(self.grammar, GrammarState::Off) {
            return None;
        }
        match spec.starts_after {
            None => Some(generated),
            Some(end) => {
                let at = generated.iter().position(|&t| t == end)?;
                Some(&generated[at + 1..])
            }
        }
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

impl GrammarState {
    fn new(params: &SeqParams) -> Self {
        if params.grammar.is_some() {
            GrammarState::Pending
        } else {
            GrammarState::Off
        }
    }

    /// Brings the matcher up to `output` and masks `logits`. A grammar that cannot be compiled
    /// here or that the output left (a token forced past it: a thinking budget, `ignore_eos`
    /// past its end) is dropped for the rest of the sequence with a warning: the gateway compiled
    /// the same spec before admitting the request, so this is a bug, not outside input.
    fn mask(
        &mut self,
        params: &SeqParams,
        grammars: Option<&GrammarCompiler>,
        output: &[u32],
        logits: &mut [f32],
    ) {
        self.compile(params, grammars);
        let GrammarState::Active(slot) = self else {
            return;
        };
        let mut slot = lock(slot);
        // The step's mask job computed it while the model ran.
        if let Some((len, mask)) = slot.ready.take()
            && len == output.len()
            && slot.matcher.consumed() == len
        {
            mask.apply(logits);
            return;
        }
        let r = slot
            .matcher
            .advance(output)
            .and_then(|()| slot.matcher.mask_logits(logits));
        drop(slot);
        if let Err(e) = r {
            tracing::warn!("grammar dropped: {e}");
            *self = GrammarState::Off;
        }
    }

    /// Compiles a pending grammar with this worker's compiler.
    fn compile(&mut self, params: &SeqParams, grammars: Option<&GrammarCompiler>) {
        if matches!(self, GrammarState::Pending) {
            let (Some(spec), Some(c)) = (params.grammar.as_deref(), grammars) else {
                tracing::warn!(
                    "a constrained sequence reached a worker without a grammar compiler"
                );
                *self = GrammarState::Off;
                return;
            };
            *self = match c.compile(spec) {
                Ok(matcher) => GrammarState::Active(Arc::new(Mutex::new(GrammarSlot {
                    matcher,
                    ready: None,
                }))),
                Err(e) => {
                    tracing::warn!("grammar dropped: {e}");
                    GrammarState::Off
                }
            };
        }
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
            grammar: None,
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
        assert_eq!(s.next(&logits, &[0], 1, None).0, 2);
        let mut s = SeqSampler::new(SeqParams {
            logit_bias: vec![(3, 3.5), (99, 5.0), (2, f32::NAN)],
            logprobs: Some(1),
            ..params()
        });
        let (t, lp) = s.next(&logits, &[0], 1, None);
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
        assert_eq!(s.next(&logits, &[0, 1, 1], 1, None).0, 2);
        // In the prompt only, it is not penalised.
        assert_eq!(s.next(&logits, &[1, 1, 0], 3, None).0, 1);
    }

    #[test]
    fn repetition_penalty_covers_the_prompt() {
        let logits = [0.0, 2.0, 1.5];
        let mut s = SeqSampler::new(SeqParams {
            repetition_penalty: 1.5,
            ..params()
        });
        assert_eq!(s.next(&logits, &[1], 1, None).0, 2);
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
            let (t, _) = s.next(&logits, &toks, 3, None);
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

    fn r1_grammars() -> (duet_model::tokenizer::TextTokenizer, GrammarCompiler) {
        let (json, cfg) = duet_model::tiny::r1_tokenizer_files().unwrap();
        let cfg: serde_json::Value = serde_json::from_str(cfg).unwrap();
        let tok =
            duet_model::tokenizer::TextTokenizer::from_bytes(&json, &cfg, "r1".as_ref()).unwrap();
        let eos = tok.token_to_id("<｜end▁of▁sentence｜>").unwrap();
        let c = tok.grammar_compiler(vec![eos]);
        (tok, c)
    }

    #[test]
    fn a_grammar_holds_across_a_handoff_and_starts_after_think() {
        use duet_model::grammar::GrammarKind;
        let (tok, c) = r1_grammars();
        let think_end = tok.token_to_id("</think>").unwrap();
        let favourite = tok.encode(" hello", false).unwrap()[0];
        let p = SeqParams {
            grammar: Some(Arc::new(GrammarSpec {
                kind: GrammarKind::Regex,
                source: "[0-9]{6}".into(),
                starts_after: Some(think_end),
            })),
            ..params()
        };
        let mut logits = vec![0.0f32; tok.vocab_size()];
        logits[favourite as usize] = 5.0;
        let mut a = SeqSampler::new(p.clone());
        let prompt = vec![1u32, 2, 3];
        // Still reasoning: nothing is masked, the favourite wins.
        assert_eq!(a.next(&logits, &prompt, 3, Some(&c)).0, favourite);
        let mut toks = prompt.clone();
        toks.extend([favourite, think_end]);
        let (t, _) = a.next(&logits, &toks, 3, Some(&c));
        toks.push(t);
        // The rest continues on another worker: a fresh sampler replays the tokens.
        let mut b = SeqSampler::resume(p, a.rng_state());
        loop {
            // Every other token's mask comes from a mask job, as a decode step computes them.
            if toks.len() % 2 == 0 {
                b.mask_job(&toks, 3, Some(&c)).unwrap().run();
            }
            let (t, _) = b.next(&logits, &toks, 3, Some(&c));
            if tok.decode(&[t], false).unwrap() == "<｜end▁of▁sentence｜>" {
                break;
            }
            toks.push(t);
            assert!(toks.len() < 20, "{toks:?}");
        }
        let out = tok.decode(&toks[5..], false).unwrap();
        assert!(
            out.len() == 6 && out.chars().all(|ch| ch.is_ascii_digit()),
            "{out:?}"
        );
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let logits = [1.0f32, 3.0, 2.0];
        let mut s = SeqSampler::new(SeqParams {
            logprobs: Some(2),
            ..params()
        });
        let (t, lp) = s.next(&logits, &[0], 1, None);
        let lp = lp.unwrap();
        assert_eq!(t, 1);
        let total: f32 = logits.iter().map(|&v| (v - 3.0f32).exp()).sum::<f32>().ln();
        assert!((lp.logprob - (-total)).abs() < 1e-5);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
    }
}
