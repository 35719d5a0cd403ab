//! Batched generation on the engine: one prefill forward for all prompts, then one decode
//! forward per step for every sequence still running.

use crate::kv::KvCache;
use crate::sampling::{Sampler, SamplingParams};
use crate::{LogitsMode, Model, Result, SeqInput};

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends after emitting one of these (it is kept in the output, as HF does).
    pub stop_ids: Vec<u32>,
}

struct Running {
    tokens: Vec<u32>,
    prompt_len: usize,
    block_table: Vec<u32>,
    sampler: Sampler,
    done: bool,
}

/// Generates for every request; returns the generated ids of each. Pages are returned to
/// `cache` when this returns, success or not.
pub fn generate(
    model: &Model,
    cache: &mut KvCache,
    reqs: &[GenerateRequest],
) -> Result<Vec<Vec<u32>>> {
    let mut seqs: Vec<Running> = reqs
        .iter()
        .map(|r| Running {
            tokens: r.prompt.clone(),
            prompt_len: r.prompt.len(),
            block_table: Vec::new(),
            sampler: Sampler::new(r.sampling),
            done: r.max_tokens == 0,
        })
        .collect();
    let result = run(model, cache, reqs, &mut seqs);
    for s in &mut seqs {
        cache.release(&mut s.block_table);
    }
    result?;
    Ok(seqs
        .into_iter()
        .map(|s| s.tokens[s.prompt_len..].to_vec())
        .collect())
}

fn run(
    model: &Model,
    cache: &mut KvCache,
    reqs: &[GenerateRequest],
    seqs: &mut [Running],
) -> Result<()> {
    if let Some(r) = reqs.iter().find(|r| r.prompt.is_empty()) {
        return Err(crate::Error::Invalid(format!(
            "empty prompt (max_tokens {})",
            r.max_tokens
        )));
    }
    // Prefill: every prompt in one forward.
    let mut active: Vec<usize> = (0..seqs.len()).filter(|&i| !seqs[i].done).collect();
    for &i in &active {
        let len = seqs[i].tokens.len();
        cache.ensure(&mut seqs[i].block_table, len)?;
    }
    let mut first = true;
    while !active.is_empty() {
        let batch: Vec<SeqInput<'_>> = active
            .iter()
            .map(|&i| {
                let s = &seqs[i];
                let start = if first { 0 } else { s.tokens.len() - 1 };
                SeqInput {
                    tokens: &s.tokens[start..],
                    start_pos: start,
                    block_table: &s.block_table,
                }
            })
            .collect();
        let logits = model.forward(cache, &batch, LogitsMode::Last)?.to_vec_f32();
        first = false;
        let vocab = model.config.vocab_size;
        for (row, &i) in active.iter().enumerate() {
            let s = &mut seqs[i];
            let t = s.sampler.sample(&logits[row * vocab..(row + 1) * vocab]);
            s.tokens.push(t);
            let generated = s.tokens.len() - s.prompt_len;
            // A sequence that fills the context window ends there, as a server's "length"
            // finish, instead of failing the whole batch on the next step.
            let full = s.tokens.len() >= model.config.max_position_embeddings;
            if generated >= reqs[i].max_tokens || reqs[i].stop_ids.contains(&t) || full {
                s.done = true;
            }
        }
        active.retain(|&i| !seqs[i].done);
        for &i in &active {
            let len = seqs[i].tokens.len();
            cache.ensure(&mut seqs[i].block_table, len)?;
        }
    }
    Ok(())
}
