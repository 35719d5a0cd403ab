//! `duet bench`: a load generator for a running server, in the manner of SGLang's
//! `python -m sglang.bench_serving` (same dataset options, arrival process and summary table).
//!
//! Requests go out as a Poisson process of rate `--request-rate` (seeded; `inf` sends them all at
//! once), at most `--max-concurrency` in flight. Each streams its answer; per request we record
//! TTFT (request sent → first SSE event carrying output), the gaps between output events (ITL),
//! end-to-end latency, and the token counts from the server's final `usage` (or `meta_info` for
//! SGLang's `/generate`), falling back to one token per output event. TPOT is
//! `(e2e − TTFT) / (output_tokens − 1)`. Statistics are plain functions of those records
//! ([`summarize`], [`render_table`]), so they are tested without a server.
//!
//! The client must stay cheap next to a server pushing ~150k tokens/s: one connection pool, SSE
//! parsed incrementally, each event's JSON read without copying its strings, one clock read per
//! network chunk, and a small runtime (`--threads 1`) so the bench does not take the server's CPUs.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use duet_model::rng::Rng;
use duet_model::tokenizer::TextTokenizer;
use duet_openai::sse::{SseParser, is_done};
use futures::StreamExt;
use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Ordinary vocabulary ids of the DeepSeek-R1 tokenizer: 0–2 are BOS/EOS/pad and 128000 onward
/// are added special tokens, which random prompts must not contain.
const RANDOM_TOKEN_IDS: std::ops::Range<u32> = 3..128_000;
/// Bytes of an error response body kept for the report: enough to say what went wrong.
const ERROR_BODY_BYTES_MAX: usize = 2048;
/// Bytes of an unparseable event quoted in an error.
const ERROR_EVENT_BYTES_MAX: usize = 200;
/// A server that accepts no connection in this long is down, not slow.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Why a bench run could not be made or measured nothing.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag out of range.
    #[error("{0}")]
    Usage(&'static str),
    #[error("loading the R1 tokenizer: {0}")]
    Tokenizer(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: line {line}: {source}")]
    Dataset {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("building the bench's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("building the HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("a request task panicked: {0}")]
    Task(tokio::task::JoinError),
    #[error("writing the JSON summary: {0}")]
    Json(serde_json::Error),
    #[error("every request failed")]
    AllFailed,
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// Seed offset of the arrival process, so it does not replay the dataset's random stream.
const ARRIVAL_SEED_SALT: u64 = 0x5eed_a771_7a15;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// POST /v1/chat/completions, the prompt as one user message.
    Chat,
    /// POST /v1/completions.
    Completions,
    /// POST /generate (SGLang's native API) with `input_ids`.
    Generate,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Generate => "/generate",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatasetKind {
    /// Random token ids of the R1 vocabulary, lengths from `--random-*`.
    Random,
    /// `--dataset-path`: one JSON object per line, `{"prompt": "...", "output_len": 128}`.
    Jsonl,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, default_value = "http://127.0.0.1:9965")]
    base_url: String,
    #[arg(long, value_enum, default_value = "completions")]
    endpoint: Endpoint,
    /// The `model` field of OpenAI requests.
    #[arg(long, default_value = "default")]
    model: String,
    #[arg(long, alias = "dataset-name", value_enum, default_value = "random")]
    dataset: DatasetKind,
    /// The JSONL file of `--dataset jsonl`.
    #[arg(long, required_if_eq("dataset", "jsonl"))]
    dataset_path: Option<PathBuf>,
    /// Longest random prompt, in tokens.
    #[arg(long, default_value_t = 256)]
    random_input_len: usize,
    /// Longest random output, in tokens (also the output of JSONL lines without `output_len`).
    #[arg(long, default_value_t = 128)]
    random_output_len: usize,
    /// Random lengths are uniform in [ratio × len, len].
    #[arg(long, default_value_t = 1.0)]
    random_range_ratio: f64,
    #[arg(long, default_value_t = 1000)]
    num_prompts: usize,
    /// Requests per second, Poisson arrivals; `inf` sends every request at once.
    #[arg(long, default_value_t = f64::INFINITY)]
    request_rate: f64,
    /// Most requests in flight; unlimited when omitted.
    #[arg(long)]
    max_concurrency: Option<usize>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Requests sent (and awaited) before the measured run, excluded from the statistics.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Runtime threads; keep it small so the bench leaves the CPUs to the server.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Send random prompts to /v1/completions as token ids (`prompt: [ids]`) rather than text.
    #[arg(long)]
    prompt_ids: bool,
    /// Let outputs end at EOS instead of asking for `ignore_eos` (lengths then vary).
    #[arg(long)]
    disable_ignore_eos: bool,
    /// Longest wait for the next bytes of a response, in seconds.
    #[arg(long, default_value_t = 600.0)]
    read_timeout_s: f64,
}

/// One request of the workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The prompt as text (chat, text completions, JSONL).
    pub text: Option<String>,
    /// The prompt as token ids (random dataset).
    pub ids: Option<Vec<u32>>,
    /// Prompt length by our tokenizer; the server's `usage` overrides it when given.
    pub prompt_tokens: usize,
    pub output_len: usize,
}

/// What one request measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestRecord {
    pub error: Option<String>,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub ttft_s: f64,
    pub e2e_s: f64,
    /// Gaps between consecutive output events.
    pub itl_s: Vec<f64>,
}

impl RequestRecord {
    fn failed(error: String, prompt_tokens: usize) -> Self {
        Self {
            error: Some(error),
            prompt_tokens,
            ..Self::default()
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    if args.threads == 0 {
        return Err(BenchError::Usage("--threads must be at least 1"));
    }
    if args.max_concurrency == Some(0) {
        return Err(BenchError::Usage("--max-concurrency must be at least 1"));
    }
    if args.request_rate.is_nan() || args.request_rate <= 0.0 {
        return Err(BenchError::Usage(
            "--request-rate must be positive (inf for all at once)",
        ));
    }
    if !(0.0..=1.0).contains(&args.random_range_ratio) {
        return Err(BenchError::Usage("--random-range-ratio must be in [0, 1]"));
    }
    if !args.read_timeout_s.is_finite() || args.read_timeout_s <= 0.0 {
        return Err(BenchError::Usage(
            "--read-timeout-s must be a positive number of seconds",
        ));
    }
    let prompts = load_prompts(&args)?;
    if prompts.is_empty() {
        return Err(BenchError::Usage("the dataset has no prompts"));
    }
    let rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.threads);
        b
    }
    .enable_all()
    .build()
    .map_err(BenchError::Runtime)?;
    let summary = rt.block_on(bench(&args, prompts))?;
    let table = render_table(&summary);
    if args.json {
        eprint!("{table}");
        println!(
            "{}",
            serde_json::to_string(&summary).map_err(BenchError::Json)?
        );
    } else {
        print!("{table}");
    }
    if let Some(e) = &summary.first_error {
        eprintln!("first error: {e}");
    }
    if summary.completed == 0 {
        return Err(BenchError::AllFailed);
    }
    Ok(())
}

fn tokenizer() -> Result<TextTokenizer> {
    let tk = |e: &dyn std::fmt::Display| BenchError::Tokenizer(e.to_string());
    let (json, cfg) = duet_model::tiny::r1_tokenizer_files().map_err(|e| tk(&e))?;
    let cfg: serde_json::Value = serde_json::from_str(cfg).map_err(|e| tk(&e))?;
    TextTokenizer::from_bytes(
        &json,
        &cfg,
        std::path::Path::new("deepseek-r1-tokenizer.json"),
    )
    .map_err(|e| tk(&e))
}

fn load_prompts(args: &Args) -> Result<Vec<Prompt>> {
    let tok = tokenizer()?;
    match args.dataset {
        DatasetKind::Random => {
            let need_text = match args.endpoint {
                Endpoint::Chat => true,
                Endpoint::Completions => !args.prompt_ids,
                Endpoint::Generate => false,
            };
            random_prompts(args, need_text.then_some(&tok))
        }
        DatasetKind::Jsonl => {
            let path = args
                .dataset_path
                .as_ref()
                .ok_or(BenchError::Usage("--dataset jsonl needs --dataset-path"))?;
            let text = std::fs::read_to_string(path).map_err(|source| BenchError::Read {
                path: path.clone(),
                source,
            })?;
            let mut prompts = parse_jsonl(&text, args.random_output_len, args.num_prompts)
                .map_err(|(line, source)| BenchError::Dataset {
                    path: path.clone(),
                    line,
                    source,
                })?;
            for p in &mut prompts {
                let t = p.text.as_deref().unwrap_or_default();
                p.prompt_tokens = tok
                    .encode(t, false)
                    .map_err(|e| BenchError::Tokenizer(e.to_string()))?
                    .len();
            }
            if prompts.len() < args.num_prompts {
                eprintln!(
                    "note: {} has {} prompts, fewer than --num-prompts {}",
                    path.display(),
                    prompts.len(),
                    args.num_prompts
                );
            }
            Ok(prompts)
        }
    }
}

/// A uniform length in `[max(1, ⌊ratio × len⌋), len]`, as SGLang's random dataset draws it.
fn random_len(rng: &mut Rng, len: usize, ratio: f64) -> usize {
    let lo = ((len as f64 * ratio) as usize).clamp(1, len.max(1));
    let span = (len.max(1) - lo + 1) as u64;
    lo + (rng.next_u64() % span) as usize
}

/// Random prompts of ordinary token ids; decoded to text with `tok` when one is given.
fn random_prompts(args: &Args, tok: Option<&TextTokenizer>) -> Result<Vec<Prompt>> {
    let mut rng = Rng::new(args.seed);
    let ids_span = u64::from(RANDOM_TOKEN_IDS.end - RANDOM_TOKEN_IDS.start);
    (0..args.num_prompts)
        .map(|_| {
            let input_len = random_len(&mut rng, args.random_input_len, args.random_range_ratio);
            let output_len = random_len(&mut rng, args.random_output_len, args.random_range_ratio);
            let ids: Vec<u32> = (0..input_len)
                .map(|_| RANDOM_TOKEN_IDS.start + (rng.next_u64() % ids_span) as u32)
                .collect();
            let text = match tok {
                Some(t) => Some(
                    t.decode(&ids, true)
                        .map_err(|e| BenchError::Tokenizer(e.to_string()))?,
                ),
                None => None,
            };
            Ok(Prompt {
                text,
                ids: Some(ids),
                prompt_tokens: input_len,
                output_len,
            })
        })
        .collect()
}

/// Reads up to `limit` prompts from JSONL text (`prompt_tokens` left at 0 for the caller).
/// The prompts of a JSONL dataset; a bad line is `Err((line number, why))`.
fn parse_jsonl(
    text: &str,
    default_output_len: usize,
    limit: usize,
) -> Result<Vec<Prompt>, (usize, serde_json::Error)> {
    #[derive(Deserialize)]
    struct Line {
        prompt: String,
        output_len: Option<usize>,
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if out.len() == limit {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line).map_err(|e| (i + 1, e))?;
        out.push(Prompt {
            text: Some(l.prompt),
            ids: None,
            prompt_tokens: 0,
            output_len: l.output_len.unwrap_or(default_output_len).max(1),
        });
    }
    Ok(out)
}

/// The JSON body of one streaming request.
fn request_body(args: &Args, p: &Prompt) -> Vec<u8> {
    let ignore_eos = !args.disable_ignore_eos;
    let text = p.text.as_deref().unwrap_or_default();
    let body = match args.endpoint {
        Endpoint::Completions => {
            let prompt = match (&p.ids, args.prompt_ids || p.text.is_none()) {
                (Some(ids), true) => json!(ids),
                _ => json!(text),
            };
            json!({"model": args.model, "prompt": prompt, "max_tokens": p.output_len,
                "temperature": 0.0, "stream": true, "stream_options": {"include_usage": true},
                "ignore_eos": ignore_eos})
        }
        Endpoint::Chat => json!({"model": args.model,
            "messages": [{"role": "user", "content": text}], "max_tokens": p.output_len,
            "temperature": 0.0, "stream": true, "stream_options": {"include_usage": true},
            "ignore_eos": ignore_eos}),
        Endpoint::Generate => {
            let sampling = json!({"max_new_tokens": p.output_len, "temperature": 0.0,
                "ignore_eos": ignore_eos});
            match &p.ids {
                Some(ids) => json!({"input_ids": ids, "sampling_params": sampling, "stream": true}),
                None => json!({"text": text, "sampling_params": sampling, "stream": true}),
            }
        }
    };
    serde_json::to_vec(&body).expect("a JSON value always serialises")
}

/// Runs the warm-up and the measured workload against `args.base_url`.
pub async fn bench(args: &Args, prompts: Vec<Prompt>) -> Result<Summary> {
    let in_flight_max = args.max_concurrency.unwrap_or(prompts.len()).max(1);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(in_flight_max)
        .tcp_nodelay(true)
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(Duration::from_secs_f64(args.read_timeout_s))
        .build()
        .map_err(BenchError::Client)?;
    let url: Arc<str> = format!(
        "{}{}",
        args.base_url.trim_end_matches('/'),
        args.endpoint.path()
    )
    .into();
    // Bodies are built before the clock starts, so JSON encoding is not measured.
    let requests: Vec<(Vec<u8>, usize)> = prompts
        .iter()
        .map(|p| (request_body(args, p), p.prompt_tokens))
        .collect();
    let sem = Arc::new(tokio::sync::Semaphore::new(in_flight_max));

    if args.warmup > 0 {
        let warm: Vec<_> = requests.iter().cycle().take(args.warmup).cloned().collect();
        let (records, _) = send_all(&client, &url, args, warm, &sem, f64::INFINITY).await?;
        let failed: Vec<_> = records.iter().filter_map(|r| r.error.as_ref()).collect();
        if let Some(e) = failed.first() {
            eprintln!("warmup: {} of {} failed: {e}", failed.len(), records.len());
        }
    }
    let (records, duration_s) =
        send_all(&client, &url, args, requests, &sem, args.request_rate).await?;
    let mut summary = summarize(&records, duration_s);
    summary.endpoint = args.endpoint;
    summary.request_rate = args.request_rate.is_finite().then_some(args.request_rate);
    summary.max_concurrency = args.max_concurrency;
    Ok(summary)
}

/// Sends every request, arrivals Poisson at `rate` per second; returns the records in request
/// order and the wall time from the first send to the last completion.
async fn send_all(
    client: &reqwest::Client,
    url: &Arc<str>,
    args: &Args,
    requests: Vec<(Vec<u8>, usize)>,
    sem: &Arc<tokio::sync::Semaphore>,
    rate: f64,
) -> Result<(Vec<RequestRecord>, f64)> {
    let mut arrivals = Rng::new(args.seed ^ ARRIVAL_SEED_SALT);
    let start = tokio::time::Instant::now();
    let mut next_at = start;
    let mut tasks = Vec::with_capacity(requests.len());
    for (i, (body, prompt_tokens)) in requests.into_iter().enumerate() {
        if i > 0 && rate.is_finite() {
            // Exponential gaps: a Poisson process, as bench_serving's `np.random.exponential`.
            let gap_s = -(1.0 - arrivals.unit()).ln() / rate;
            next_at += Duration::from_secs_f64(gap_s);
            tokio::time::sleep_until(next_at).await;
        }
        let (client, url, sem) = (client.clone(), Arc::clone(url), Arc::clone(sem));
        let endpoint = args.endpoint;
        tasks.push(tokio::spawn(async move {
            // As in bench_serving, the clock of a request starts once it holds a slot.
            let Ok(_permit) = sem.acquire_owned().await else {
                return RequestRecord::failed("semaphore closed".into(), prompt_tokens);
            };
            send_one(&client, &url, endpoint, body, prompt_tokens).await
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.push(t.await.map_err(BenchError::Task)?);
    }
    Ok((records, start.elapsed().as_secs_f64()))
}

/// One streaming request, start to end of stream.
async fn send_one(
    client: &reqwest::Client,
    url: &str,
    endpoint: Endpoint,
    body: Vec<u8>,
    prompt_tokens: usize,
) -> RequestRecord {
    let start = Instant::now();
    let resp = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .body(body)
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return RequestRecord::failed(format!("request: {}", chain(&e)), prompt_tokens),
    };
    let status = resp.status();
    if status.as_u16() >= 400 {
        let detail = error_body(resp).await;
        return RequestRecord::failed(format!("HTTP {status}: {detail}"), prompt_tokens);
    }
    let mut track = StreamTrack::new(endpoint, prompt_tokens);
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    let mut stream = resp.bytes_stream();
    'read: while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return track.fail(format!("stream broke: {}", chain(&e))),
        };
        // Events of one network chunk arrived together: one clock read serves them all.
        let t_s = start.elapsed().as_secs_f64();
        if let Err(e) = parser.push_into(&chunk, &mut events) {
            return track.fail(format!("stream: {e}"));
        }
        for ev in events.drain(..) {
            if is_done(&ev) {
                break 'read;
            }
            if let Err(e) = track.on_event(&ev.data, t_s) {
                return track.fail(e);
            }
        }
    }
    track.finish(start.elapsed().as_secs_f64())
}

/// An error with its causes: reqwest's own message ("error sending request") names none.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(s, ": {c}");
        cause = c.source();
    }
    s
}

/// The first [`ERROR_BODY_BYTES_MAX`] bytes of an error response, read without buffering more.
async fn error_body(resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = ERROR_BODY_BYTES_MAX - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() == ERROR_BODY_BYTES_MAX {
            break;
        }
    }
    String::from_utf8_lossy(&body).trim().to_owned()
}

/// The fields of a streamed chunk the bench needs, from any of the three endpoints, read without
/// copying strings. Unknown fields are skipped.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: ChoicesOutput,
    #[serde(default)]
    usage: Option<Usage>,
    /// OpenAI-compatible servers report a failure mid-stream as `data: {"error": ...}`.
    #[serde(default)]
    error: Option<serde_json::Value>,
    /// `/generate`: the text so far.
    #[serde(default)]
    text: Option<NonEmpty>,
    /// `/generate`: token counts so far.
    #[serde(default)]
    meta_info: Option<Usage>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct Usage {
    prompt_tokens: Option<usize>,
    completion_tokens: Option<usize>,
}

/// Whether a JSON string is non-empty (`null` reads as empty).
#[derive(Default, Clone, Copy)]
struct NonEmpty(bool);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NonEmpty;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or null")
            }
            fn visit_str<E>(self, v: &str) -> Result<NonEmpty, E> {
                Ok(NonEmpty(!v.is_empty()))
            }
            fn visit_unit<E>(self) -> Result<NonEmpty, E> {
                Ok(NonEmpty(false))
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether any choice of a chunk carries output: completion `text`, or a chat delta's
/// `content`, `reasoning_content` or `tool_calls`.
#[derive(Default)]
struct ChoicesOutput(bool);

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    text: Option<NonEmpty>,
    #[serde(default)]
    delta: Option<Delta>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<NonEmpty>,
    #[serde(default)]
    reasoning_content: Option<NonEmpty>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
}

impl Choice {
    fn has_output(&self) -> bool {
        let some = |s: Option<NonEmpty>| s.is_some_and(|s| s.0);
        some(self.text)
            || self.delta.as_ref().is_some_and(|d| {
                some(d.content) || some(d.reasoning_content) || d.tool_calls.is_some()
            })
    }
}

impl<'de> Deserialize<'de> for ChoicesOutput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ChoicesOutput;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of choices")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ChoicesOutput, A::Error> {
                let mut any = false;
                while let Some(c) = seq.next_element::<Choice>()? {
                    any |= c.has_output();
                }
                Ok(ChoicesOutput(any))
            }
            fn visit_unit<E>(self) -> Result<ChoicesOutput, E> {
                Ok(ChoicesOutput(false))
            }
        }
        d.deserialize_any(V)
    }
}

/// The per-request measurement, fed one SSE event at a time with its arrival time.
struct StreamTrack {
    endpoint: Endpoint,
    record: RequestRecord,
    first_s: Option<f64>,
    last_s: f64,
    output_events: usize,
    usage: Usage,
}

impl StreamTrack {
    fn new(endpoint: Endpoint, prompt_tokens: usize) -> Self {
        Self {
            endpoint,
            record: RequestRecord {
                prompt_tokens,
                ..RequestRecord::default()
            },
            first_s: None,
            last_s: 0.0,
            output_events: 0,
            usage: Usage::default(),
        }
    }

    /// Reads one event's data at `t_s` seconds after the request was sent.
    fn on_event(&mut self, data: &str, t_s: f64) -> Result<(), String> {
        let chunk: Chunk = serde_json::from_str(data).map_err(|e| {
            let end = data.floor_char_boundary(ERROR_EVENT_BYTES_MAX);
            format!("unreadable event ({e}): {}", &data[..end])
        })?;
        if let Some(e) = chunk.error {
            return Err(format!("server error in stream: {e}"));
        }
        let output = match self.endpoint {
            Endpoint::Generate => match chunk.meta_info.and_then(|m| m.completion_tokens) {
                // Counts are cumulative; an event that adds none carries no output.
                Some(n) => n > self.usage.completion_tokens.unwrap_or(0),
                None => chunk.text.is_some_and(|t| t.0),
            },
            Endpoint::Chat | Endpoint::Completions => chunk.choices.0,
        };
        for u in [chunk.usage, chunk.meta_info].into_iter().flatten() {
            self.usage.prompt_tokens = u.prompt_tokens.or(self.usage.prompt_tokens);
            self.usage.completion_tokens = u.completion_tokens.or(self.usage.completion_tokens);
        }
        if output {
            match self.first_s {
                None => self.first_s = Some(t_s),
                Some(_) => self.record.itl_s.push(t_s - self.last_s),
            }
            self.last_s = t_s;
            self.output_events += 1;
        }
        Ok(())
    }

    fn fail(mut self, error: String) -> RequestRecord {
        self.record.error = Some(error);
        self.record.itl_s = Vec::new();
        self.record
    }

    fn finish(mut self, e2e_s: f64) -> RequestRecord {
        let Some(first_s) = self.first_s else {
            return self.fail("the stream carried no output".into());
        };
        let r = &mut self.record;
        r.ttft_s = first_s;
        r.e2e_s = e2e_s;
        r.output_tokens = self.usage.completion_tokens.unwrap_or(self.output_events);
        if let Some(n) = self.usage.prompt_tokens {
            r.prompt_tokens = n;
        }
        self.record
    }
}

/// The report, with stable snake_case keys for `--json`. Latencies are in ms; a statistic with
/// no samples is 0.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub endpoint: Endpoint,
    /// Requests per second asked for; `null` for `inf`.
    pub request_rate: Option<f64>,
    pub max_concurrency: Option<usize>,
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub input_throughput: f64,
    pub output_throughput: f64,
    pub total_throughput: f64,
    /// Mean requests in flight: total e2e time over the duration.
    pub concurrency: f64,
    pub mean_e2e_latency_ms: f64,
    pub median_e2e_latency_ms: f64,
    pub p99_e2e_latency_ms: f64,
    pub mean_ttft_ms: f64,
    pub median_ttft_ms: f64,
    pub p99_ttft_ms: f64,
    pub mean_tpot_ms: f64,
    pub median_tpot_ms: f64,
    pub p99_tpot_ms: f64,
    pub mean_itl_ms: f64,
    pub median_itl_ms: f64,
    pub p95_itl_ms: f64,
    pub p99_itl_ms: f64,
    pub max_itl_ms: f64,
    pub first_error: Option<String>,
}

/// The `p`-th percentile (0–100) of sorted samples, interpolating linearly between ranks as
/// numpy's default does; 0 for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted {
        [] => 0.0,
        [only] => *only,
        _ => {
            let rank = p.clamp(0.0, 100.0) / 100.0 * (sorted.len() - 1) as f64;
            let (lo, frac) = (rank.floor() as usize, rank.fract());
            let hi = (lo + 1).min(sorted.len() - 1);
            sorted[lo] + (sorted[hi] - sorted[lo]) * frac
        }
    }
}

/// Mean, median, p95, p99 and max in ms of samples in seconds.
fn stats_ms(mut s: Vec<f64>) -> [f64; 5] {
    s.sort_unstable_by(f64::total_cmp);
    let mean = if s.is_empty() {
        0.0
    } else {
        s.iter().sum::<f64>() / s.len() as f64
    };
    let max = s.last().copied().unwrap_or(0.0);
    [
        mean,
        percentile(&s, 50.0),
        percentile(&s, 95.0),
        percentile(&s, 99.0),
        max,
    ]
    .map(|v| v * 1e3)
}

/// The statistics of a run's records over its wall time.
pub fn summarize(records: &[RequestRecord], duration_s: f64) -> Summary {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.error.is_none()).collect();
    let total_input_tokens = ok.iter().map(|r| r.prompt_tokens).sum();
    let total_output_tokens = ok.iter().map(|r| r.output_tokens).sum();
    let per_s = |n: usize| {
        if duration_s > 0.0 {
            n as f64 / duration_s
        } else {
            0.0
        }
    };
    let e2e = stats_ms(ok.iter().map(|r| r.e2e_s).collect());
    let ttft = stats_ms(ok.iter().map(|r| r.ttft_s).collect());
    let tpot = stats_ms(
        ok.iter()
            .filter(|r| r.output_tokens > 1)
            .map(|r| (r.e2e_s - r.ttft_s) / (r.output_tokens - 1) as f64)
            .collect(),
    );
    let itl = stats_ms(ok.iter().flat_map(|r| r.itl_s.iter().copied()).collect());
    // `fold` from +0.0: `sum` of no floats is -0.0, which would print as "-0.00".
    let e2e_total_s = ok.iter().map(|r| r.e2e_s).fold(0.0, |a, b| a + b);
    Summary {
        endpoint: Endpoint::Completions,
        request_rate: None,
        max_concurrency: None,
        completed: ok.len(),
        failed: records.len() - ok.len(),
        duration_s,
        total_input_tokens,
        total_output_tokens,
        request_throughput: per_s(ok.len()),
        input_throughput: per_s(total_input_tokens),
        output_throughput: per_s(total_output_tokens),
        total_throughput: per_s(total_input_tokens + total_output_tokens),
        concurrency: if duration_s > 0.0 {
            e2e_total_s / duration_s
        } else {
            0.0
        },
        mean_e2e_latency_ms: e2e[0],
        median_e2e_latency_ms: e2e[1],
        p99_e2e_latency_ms: e2e[3],
        mean_ttft_ms: ttft[0],
        median_ttft_ms: ttft[1],
        p99_ttft_ms: ttft[3],
        mean_tpot_ms: tpot[0],
        median_tpot_ms: tpot[1],
        p99_tpot_ms: tpot[3],
        mean_itl_ms: itl[0],
        median_itl_ms: itl[1],
        p95_itl_ms: itl[2],
        p99_itl_ms: itl[3],
        max_itl_ms: itl[4],
        first_error: records.iter().find_map(|r| r.error.clone()),
    }
}

/// The summary as bench_serving prints it: 50 columns, labels padded to 40.
pub fn render_table(s: &Summary) -> String {
    let mut out = String::new();
    // Python's `"{:=^50}".format(t)`: the odd pad column goes to the right.
    let title = |out: &mut String, t: &str, fill: char| {
        let pad = 50usize.saturating_sub(t.chars().count());
        let side = |n: usize| fill.to_string().repeat(n);
        let _ = writeln!(out, "{}{t}{}", side(pad / 2), side(pad - pad / 2));
    };
    let row = |out: &mut String, k: &str, v: String| {
        let _ = writeln!(out, "{k:<40} {v:<10}");
    };
    let f2 = |v: f64| format!("{v:.2}");
    title(&mut out, " Serving Benchmark Result ", '=');
    row(
        &mut out,
        "Endpoint:",
        format!("{:?}", s.endpoint).to_lowercase(),
    );
    row(
        &mut out,
        "Traffic request rate:",
        s.request_rate.map_or("inf".into(), f2),
    );
    row(
        &mut out,
        "Max request concurrency:",
        s.max_concurrency
            .map_or("not set".into(), |c| c.to_string()),
    );
    row(&mut out, "Successful requests:", s.completed.to_string());
    row(&mut out, "Failed requests:", s.failed.to_string());
    row(&mut out, "Benchmark duration (s):", f2(s.duration_s));
    row(
        &mut out,
        "Total input tokens:",
        s.total_input_tokens.to_string(),
    );
    row(
        &mut out,
        "Total generated tokens:",
        s.total_output_tokens.to_string(),
    );
    row(
        &mut out,
        "Request throughput (req/s):",
        f2(s.request_throughput),
    );
    row(
        &mut out,
        "Input token throughput (tok/s):",
        f2(s.input_throughput),
    );
    row(
        &mut out,
        "Output token throughput (tok/s):",
        f2(s.output_throughput),
    );
    row(
        &mut out,
        "Total token throughput (tok/s):",
        f2(s.total_throughput),
    );
    row(&mut out, "Concurrency:", f2(s.concurrency));
    title(&mut out, "End-to-End Latency", '-');
    row(
        &mut out,
        "Mean E2E Latency (ms):",
        f2(s.mean_e2e_latency_ms),
    );
    row(
        &mut out,
        "Median E2E Latency (ms):",
        f2(s.median_e2e_latency_ms),
    );
    row(&mut out, "P99 E2E Latency (ms):", f2(s.p99_e2e_latency_ms));
    title(&mut out, "Time to First Token", '-');
    row(&mut out, "Mean TTFT (ms):", f2(s.mean_ttft_ms));
    row(&mut out, "Median TTFT (ms):", f2(s.median_ttft_ms));
    row(&mut out, "P99 TTFT (ms):", f2(s.p99_ttft_ms));
    title(&mut out, "Time per Output Token (excl. 1st token)", '-');
    row(&mut out, "Mean TPOT (ms):", f2(s.mean_tpot_ms));
    row(&mut out, "Median TPOT (ms):", f2(s.median_tpot_ms));
    row(&mut out, "P99 TPOT (ms):", f2(s.p99_tpot_ms));
    title(&mut out, "Inter-Token Latency", '-');
    row(&mut out, "Mean ITL (ms):", f2(s.mean_itl_ms));
    row(&mut out, "Median ITL (ms):", f2(s.median_itl_ms));
    row(&mut out, "P95 ITL (ms):", f2(s.p95_itl_ms));
    row(&mut out, "P99 ITL (ms):", f2(s.p99_itl_ms));
    row(&mut out, "Max ITL (ms):", f2(s.max_itl_ms));
    title(&mut out, "", '=');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(flags: &[&str]) -> Args {
        Cli::parse_from(std::iter::once("bench").chain(flags.iter().copied())).args
    }

    fn ok(prompt_tokens: usize, output_tokens: usize, ttft_s: f64, e2e_s: f64) -> RequestRecord {
        RequestRecord {
            error: None,
            prompt_tokens,
            output_tokens,
            ttft_s,
            e2e_s,
            itl_s: vec![(e2e_s - ttft_s) / (output_tokens - 1) as f64; output_tokens - 1],
        }
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        // numpy.percentile([1, 2, 3, 4], [50, 99, 0, 100]) == [2.5, 3.97, 1, 4]
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&s, 50.0), 2.5);
        assert!((percentile(&s, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&s, 0.0), 1.0);
        assert_eq!(percentile(&s, 100.0), 4.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn summary_statistics() {
        let records = vec![
            ok(100, 11, 0.1, 1.1),
            ok(200, 21, 0.3, 2.3),
            RequestRecord::failed("HTTP 500: boom".into(), 50),
            ok(300, 1, 0.2, 0.2),
        ];
        let s = summarize(&records, 4.0);
        assert_eq!((s.completed, s.failed), (3, 1));
        assert_eq!(s.total_input_tokens, 600);
        assert_eq!(s.total_output_tokens, 33);
        assert_eq!(s.request_throughput, 0.75);
        assert_eq!(s.input_throughput, 150.0);
        assert_eq!(s.output_throughput, 8.25);
        assert_eq!(s.total_throughput, 158.25);
        assert!((s.concurrency - 3.6 / 4.0).abs() < 1e-12);
        // TPOT is 100 ms for both multi-token requests; the one-token request has none.
        assert!((s.mean_tpot_ms - 100.0).abs() < 1e-9);
        assert!((s.p99_tpot_ms - 100.0).abs() < 1e-9);
        assert!((s.median_ttft_ms - 200.0).abs() < 1e-9);
        assert!((s.mean_e2e_latency_ms - 1200.0).abs() < 1e-9);
        assert!((s.mean_itl_ms - 100.0).abs() < 1e-9);
        assert!((s.max_itl_ms - 100.0).abs() < 1e-9);
        assert_eq!(s.first_error.as_deref(), Some("HTTP 500: boom"));
        let none = summarize(&[], 0.0);
        assert_eq!(
            (none.completed, none.request_throughput, none.mean_ttft_ms),
            (0, 0.0, 0.0)
        );
    }

    #[test]
    fn json_keys_are_stable() {
        let s = summarize(&[ok(10, 5, 0.01, 0.05)], 1.0);
        let v = serde_json::to_value(&s).unwrap();
        for k in [
            "request_throughput",
            "input_throughput",
            "output_throughput",
            "completed",
            "failed",
            "duration_s",
            "total_input_tokens",
            "total_output_tokens",
            "mean_ttft_ms",
            "median_ttft_ms",
            "p99_ttft_ms",
            "mean_tpot_ms",
            "median_tpot_ms",
            "p99_tpot_ms",
            "mean_itl_ms",
            "median_itl_ms",
            "p99_itl_ms",
            "mean_e2e_latency_ms",
            "median_e2e_latency_ms",
            "p99_e2e_latency_ms",
        ] {
            assert!(v[k].is_number(), "{k}");
        }
        assert_eq!(v["endpoint"], "completions");
        assert!(v["request_rate"].is_null());
    }

    #[test]
    fn table_layout() {
        let t = render_table(&summarize(&[ok(10, 5, 0.01, 0.05)], 1.0));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "============ Serving Benchmark Result ============"
        );
        assert_eq!(*lines.last().unwrap(), "=".repeat(50));
        assert!(t.contains("\nSuccessful requests:                     1         \n"));
        assert!(t.contains("\nMedian TTFT (ms):                        10.00     \n"));
        assert!(t.contains("\nMax request concurrency:                 not set   \n"));
        assert!(
            lines
                .iter()
                .filter(|l| l.starts_with('-'))
                .all(|l| l.chars().count() == 50)
        );
    }

    #[test]
    fn track_completions_chunks() {
        let mut t = StreamTrack::new(Endpoint::Completions, 5);
        let c = |text: &str| json!({"choices": [{"index": 0, "text": text}]}).to_string();
        t.on_event(&c("a\n\"é"), 0.5).unwrap();
        t.on_event(&c(""), 0.6).unwrap(); // held back by the detokenizer: no output
        t.on_event(&c("🐳"), 0.7).unwrap();
        t.on_event(&c("c"), 1.0).unwrap();
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}});
        t.on_event(&usage.to_string(), 1.0).unwrap();
        let r = t.finish(1.25);
        assert_eq!(r.error, None);
        assert_eq!((r.ttft_s, r.e2e_s), (0.5, 1.25));
        assert_eq!((r.prompt_tokens, r.output_tokens), (9, 4));
        assert_eq!(r.itl_s.len(), 2);
        assert!((r.itl_s[0] - 0.2).abs() < 1e-12 && (r.itl_s[1] - 0.3).abs() < 1e-12);
    }

    #[test]
    fn track_chat_and_fallback_count() {
        let mut t = StreamTrack::new(Endpoint::Chat, 5);
        let d = |delta: serde_json::Value| json!({"choices": [{"delta": delta}]}).to_string();
        t.on_event(&d(json!({"role": "assistant", "content": ""})), 0.1)
            .unwrap();
        t.on_event(&d(json!({"reasoning_content": "hm"})), 0.2)
            .unwrap();
        t.on_event(
            &d(json!({"content": null, "tool_calls": [{"index": 0}]})),
            0.3,
        )
        .unwrap();
        t.on_event(&d(json!({"content": "x"})), 0.4).unwrap();
        let r = t.finish(0.5);
        // No usage: one token per output event, and our own prompt count stays.
        assert_eq!((r.prompt_tokens, r.output_tokens), (5, 3));
        assert_eq!(r.ttft_s, 0.2);
    }

    #[test]
    fn track_generate_cumulative_meta_info() {
        let mut t = StreamTrack::new(Endpoint::Generate, 5);
        let g = |text: &str, n: usize| {
            json!({"text": text, "output_ids": [1], "meta_info": {"prompt_tokens": 6,
                "completion_tokens": n, "finish_reason": null}})
            .to_string()
        };
        t.on_event(&g("", 1), 0.1).unwrap(); // a token whose text is not complete yet
        t.on_event(&g("ab", 2), 0.2).unwrap();
        t.on_event(&g("ab", 2), 0.25).unwrap(); // a repeat that adds nothing
        t.on_event(&g("abc", 3), 0.3).unwrap();
        let r = t.finish(0.3);
        assert_eq!((r.prompt_tokens, r.output_tokens, r.itl_s.len()), (6, 3, 2));
        assert_eq!(r.ttft_s, 0.1);
    }

    #[test]
    fn track_errors() {
        let mut t = StreamTrack::new(Endpoint::Completions, 5);
        let e = t
            .on_event(r#"{"error": {"message": "overloaded"}}"#, 0.1)
            .unwrap_err();
        assert!(e.contains("overloaded"), "{e}");
        let long = "x".repeat(1000) + "é";
        assert!(t.on_event(&long, 0.1).unwrap_err().len() < 400);
        let r = StreamTrack::new(Endpoint::Completions, 5).finish(1.0);
        assert_eq!(r.error.as_deref(), Some("the stream carried no output"));
    }

    #[test]
    fn random_dataset_lengths_and_ids() {
        let a = args(&[
            "--num-prompts",
            "200",
            "--random-input-len",
            "64",
            "--random-output-len",
            "16",
            "--random-range-ratio",
            "0.5",
            "--seed",
            "3",
        ]);
        let ps = random_prompts(&a, None).unwrap();
        assert_eq!(ps.len(), 200);
        for p in &ps {
            let ids = p.ids.as_ref().unwrap();
            assert!((32..=64).contains(&ids.len()) && ids.len() == p.prompt_tokens);
            assert!((8..=16).contains(&p.output_len));
            assert!(ids.iter().all(|i| RANDOM_TOKEN_IDS.contains(i)));
        }
        assert!(
            ps.iter().any(|p| p.prompt_tokens == 32) && ps.iter().any(|p| p.prompt_tokens == 64)
        );
        assert_eq!(ps, random_prompts(&a, None).unwrap(), "seeded");
        let mut rng = Rng::new(0);
        assert_eq!(random_len(&mut rng, 0, 1.0), 1);
        assert_eq!(random_len(&mut rng, 10, 1.0), 10);
    }

    #[test]
    fn random_prompts_decode_with_the_r1_tokenizer() {
        let a = args(&["--num-prompts", "3", "--random-input-len", "32"]);
        let tok = tokenizer().unwrap();
        let ps = random_prompts(&a, Some(&tok)).unwrap();
        assert!(ps.iter().all(|p| !p.text.as_ref().unwrap().is_empty()));
    }

    #[test]
    fn jsonl_dataset() {
        let text = "{\"prompt\": \"hi\", \"output_len\": 7}\n\n{\"prompt\": \"yo\"}\n{\"prompt\": \"x\"}\n";
        let ps = parse_jsonl(text, 128, 2).unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!((ps[0].text.as_deref(), ps[0].output_len), (Some("hi"), 7));
        assert_eq!(ps[1].output_len, 128);
        let (line, _) = parse_jsonl("{\"prompt\": 1}\n\n{\"prompt\": 2}\n", 1, 9).unwrap_err();
        assert_eq!(line, 1);
        let (line, _) = parse_jsonl("{\"prompt\": \"a\"}\n\n{\"prompt\": 2}\n", 1, 9).unwrap_err();
        assert_eq!(line, 3);
    }

    #[test]
    fn request_bodies() {
        let p = Prompt {
            text: Some("hello".into()),
            ids: Some(vec![5, 6]),
            prompt_tokens: 2,
            output_len: 9,
        };
        let body = |flags: &[&str]| -> serde_json::Value {
            serde_json::from_slice(&request_body(&args(flags), &p)).unwrap()
        };
        let c = body(&[]);
        assert_eq!(c["prompt"], "hello");
        assert_eq!(
            (c["max_tokens"].as_u64(), c["ignore_eos"].as_bool()),
            (Some(9), Some(true))
        );
        assert_eq!(c["stream_options"]["include_usage"], json!(true));
        assert_eq!(body(&["--prompt-ids"])["prompt"], json!([5, 6]));
        let chat = body(&["--endpoint", "chat", "--model", "m"]);
        assert_eq!(chat["messages"][0]["content"], "hello");
        assert_eq!(chat["model"], "m");
        let g = body(&["--endpoint", "generate", "--disable-ignore-eos"]);
        assert_eq!(g["input_ids"], json!([5, 6]));
        assert_eq!(g["sampling_params"]["max_new_tokens"], 9);
        assert_eq!(g["sampling_params"]["ignore_eos"], json!(false));
    }

    #[test]
    fn flag_defaults() {
        let a = args(&[]);
        assert_eq!(a.base_url, "http://127.0.0.1:9965");
        assert_eq!(a.endpoint, Endpoint::Completions);
        assert!(a.request_rate.is_infinite());
        assert_eq!(
            (a.threads, a.num_prompts, a.max_concurrency),
            (1, 1000, None)
        );
        assert_eq!(args(&["--request-rate", "2.5"]).request_rate, 2.5);
        assert_eq!(
            args(&["--dataset-name", "random"]).dataset,
            DatasetKind::Random
        );
    }

    mod server {
        //! A fake OpenAI/SGLang server streaming `max_tokens` one-token chunks, 1 ms apart.
        use std::sync::atomic::{AtomicUsize, Ordering};

        use axum::Json;
        use axum::body::Body;
        use axum::extract::State;
        use axum::http::StatusCode;
        use axum::response::{IntoResponse, Response};
        use axum::routing::post;
        use serde_json::{Value, json};

        use super::*;

        pub const TOKEN_GAP: Duration = Duration::from_millis(1);
        pub const PROMPT_TOKENS: usize = 17;
        const PIECES: [&str; 4] = ["é", "🐳", "\n", "a"];

        #[derive(Default)]
        pub struct Faults {
            /// Every n-th request (1-based) gets HTTP 500; 0 never.
            pub fail_every: usize,
            /// Requests whose body stream breaks after this many events.
            pub break_after: Option<usize>,
        }

        struct Shared {
            faults: Faults,
            seen: AtomicUsize,
        }

        type St = Arc<Shared>;

        pub async fn start(faults: Faults) -> String {
            let shared = Arc::new(Shared {
                faults,
                seen: AtomicUsize::new(0),
            });
            let app = axum::Router::new()
                .route(
                    "/v1/completions",
                    post(|s: State<St>, b: Json<Value>| serve(s, b, Endpoint::Completions)),
                )
                .route(
                    "/v1/chat/completions",
                    post(|s: State<St>, b: Json<Value>| serve(s, b, Endpoint::Chat)),
                )
                .route(
                    "/generate",
                    post(|s: State<St>, b: Json<Value>| serve(s, b, Endpoint::Generate)),
                )
                .with_state(shared);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            // Without TCP_NODELAY, Nagle's algorithm holds each small event until the client's
            // delayed ACK (~40 ms), and every token would arrive late.
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            tokio::spawn(async move { axum::serve(listener, app).await });
            format!("http://{addr}")
        }

        fn event(endpoint: Endpoint, i: usize) -> Value {
            let piece = PIECES[i % PIECES.len()];
            match endpoint {
                Endpoint::Completions => json!({"id": "cmpl-1", "object": "text_completion",
                    "choices": [{"index": 0, "text": piece, "logprobs": null,
                    "finish_reason": null}]}),
                Endpoint::Chat => json!({"id": "chat-1", "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": piece},
                    "finish_reason": null}]}),
                Endpoint::Generate => json!({"text": "x".repeat(i + 1), "output_ids": [i],
                    "meta_info": {"prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": i + 1}}),
            }
        }

        async fn serve(
            State(st): State<St>,
            Json(body): Json<Value>,
            endpoint: Endpoint,
        ) -> Response {
            let n = st.seen.fetch_add(1, Ordering::Relaxed) + 1;
            if st.faults.fail_every > 0 && n % st.faults.fail_every == 0 {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "{\"error\": \"injected\"}",
                )
                    .into_response();
            }
            let max_tokens = body["max_tokens"]
                .as_u64()
                .or(body["sampling_params"]["max_new_tokens"].as_u64())
                .unwrap_or(1) as usize;
            let break_after = st.faults.break_after;
            let mut frames: Vec<Result<Vec<u8>, std::io::Error>> = Vec::new();
            if endpoint == Endpoint::Chat {
                let role = json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]});
                frames.push(Ok(format!("data: {role}\n\n").into_bytes()));
            }
            for i in 0..max_tokens {
                if break_after == Some(i) {
                    frames.push(Err(std::io::Error::other("injected break")));
                    break;
                }
                let bytes = format!("data: {}\r\n\r\n", event(endpoint, i)).into_bytes();
                // Two frames, cut inside the JSON (often inside a multi-byte character).
                let cut = bytes.len() / 2 + 1;
                frames.push(Ok(bytes[..cut].to_vec()));
                frames.push(Ok(bytes[cut..].to_vec()));
            }
            if endpoint != Endpoint::Generate {
                let usage = json!({"choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": max_tokens, "total_tokens": PROMPT_TOKENS + max_tokens}});
                frames.push(Ok(format!(": keep-alive\ndata: {usage}\n\n").into_bytes()));
            }
            frames.push(Ok(b"data: [DONE]\n\n".to_vec()));
            // A pause before each event's first frame spaces the tokens out.
            let stream = futures::stream::iter(frames).then(|f| async move {
                if f.as_ref()
                    .is_ok_and(|b| b.starts_with(b"data: {") || b.starts_with(b": "))
                {
                    tokio::time::sleep(TOKEN_GAP).await;
                }
                f
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }
    }

    fn prompts(n: usize, output_len: usize) -> Vec<Prompt> {
        (0..n)
            .map(|i| Prompt {
                text: Some(format!("prompt {i}")),
                ids: Some(vec![3 + i as u32; 4]),
                prompt_tokens: 4,
                output_len,
            })
            .collect()
    }

    #[tokio::test]
    async fn bench_against_a_fake_server() {
        for endpoint in ["completions", "chat", "generate"] {
            let url = server::start(server::Faults::default()).await;
            let a = args(&[
                "--base-url",
                &url,
                "--endpoint",
                endpoint,
                "--max-concurrency",
                "4",
                "--warmup",
                "2",
            ]);
            let s = bench(&a, prompts(12, 8)).await.unwrap();
            assert_eq!(
                (s.completed, s.failed),
                (12, 0),
                "{endpoint}: {:?}",
                s.first_error
            );
            assert_eq!(s.total_output_tokens, 12 * 8, "{endpoint}");
            assert_eq!(
                s.total_input_tokens,
                12 * server::PROMPT_TOKENS,
                "{endpoint}"
            );
            let gap_ms = server::TOKEN_GAP.as_secs_f64() * 1e3;
            // The server sleeps at least TOKEN_GAP before each token, so per-request means
            // cannot fall below it; single gaps can (a delayed chunk lands with the next).
            assert!(s.mean_tpot_ms >= gap_ms, "{endpoint}: {s:?}");
            assert!(s.mean_itl_ms >= gap_ms * 0.9, "{endpoint}: {s:?}");
            assert!(s.median_ttft_ms >= gap_ms && s.median_ttft_ms <= s.p99_ttft_ms);
            assert!(s.median_itl_ms <= s.p99_itl_ms && s.p99_itl_ms <= s.max_itl_ms);
            // Each request's TTFT is at most its e2e latency, so every percentile is too (an
            // invariant of the summary, not a timing relation).
            assert!(s.p99_ttft_ms <= s.p99_e2e_latency_ms, "{endpoint}: {s:?}");
            assert!(s.mean_e2e_latency_ms >= 8.0 * gap_ms);
            assert!(s.output_throughput > 0.0 && s.request_throughput > 0.0);
            assert!(s.concurrency <= 4.0 + 1e-9, "{s:?}");
        }
    }

    #[tokio::test]
    async fn failures_are_counted() {
        let url = server::start(server::Faults {
            fail_every: 3,
            break_after: None,
        })
        .await;
        let a = args(&[
            "--base-url",
            &url,
            "--warmup",
            "0",
            "--request-rate",
            "1000",
        ]);
        let s = bench(&a, prompts(9, 4)).await.unwrap();
        assert_eq!((s.completed, s.failed), (6, 3));
        assert_eq!(s.total_output_tokens, 6 * 4);
        let e = s.first_error.unwrap();
        assert!(e.starts_with("HTTP 500") && e.contains("injected"), "{e}");

        let url = server::start(server::Faults {
            fail_every: 0,
            break_after: Some(2),
        })
        .await;
        let a = args(&["--base-url", &url, "--warmup", "0"]);
        let s = bench(&a, prompts(3, 4)).await.unwrap();
        assert_eq!((s.completed, s.failed), (0, 3));
        assert!(s.first_error.unwrap().contains("stream broke"));

        // Nothing listens on a port that was just freed.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        let s = bench(&args(&["--base-url", &url, "--warmup", "0"]), prompts(2, 4))
            .await
            .unwrap();
        assert_eq!((s.completed, s.failed), (0, 2));
        assert!(s.first_error.unwrap().to_lowercase().contains("refused"));
        assert_eq!(s.concurrency.to_string(), "0", "not -0");
    }
}
