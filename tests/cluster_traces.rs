//! One OpenTelemetry trace per request across the gateway, prefill and decode processes: an OTLP
//! receiver in this test decodes the real OTLP/HTTP protobuf export of a 3-process cluster and
//! checks that each request's spans form one connected trace spanning the three services, that
//! an incoming `traceparent` is honoured, that decode steps link to the sequences they serve, and
//! that a re-run after a decode process is SIGKILLed stays in its request's trace.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use common::cluster::Cluster;
use common::{client, eventually, get};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use serde_json::{Value, json};

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    trace: [u8; 16],
    id: [u8; 8],
    parent: Option<[u8; 8]>,
    name: String,
    attrs: BTreeMap<String, String>,
    links: Vec<([u8; 16], [u8; 8])>,
    events: Vec<String>,
}

type Spans = Arc<Mutex<Vec<Got>>>;

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kv: &[KeyValue]) -> BTreeMap<String, String> {
    kv.iter().map(|a| (a.key.clone(), text(&a.value))).collect()
}

fn id<const N: usize>(b: &[u8]) -> [u8; N] {
    b.try_into().expect("an OTLP id of the right length")
}

/// Decodes one OTLP/HTTP export (`POST /v1/traces`, application/x-protobuf).
fn receive(spans: &Spans, body: &[u8]) -> Result<(), String> {
    let req = ExportTraceServiceRequest::decode(body).map_err(|e| e.to_string())?;
    record(spans, req);
    Ok(())
}

fn record(spans: &Spans, req: ExportTraceServiceRequest) {
    let mut got = spans.lock().unwrap();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| attrs(&r.attributes).remove("service.name"))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.push(Got {
                    service: service.clone(),
                    trace: id(&s.trace_id),
                    id: id(&s.span_id),
                    parent: (!s.parent_span_id.is_empty()).then(|| id(&s.parent_span_id)),
                    name: s.name.clone(),
                    attrs: attrs(&s.attributes),
                    links: s
                        .links
                        .iter()
                        .map(|l| (id(&l.trace_id), id(&l.span_id)))
                        .collect(),
                    events: s.events.iter().map(|e| e.name.clone()).collect(),
                });
            }
        }
    }
}

/// The OTLP/gRPC receiver: the generated `TraceService` over tonic.
struct GrpcCollector(Spans);

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        record(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on a free port; returns its URL.
async fn grpc_collector(spans: Spans) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .serve_with_incoming(TraceServiceServer::new(GrpcCollector(spans)), incoming),
    );
    format!("http://{addr}")
}

/// An OTLP/HTTP receiver on a free port; returns its base URL (as OTEL_EXPORTER_OTLP_ENDPOINT).
async fn collector(spans: Spans) -> String {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let spans = spans.clone();
            async move {
                match receive(&spans, &body) {
                    // An empty ExportTraceServiceResponse: full success.
                    Ok(()) => (
                        axum::http::StatusCode::OK,
                        [("content-type", "application/x-protobuf")],
                        Vec::new(),
                    ),
                    Err(e) => (
                        axum::http::StatusCode::BAD_REQUEST,
                        [("content-type", "text/plain")],
                        e.into_bytes(),
                    ),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn traceparent(trace: [u8; 16], parent: [u8; 8]) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("00-{}-{}-01", hex(&trace), hex(&parent))
}

/// The spans of one trace, checked: every span's parent is in the trace (or is `root`, the
/// caller's span named by `traceparent`), the gateway, prefill and decode services all took part,
/// and the spans a request must have are there. Returns the trace's spans by id.
fn connected_trace(all: &[Got], trace: [u8; 16], root: [u8; 8]) -> Result<Vec<Got>, String> {
    let spans: Vec<Got> = all.iter().filter(|s| s.trace == trace).cloned().collect();
    let ids: BTreeSet<[u8; 8]> = spans.iter().map(|s| s.id).collect();
    for s in &spans {
        match s.parent {
            Some(p) if ids.contains(&p) || p == root => {}
            other => {
                return Err(format!(
                    "{} ({}) has parent {other:?} outside its trace",
                    s.name, s.service
                ));
            }
        }
    }
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    for want in ["duet-gateway", "duet-prefill", "duet-decode"] {
        if !services.contains(want) {
            return Err(format!("no span from {want} yet: {services:?}"));
        }
    }
    let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "request",
        "choice",
        "sequence",
        "route",
        "decode.reserve",
        "prefill.chunk",
        "kv.layer",
        "prefill.handoff",
        "decode.handoff",
    ] {
        if !names.contains(want) {
            return Err(format!("no {want} span yet: {names:?}"));
        }
    }
    Ok(spans)
}

fn named<'a>(spans: &'a [Got], name: &str) -> Vec<&'a Got> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// Whether `s` descends from the span `ancestor` within `spans`.
fn descends(spans: &[Got], s: &Got, ancestor: [u8; 8]) -> bool {
    let by_id: BTreeMap<[u8; 8], &Got> = spans.iter().map(|s| (s.id, s)).collect();
    let mut at = s.parent;
    while let Some(p) = at {
        if p == ancestor {
            return true;
        }
        at = by_id.get(&p).and_then(|g| g.parent);
    }
    false
}

/// Polls the receiver until `check` holds (spans arrive in batches, after their spans end).
async fn until<T>(spans: &Spans, what: &str, check: impl Fn(&[Got]) -> Result<T, String>) -> T {
    let last = Mutex::new(String::new());
    let ok = eventually(Duration::from_secs(30), || {
        let got = spans.lock().unwrap().clone();
        let r = check(&got).map_err(|e| *last.lock().unwrap() = e).is_ok();
        async move { r }
    })
    .await;
    let got = spans.lock().unwrap().clone();
    assert!(ok, "{what}: {}", last.lock().unwrap());
    check(&got).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_one_trace_across_the_three_processes_even_through_a_re_run() {
    let spans: Spans = Arc::default();
    let endpoint = collector(spans.clone()).await;
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), endpoint),
        // Export every few milliseconds, so spans arrive while the test looks.
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "20".to_string()),
        (
            "OTEL_TRACES_SAMPLER".to_string(),
            "parentbased_always_on".to_string(),
        ),
    ];
    let workers = ["--dtype", "f32", "--fault-corrupt-kv-frames", "1"];
    let mut c = Cluster::start_env(1, 2, &[], &workers, env);

    // 1. A request carrying a W3C traceparent joins the caller's trace, also through a re-run
    // after a corrupt KV transfer (the prefill process flips a byte of its first frame).
    let (caller_trace, caller_span) = ([0x11; 16], [0x22; 8]);
    let r = client()
        .post(c.url("/v1/completions"))
        .header("traceparent", traceparent(caller_trace, caller_span))
        .json(&json!({"prompt": "Trace me across three processes", "max_tokens": 8, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let trace = until(&spans, "the traced request's spans", |got| {
        let t = connected_trace(got, caller_trace, caller_span)?;
        // The decode steps that served it link to its sequence's span.
        let seq_ids: BTreeSet<[u8; 8]> = named(&t, "sequence").iter().map(|s| s.id).collect();
        let linked = got.iter().any(|s| {
            s.name == "decode.step"
                && s.links
                    .iter()
                    .any(|(lt, ls)| *lt == caller_trace && seq_ids.contains(ls))
        });
        if !linked {
            return Err("no decode.step span linked to the sequence".into());
        }
        if named(&t, "choice")
            .iter()
            .all(|s| !s.events.iter().any(|e| e == "end of stream"))
        {
            return Err("no end of stream on the choice span yet".into());
        }
        // The prefill process corrupts its first frame: that layer's span says so, and the
        // sequence re-runs; the re-run receives every layer intact.
        let mismatched = named(&t, "kv.layer")
            .iter()
            .filter(|s| s.attrs["checksum"] == "mismatch")
            .count();
        if mismatched != 1 {
            return Err(format!("{mismatched} corrupt layers seen"));
        }
        let rerun = named(&t, "sequence")
            .into_iter()
            .find(|s| s.attrs["run"] == "1")
            .ok_or("no re-run yet")?
            .id;
        let handoff = t
            .iter()
            .find(|s| s.name == "decode.handoff" && descends(&t, s, rerun))
            .ok_or("no handoff of the re-run yet")?;
        let layers = t
            .iter()
            .filter(|s| s.name == "kv.layer" && descends(&t, s, rerun))
            .count();
        if layers.to_string() != handoff.attrs["layers"] {
            return Err(format!("{layers} of {} layers", handoff.attrs["layers"]));
        }
        Ok(t)
    })
    .await;
    let request = named(&trace, "request");
    assert_eq!(request.len(), 1, "one request span: {request:?}");
    assert_eq!(
        request[0].parent,
        Some(caller_span),
        "the caller's span is the parent"
    );
    assert_eq!(request[0].attrs["admission"], "admitted");
    let route = named(&trace, "route");
    assert!(
        ["prefix_hit", "load"].contains(&route[0].attrs["route_reason"].as_str()),
        "{route:?}"
    );
    let runs = named(&trace, "sequence");
    assert_eq!(runs.len(), 2, "the first run and its re-run: {runs:?}");
    let rerun = runs.iter().find(|s| s.attrs["run"] == "1").unwrap();
    assert!(
        rerun.attrs.contains_key("rerun_reason"),
        "the re-run says why: {rerun:?}"
    );
    for layer in named(&trace, "kv.layer") {
        assert_eq!(layer.attrs["transport"], "quic", "{layer:?}");
        if descends(&trace, layer, rerun.id) {
            assert_eq!(layer.attrs["checksum"], "ok", "{layer:?}");
            assert!(
                layer.attrs["bytes"].parse::<u64>().unwrap() > 0,
                "{layer:?}"
            );
        }
    }

    // The routing reason: the same long prompt twice goes by load, then by its prefix hit.
    let long: String = (0..200).map(|w| format!("w{} ", w % 97)).collect();
    let mut routes = Vec::new();
    for t in [[0x41; 16], [0x42; 16]] {
        let r = client()
            .post(c.url("/v1/completions"))
            .header("traceparent", traceparent(t, caller_span))
            .json(&json!({"prompt": long, "max_tokens": 2, "temperature": 0}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let route = until(&spans, "the route span", |got| {
            got.iter()
                .find(|s| s.trace == t && s.name == "route")
                .cloned()
                .ok_or_else(|| "no route span yet".to_string())
        })
        .await;
        routes.push((
            route.attrs["route_reason"].clone(),
            route.attrs["prefix_hit_tokens"].parse::<u64>().unwrap(),
        ));
    }
    assert_eq!(routes[0], ("load".to_string(), 0), "{routes:?}");
    assert_eq!(routes[1].0, "prefix_hit", "{routes:?}");
    assert!(
        routes[1].1 >= 64,
        "at least a page of the prompt was cached: {routes:?}"
    );

    // 2. Streams, each its own trace; the decode process holding the most is SIGKILLed once
    // every stream's handoff was exported, and the lost sequences re-run in their own traces.
    let traces: Vec<[u8; 16]> = (0..4u8).map(|i| [0x30 + i; 16]).collect();
    let tasks: Vec<_> = traces
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let url = c.url("/v1/completions");
            let header = traceparent(*t, caller_span);
            let body = json!({"prompt": format!("Stream {i} goes on and on"), "max_tokens": 300,
                "temperature": 0, "ignore_eos": true, "stream": true});
            tokio::spawn(async move {
                let r = client()
                    .post(url)
                    .header("traceparent", header)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                r.text().await.unwrap()
            })
        })
        .collect();
    // A decode process's spans that parent others (a reservation's, over its frames') end when
    // the sequence first runs: once every stream's arrived, the kill loses only leaves.
    until(&spans, "every stream running at a decode group", |got| {
        let with = |name: &str| -> BTreeSet<[u8; 16]> {
            got.iter()
                .filter(|s| s.name == name)
                .map(|s| s.trace)
                .collect()
        };
        let (handed, running) = (with("decode.handoff"), with("decode.reserve"));
        traces
            .iter()
            .all(|t| handed.contains(t) && running.contains(t))
            .then_some(())
            .ok_or_else(|| format!("running so far: {}", running.len()))
    })
    .await;
    let (victim, name) = c.busiest("decode").await;
    c.decode.remove(victim).kill9();
    for t in tasks {
        let body = t.await.unwrap();
        let finish: Vec<&str> = body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|e| e["choices"][0]["finish_reason"].as_str().map(String::from))
            .map(|f| if f == "length" { "length" } else { "other" })
            .collect();
        assert_eq!(finish, vec!["length"], "every stream completes: {body}");
    }
    let lost = c.lost_with(&name);
    assert!(
        lost > 0,
        "the killed process held sequences: {}",
        c.gateway.log()
    );
    let reruns = until(&spans, "the streams' traces", |got| {
        let mut reruns = 0;
        for t in &traces {
            let spans = connected_trace(got, *t, caller_span)?;
            if named(&spans, "choice")
                .iter()
                .all(|s| !s.events.iter().any(|e| e == "end of stream"))
            {
                return Err("a stream's end not exported yet".into());
            }
            for rerun in named(&spans, "sequence")
                .into_iter()
                .filter(|s| s.attrs["run"] != "0")
            {
                // The re-run went through prefill and a decode group again, in the same trace.
                let under: BTreeSet<&str> = spans
                    .iter()
                    .filter(|s| descends(&spans, s, rerun.id))
                    .map(|s| s.name.as_str())
                    .collect();
                if !(under.contains("prefill.chunk") && under.contains("decode.handoff")) {
                    return Err(format!("re-run's spans so far: {under:?}"));
                }
                assert!(rerun.attrs.contains_key("rerun_reason"), "{rerun:?}");
                reruns += 1;
            }
        }
        Ok(reruns)
    })
    .await;
    assert!(
        reruns >= lost,
        "each lost sequence's re-run is in its trace ({reruns} of {lost})"
    );
    let (_, h) = get(&c.url("/health")).await;
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h["decode_groups"], 1, "the dead process is unrouted");
}

/// `duet serve` (every role in one process) exports over OTLP/gRPC, and the request's spans from
/// all three roles are one trace under the service name it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duet_serve_exports_a_request_s_trace_over_grpc() {
    let spans: Spans = Arc::default();
    let endpoint = grpc_collector(spans.clone()).await;
    let env = [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
        ("OTEL_SERVICE_NAME", "duet-one-process"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let server = common::Proc::spawn_env(
        &[
            "serve",
            "--engine",
            "echo",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--otlp-endpoint",
            &endpoint,
        ],
        &env,
    );
    let line = server
        .wait_line(Duration::from_secs(60), |l| l.starts_with("duet serving "))
        .unwrap_or_else(|| panic!("duet serve did not start: {}", server.log()));
    let base = line.rsplit(' ').next().unwrap().to_string();
    let (status, _) = common::post(
        &format!("{base}/v1/completions"),
        &json!({"prompt": "over gRPC", "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200);
    until(&spans, "the request's spans over gRPC", |got| {
        let request = got
            .iter()
            .find(|s| s.name == "request")
            .ok_or("no request span yet")?;
        let trace: Vec<&Got> = got.iter().filter(|s| s.trace == request.trace).collect();
        let names: BTreeSet<&str> = trace.iter().map(|s| s.name.as_str()).collect();
        for want in [
            "choice",
            "sequence",
            "route",
            "decode.reserve",
            "prefill.chunk",
            "prefill.handoff",
            "decode.handoff",
        ] {
            if !names.contains(want) {
                return Err(format!("no {want} span yet: {names:?}"));
            }
        }
        match trace.iter().find(|s| s.service != "duet-one-process") {
            Some(s) => Err(format!("{} came from {}", s.name, s.service)),
            None => Ok(()),
        }
    })
    .await;
}
