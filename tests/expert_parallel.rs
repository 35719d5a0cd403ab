//! Expert parallelism in the engine: an EP group's ranks each load only their shard of the
//! routed experts, run their own batches, and reach the other experts through the all-to-all —
//! and give the logits of one rank holding every expert.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use duet_actors::ep::A2aExchange;
use duet_core::ep::ExpertMap;
use duet_model::kv::KvCache;
use duet_model::{DType, EpRank, LogitsMode, Model, SeqInput};
use duet_transport::a2a::{AllToAll, InProcA2a, QuicA2a};
use duet_transport::quic::ClusterSecret;
use serde_json::{Value, json};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/fixtures/v3-tiny")
}

const PROMPTS: [&[u32]; 3] = [&[5, 9, 77, 3, 301, 42], &[8, 8, 120], &[400, 2, 19, 55, 7]];
/// Prefill, then this many decode steps of greedy tokens.
const DECODE_STEPS: usize = 3;

/// Runs `prompts` on one model: prefill then greedy decode, the last-position logits of every
/// step, per prompt. An EP rank with no prompts takes part in the same number of steps idle.
fn run(model: &Model, prompts: &[&[u32]]) -> Vec<Vec<Vec<f32>>> {
    let steps = 1 + DECODE_STEPS;
    if prompts.is_empty() {
        for _ in 0..steps {
            model.ep_idle_step().unwrap();
        }
        return Vec::new();
    }
    let mut cache: KvCache = model.new_cache(16);
    let mut toks: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let mut tables: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut out = vec![Vec::new(); prompts.len()];
    let vocab = model.config.vocab_size;
    for step in 0..steps {
        for (t, bt) in toks.iter().zip(&mut tables) {
            cache.ensure(bt, t.len()).unwrap();
        }
        let batch: Vec<SeqInput<'_>> = toks
            .iter()
            .zip(&tables)
            .map(|(t, bt)| {
                let start = if step == 0 { 0 } else { t.len() - 1 };
                SeqInput {
                    tokens: &t[start..],
                    start_pos: start,
                    block_table: bt,
                }
            })
            .collect();
        let logits = model
            .forward(&mut cache, &batch, LogitsMode::Last)
            .unwrap()
            .to_vec_f32();
        for (i, t) in toks.iter_mut().enumerate() {
            let row = logits[i * vocab..(i + 1) * vocab].to_vec();
            t.push(duet_model::sampling::argmax(&row));
            out[i].push(row);
        }
    }
    out
}

/// The EP group's logits per prompt (prompt `i` on rank `i % ranks`).
fn run_group(
    ranks: usize,
    a2a: Vec<Arc<dyn AllToAll>>,
    rt: &tokio::runtime::Runtime,
) -> Vec<Vec<Vec<f32>>> {
    let threads: Vec<_> = a2a
        .into_iter()
        .enumerate()
        .map(|(me, a)| {
            let handle = rt.handle().clone();
            std::thread::spawn(move || {
                let ep = EpRank {
                    me,
                    map: ExpertMap::static_sharding(16, ranks).unwrap(),
                    exchange: Arc::new(A2aExchange::new(a, handle)),
                };
                let model = Model::load_ep_rank(&fixture(), DType::F32, &|_| {}, ep).unwrap();
                let mine: Vec<usize> = (0..PROMPTS.len()).filter(|i| i % ranks == me).collect();
                let prompts: Vec<&[u32]> = mine.iter().map(|&i| PROMPTS[i]).collect();
                (mine, run(&model, &prompts), model.weight_bytes())
            })
        })
        .collect();
    let mut out = vec![Vec::new(); PROMPTS.len()];
    let mut shard_bytes = Vec::new();
    for t in threads {
        let (mine, logits, bytes) = t.join().unwrap();
        shard_bytes.push(bytes);
        for (i, l) in mine.into_iter().zip(logits) {
            out[i] = l;
        }
    }
    // Each rank holds only its shard: fewer weight bytes than one rank holding all.
    if ranks > 1 {
        let full = Model::load(&fixture(), DType::F32, &|_| {})
            .unwrap()
            .weight_bytes();
        assert!(
            shard_bytes.iter().all(|&b| b < full),
            "{shard_bytes:?} vs {full}"
        );
    }
    out
}

fn assert_same(reference: &[Vec<Vec<f32>>], got: &[Vec<Vec<f32>>], what: &str) {
    for (p, (a, b)) in reference.iter().zip(got).enumerate() {
        assert_eq!(a.len(), b.len(), "{what}: prompt {p} steps");
        for (s, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(
                duet_model::sampling::argmax(x),
                duet_model::sampling::argmax(y),
                "{what}: prompt {p} step {s} greedy token"
            );
            // The same kernels on the same rows, summed in the same order: bit-identical.
            let diff = x.iter().zip(y).fold(0f32, |m, (u, v)| m.max((u - v).abs()));
            assert!(
                diff == 0.0,
                "{what}: prompt {p} step {s}: logits differ by {diff}"
            );
        }
    }
}

/// Each prompt alone on one model holding every expert, and a runtime for the exchanges.
fn reference() -> (Vec<Vec<Vec<f32>>>, tokio::runtime::Runtime) {
    let full = Model::load(&fixture(), DType::F32, &|_| {}).unwrap();
    let reference = PROMPTS.iter().map(|p| run(&full, &[p]).remove(0)).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    (reference, rt)
}

#[test]
fn ep_groups_of_1_2_and_4_ranks_in_one_process_give_the_single_rank_logits() {
    let (reference, rt) = reference();
    // With 4 ranks and 3 prompts, rank 3 is idle and still serves its experts.
    for ranks in [1, 2, 4] {
        let group: Vec<Arc<dyn AllToAll>> = InProcA2a::group(ranks)
            .unwrap()
            .into_iter()
            .map(|a| Arc::new(a) as Arc<dyn AllToAll>)
            .collect();
        let got = run_group(ranks, group, &rt);
        assert_same(&reference, &got, &format!("EP{ranks} in process"));
    }
}

#[test]
fn an_ep_group_over_quic_gives_the_single_rank_logits() {
    let (reference, rt) = reference();
    let ranks = 2;
    let group: Vec<Arc<dyn AllToAll>> = rt.block_on(async {
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let secret = ClusterSecret::new(b"an expert-parallel test secret!!").unwrap();
        let g: Vec<QuicA2a> = (0..ranks)
            .map(|r| QuicA2a::bind(r, ranks, local, secret.clone()).unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = g.iter().map(|r| r.local_addr().unwrap()).collect();
        for r in &g {
            r.connect(&addrs).await.unwrap();
        }
        g.into_iter()
            .map(|r| Arc::new(r) as Arc<dyn AllToAll>)
            .collect()
    });
    let got = run_group(ranks, group, &rt);
    assert_same(&reference, &got, "EP2 over QUIC");
}

/// `duet serve --ep N` as a user runs it: the same greedy text as without EP, with requests
/// spread over the ranks (some busy, some idle in a step) and every rank a DP rank of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duet_serve_with_ep_2_and_4_serves_the_ep_1_greedy_text() {
    let prompts: Vec<String> = (0..6)
        .map(|i| format!("Request {i} counts {}", "and more ".repeat(i * 3)))
        .collect();
    let texts = |url: String| {
        let prompts = prompts.clone();
        async move {
            let runs = prompts.iter().map(|p| {
                let url = url.clone();
                let body =
                    json!({"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
                async move { common::post(&url, &body).await }
            });
            futures::future::join_all(runs)
                .await
                .into_iter()
                .map(|(status, v)| {
                    assert_eq!(status, 200, "{v}");
                    v["choices"][0]["text"].as_str().unwrap().to_string()
                })
                .collect::<Vec<String>>()
        }
    };
    let one = common::Server::start(&["--dtype", "f32"]);
    let reference = texts(one.url("/v1/completions")).await;
    for ep in ["2", "4"] {
        let srv = common::Server::start(&["--dtype", "f32", "--ep", ep]);
        let got = texts(srv.url("/v1/completions")).await;
        assert_eq!(got, reference, "--ep {ep}");
        let n: usize = ep.parse().unwrap();
        let (status, h) = common::get(&srv.url("/health")).await;
        assert_eq!(status, 200);
        let h: Value = serde_json::from_str(&h).unwrap();
        assert_eq!(
            (h["prefill_workers"].as_u64(), h["decode_groups"].as_u64()),
            (Some(n as u64), Some(2 * n as u64)),
            "one prefill EP group and two decode EP groups of {n} ranks"
        );
    }
}

/// An EP size that does not divide the routed experts is refused at start with the reason.
#[test]
fn an_ep_size_that_does_not_divide_the_experts_is_refused() {
    let mut p = common::Proc::spawn(&["serve", "--port", "0", "--ep", "3"]);
    let status = p.wait_exit(std::time::Duration::from_secs(120));
    let err = p.log();
    assert!(status.is_some_and(|s| !s.success()), "{status:?} {err}");
    assert!(
        err.contains("16 routed experts do not split evenly over 3 ranks")
            && !err.contains("panicked"),
        "{err}"
    );
}
