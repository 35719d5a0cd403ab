//! `duet engine-bench`: the engine's prefill and decode throughput on one machine, printed as a
//! table or JSON. `bench/model_vs_hf.sh` runs it beside HF transformers on the same checkpoint.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use duet_model::grammar::{GrammarCompiler, GrammarKind, GrammarSpec, TokenMask};
use duet_model::kv::KvCache;
use duet_model::rng::Rng;
use duet_model::{LogitsMode, Model, SeqInput};
use serde_json::json;

use crate::DTypeArg;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DTypeArg,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Decode batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batches: Vec<usize>,
    /// Context each decode sequence starts from.
    #[arg(long, default_value_t = 128)]
    decode_context: usize,
    /// Timed decode steps per batch size (after one warm-up step).
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// Timed prefill repetitions (the best is reported).
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    #[arg(long)]
    json: bool,
    /// Also time decode with every sequence under a JSON-schema grammar ([`BENCH_SCHEMA`]) against
    /// the same decode unconstrained, both taking the logits to the host and picking each row's
    /// token there, as a worker does.
    #[arg(long)]
    grammar: bool,
}

/// The schema of `--grammar`: a tool call's arguments, with strings, an enum, numbers and an
/// array, so the mask walks several kinds of lexemes.
const BENCH_SCHEMA: &str = r#"{"type":"object","properties":{
 "city":{"type":"string","maxLength":24},"unit":{"enum":["celsius","fahrenheit"]},
 "days":{"type":"integer","minimum":1,"maximum":14},
 "tags":{"type":"array","items":{"type":"string","maxLength":12},"maxItems":4}},
 "required":["city","unit","days","tags"],"additionalProperties":false}"#;

fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Read bandwidth of this machine with all threads (sum of a 1 GiB buffer), the ceiling for a
/// decode step that streams weights.
pub(crate) fn read_bandwidth_bytes_per_s() -> f64 {
    use rayon::prelude::*;
    let n = (1usize << 30) / 4;
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        // Eight independent partial sums per chunk, so the loop is bound by memory, not by
        // the latency of one chained add.
        let s: f32 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0.0f32; 8];
                for v in c.chunks_exact(8) {
                    for l in 0..8 {
                        acc[l] += v[l];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((n * 4) as f64 / dt);
    }
    best
}

/// `n` ordinary (non-special) token ids; small test vocabularies get their upper half.
pub(crate) fn random_ids(rng: &mut Rng, vocab: usize, n: usize) -> Vec<u32> {
    let lo = 1000.min(vocab / 2) as u64;
    let hi = (lo + 100_000).min(vocab as u64);
    (0..n)
        .map(|_| (lo + rng.next_u64() % (hi - lo)) as u32)
        .collect()
}

/// Seconds of each of `runs` prefills of a fresh random `len`-token prompt.
pub(crate) fn prefill_times(
    model: &Model,
    rng: &mut Rng,
    len: usize,
    runs: usize,
) -> Result<Vec<f64>> {
    let mut cache = model.new_cache(len.div_ceil(64) + 2);
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let prompt = random_ids(rng, model.config.vocab_size, len);
        let mut table = Vec::new();
        cache.ensure(&mut table, len)?;
        let t = Instant::now();
        model.forward(
            &mut cache,
            &[SeqInput {
                tokens: &prompt,
                start_pos: 0,
                block_table: &table,
            }],
            LogitsMode::Last,
        )?;
        times.push(t.elapsed().as_secs_f64());
        cache.release(&mut table);
    }
    Ok(times)
}

/// A cache holding `batch` random `ctx`-token prompts, prefilled (untimed), with room for `steps`
/// more tokens each, and each sequence's block table.
fn prefilled(
    model: &Model,
    rng: &mut Rng,
    batch: usize,
    ctx: usize,
    steps: usize,
) -> Result<(KvCache, Vec<Vec<u32>>)> {
    let vocab = model.config.vocab_size;
    let mut cache = model.new_cache(batch * (ctx + steps + 1).div_ceil(64) + 2);
    let prompts: Vec<Vec<u32>> = (0..batch).map(|_| random_ids(rng, vocab, ctx)).collect();
    let mut tables = vec![Vec::new(); batch];
    for t in tables.iter_mut() {
        cache.ensure(t, ctx + steps + 1)?;
    }
    let inputs: Vec<SeqInput<'_>> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| SeqInput {
            tokens: p,
            start_pos: 0,
            block_table: t,
        })
        .collect();
    model.forward(&mut cache, &inputs, LogitsMode::Last)?;
    Ok((cache, tables))
}

/// One decode step's inputs: each sequence's last token at `pos`.
fn step_inputs<'a>(last: &'a [[u32; 1]], tables: &'a [Vec<u32>], pos: usize) -> Vec<SeqInput<'a>> {
    last.iter()
        .zip(tables)
        .map(|(l, t)| SeqInput {
            tokens: l,
            start_pos: pos,
            block_table: t,
        })
        .collect()
}

/// Seconds of each of `steps` greedy decode steps of `batch` sequences that start from random
/// `ctx`-token prompts (the prefill of those prompts is not timed).
pub(crate) fn decode_step_times(
    model: &Model,
    rng: &mut Rng,
    batch: usize,
    ctx: usize,
    steps: usize,
) -> Result<Vec<f64>> {
    let vocab = model.config.vocab_size;
    let (mut cache, tables) = prefilled(model, rng, batch, ctx, steps)?;
    let mut last = vec![[random_ids(rng, vocab, 1)[0]]; batch];
    let mut times = Vec::with_capacity(steps);
    for step in 0..steps {
        let inputs = step_inputs(&last, &tables, ctx + step);
        let t = Instant::now();
        let logits = model.forward(&mut cache, &inputs, LogitsMode::Last)?;
        let next = duet_kernels::ops::argmax_rows(&logits)?;
        times.push(t.elapsed().as_secs_f64());
        for (l, id) in last.iter_mut().zip(next) {
            l[0] = id;
        }
    }
    Ok(times)
}

/// Per-step seconds of greedy decode with the logits on the host, each row's token picked there;
/// with `grammar`, under the grammar's mask (a finished sequence starts a new sentence of the
/// grammar, so every step is constrained). Also returns the seconds spent masking.
fn host_decode_step_times(
    model: &Model,
    rng: &mut Rng,
    batch: usize,
    ctx: usize,
    steps: usize,
    grammar: Option<(&GrammarCompiler, &GrammarSpec)>,
) -> Result<(Vec<f64>, f64)> {
    let vocab = model.config.vocab_size;
    let (mut cache, tables) = prefilled(model, rng, batch, ctx, steps)?;
    let compile = |(c, s): (&GrammarCompiler, &GrammarSpec)| c.compile(s);
    let mut matchers = match grammar {
        Some(g) => (0..batch)
            .map(|_| compile(g).map(Some))
            .collect::<Result<Vec<_>, _>>()?,
        None => vec![None; batch],
    };
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut last = vec![[random_ids(rng, vocab, 1)[0]]; batch];
    let (mut times, mut mask_s) = (Vec::with_capacity(steps), 0.0);
    for step in 0..steps {
        let inputs = step_inputs(&last, &tables, ctx + step);
        let t = Instant::now();
        // As a decode worker does: the masks on their own thread while the model runs.
        let (logits, masks) = std::thread::scope(|scope| {
            let masks = scope.spawn(|| -> Result<(Vec<Option<TokenMask>>, f64)> {
                let tm = Instant::now();
                let mut out = Vec::with_capacity(batch);
                for (m, o) in matchers.iter_mut().zip(outputs.iter_mut()) {
                    let (Some(m), Some(g)) = (m, grammar) else {
                        out.push(None);
                        continue;
                    };
                    if m.is_stopped() {
                        *m = compile(g)?;
                        o.clear();
                    }
                    m.advance(o)?;
                    out.push(Some(m.next_mask()?));
                }
                Ok((out, tm.elapsed().as_secs_f64()))
            });
            let logits = model.forward(&mut cache, &inputs, LogitsMode::Last);
            (logits, masks.join())
        });
        let (masks, s) = masks.map_err(|_| anyhow::anyhow!("a mask thread panicked"))??;
        mask_s += s;
        let mut host = logits?.to_vec_f32();
        for (row, l) in host.chunks_mut(vocab).enumerate() {
            if let Some(m) = &masks[row] {
                m.apply(l);
            }
            let id = l
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0 as u32;
            last[row][0] = id;
            outputs[row].push(id);
        }
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((times, mask_s))
}

/// `--grammar`: decode tok/s at each batch size without and with the grammar, and the mask's
/// cost per token.
fn grammar_rows(model: &Model, a: &Args, rng: &mut Rng) -> Result<Vec<serde_json::Value>> {
    let tokenizer = duet_model::tokenizer::TextTokenizer::from_dir(&a.model)?;
    let eos = duet_actors::serve::eos_ids(&model.config, &tokenizer);
    let compiler = tokenizer.grammar_compiler(eos);
    let spec = GrammarSpec {
        kind: GrammarKind::JsonSchema,
        source: BENCH_SCHEMA.to_string(),
        starts_after: None,
    };
    let mut rows = Vec::new();
    for &b in &a.batches {
        let steps = a.decode_steps + 1;
        let (free, _) = host_decode_step_times(model, rng, b, a.decode_context, steps, None)?;
        let g = Some((&compiler, &spec));
        let (constrained, mask_s) =
            host_decode_step_times(model, rng, b, a.decode_context, steps, g)?;
        // The first step of each is the warm-up (and the grammar's first compile).
        let tok_s = |t: &[f64]| (b * a.decode_steps) as f64 / t[1..].iter().sum::<f64>();
        rows.push(json!({
            "batch": b,
            "tok_s_unconstrained": tok_s(&free),
            "tok_s_grammar": tok_s(&constrained),
            "mask_us_per_token": mask_s * 1e6 / (b * steps) as f64,
        }));
    }
    Ok(rows)
}

pub fn run(a: Args) -> Result<()> {
    let t0 = Instant::now();
    let model = crate::load_model(&a.model, a.dtype.into())?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut rng = Rng::new(1);
    let best_prefill = prefill_times(&model, &mut rng, a.prompt_len, a.repeats.max(1))?
        .into_iter()
        .fold(f64::INFINITY, f64::min);
    let prefill_tok_s = a.prompt_len as f64 / best_prefill;

    let mut decode = Vec::new();
    for &b in &a.batches {
        // One warm-up step, then the timed ones.
        let times = decode_step_times(&model, &mut rng, b, a.decode_context, a.decode_steps + 1)?;
        let elapsed: f64 = times[1..].iter().sum();
        decode.push((b, (b * a.decode_steps) as f64 / elapsed));
    }
    let grammar = if a.grammar {
        Some(grammar_rows(&model, &a, &mut rng)?)
    } else {
        None
    };
    let active = active_weight_bytes(&model);
    // Before the bandwidth probe, whose 1 GiB buffer is not the engine's.
    let peak_rss = peak_rss_bytes();
    let bw = read_bandwidth_bytes_per_s();
    let b1 = decode.iter().find(|(b, _)| *b == 1).map(|d| d.1);
    let report = json!({
        "engine": "duet",
        "model": a.model.display().to_string(),
        "dtype": format!("{:?}", model.dtype),
        "threads": rayon::current_num_threads(),
        "load_s": load_s,
        "prefill_tokens": a.prompt_len,
        "prefill_tok_s": prefill_tok_s,
        "decode": decode.iter().map(|(b, r)| json!({"batch": b, "tok_s": r})).collect::<Vec<_>>(),
        "weights_resident_bytes": model.weight_bytes(),
        "active_weight_bytes_per_token": active,
        "read_bandwidth_gb_s": bw / 1e9,
        "decode_b1_bandwidth_limit_tok_s": bw / active as f64,
        "decode_b1_fraction_of_limit": b1.map(|r| r * active as f64 / bw),
        "peak_rss_bytes": peak_rss,
        "decode_grammar": grammar,
    });
    if a.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Bytes of weights one decode token reads at batch 1: every dense weight, the routed experts it
/// picks (top-k) and the shared ones, the lm_head, one embedding row.
fn active_weight_bytes(m: &duet_model::Model) -> usize {
    let c = &m.config;
    let e = m.dtype.size_bytes();
    let h = c.hidden_size;
    let attn = if c.architecture().is_ok_and(|a| a.is_gqa()) {
        // q, k, v and o of grouped-query attention (Qwen2, Llama).
        let g = c.gqa_shape();
        (g.heads + 2 * g.kv_heads) * g.head_dim * h + h * g.heads * g.head_dim
    } else {
        let s = c.mla_shape();
        let q = match c.q_lora_rank {
            Some(r) if r > 0 => r * h + s.heads * (s.nope + s.rope) * r,
            _ => s.heads * (s.nope + s.rope) * h,
        };
        q + (s.kv_lora + s.rope) * h + s.heads * (s.nope + s.v) * s.kv_lora + h * s.heads * s.v
    };
    let mut total = 0;
    for i in 0..c.num_hidden_layers {
        total += attn;
        total += if c.is_moe_layer(i) {
            let k = c.num_experts_per_tok.unwrap_or(0) + c.n_shared_experts.unwrap_or(0);
            3 * h * c.moe_intermediate_size * k
        } else {
            3 * h * c.intermediate_size
        };
    }
    (total + h + c.vocab_size * h) * e
}
