//! Logging to stderr and, when configured, OpenTelemetry traces over OTLP.
//!
//! Traces are off unless `--otlp-endpoint` or `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` names a
//! collector (and `OTEL_SDK_DISABLED` is not `true`). Then the spans of the target
//! `duet_actors::trace::TARGET` go to a batch span processor and an OTLP exporter:
//! - protocol: `--otlp-protocol` or `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`, `http/protobuf` (the
//!   default, to `<endpoint>/v1/traces`) or `grpc`;
//! - service name: `OTEL_SERVICE_NAME`, else `duet-gateway`, `duet-prefill`, `duet-decode`, `duet`;
//! - sampler: `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (read by the SDK; default
//!   `parentbased_always_on`, so an incoming sampled `traceparent` is always followed);
//! - batching: `OTEL_BSP_*` (read by the SDK); the queue holds at most [`SPAN_QUEUE_MAX`] spans.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Spans finished and not yet exported; past this the processor drops new spans (and counts
/// them) rather than hold memory or slow a request: the SDK's default, named here.
pub const SPAN_QUEUE_MAX: usize = 2048;
/// One export's deadline (the OTLP default).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest collector answer read (an OTLP answer is a few bytes; opentelemetry-http's bound).
const RESPONSE_BYTES_MAX: u64 = 4 << 20;

#[derive(clap::Args, Clone, Default)]
pub struct OtlpArgs {
    /// Send traces to this OTLP collector (e.g. http://127.0.0.1:4318 for HTTP, :4317 for
    /// gRPC); overrides OTEL_EXPORTER_OTLP_ENDPOINT. Off when neither is set.
    #[arg(long, global = true)]
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol; overrides OTEL_EXPORTER_OTLP_PROTOCOL (default http/protobuf).
    #[arg(long, global = true, value_parser = ["http/protobuf", "grpc"])]
    pub otlp_protocol: Option<String>,
}

/// Keeps the trace pipeline alive; dropping it flushes the spans still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// gRPC's channel runs on a runtime of its own, apart from the server's.
    _grpc_runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("duet: flushing traces: {e}");
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Installs the stderr log (warnings; RUST_LOG overrides) and, when configured, the trace
/// exporter for a process whose default service name is `service`.
pub fn init(args: &OtlpArgs, service: &str) -> Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
        // Trace spans are for the exporter, not the log.
        .add_directive(
            format!("{}=off", duet_actors::trace::TARGET)
                .parse()
                .context("log filter")?,
        );
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter);
    let (provider, runtime) = match pipeline(args, service)? {
        Some((p, r)) => (Some(p), r),
        None => (None, None),
    };
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("duet"))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(duet_actors::trace::TARGET, tracing::Level::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(log)
        .with(traces)
        .try_init()
        .context("installing the log")?;
    Ok(Telemetry {
        provider,
        _grpc_runtime: runtime,
    })
}

type Pipeline = (SdkTracerProvider, Option<tokio::runtime::Runtime>);

fn pipeline(args: &OtlpArgs, service: &str) -> Result<Option<Pipeline>> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none")
    {
        return Ok(None);
    }
    let from_env = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    if args.otlp_endpoint.is_none() && !from_env {
        return Ok(None);
    }
    let protocol = args
        .otlp_protocol
        .clone()
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".into());
    let (exporter, runtime) = match protocol.as_str() {
        "http/protobuf" => {
            let client = BlockingHttp(
                reqwest::blocking::Client::builder()
                    .timeout(EXPORT_TIMEOUT)
                    .build()
                    .context("building the OTLP HTTP client")?,
            );
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(client)
                .with_timeout(EXPORT_TIMEOUT);
            if let Some(e) = &args.otlp_endpoint {
                // As OTEL_EXPORTER_OTLP_ENDPOINT: a base URL, the signal's path appended.
                let e = e.trim_end_matches('/');
                b = b.with_endpoint(if e.ends_with("/v1/traces") {
                    e.to_string()
                } else {
                    format!("{e}/v1/traces")
                });
            }
            (b.build().context("building the OTLP/HTTP exporter")?, None)
        }
        "grpc" => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-grpc")
                .enable_all()
                .build()
                .context("starting the OTLP gRPC runtime")?;
            let _in = rt.enter();
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_timeout(EXPORT_TIMEOUT);
            if let Some(e) = &args.otlp_endpoint {
                b = b.with_endpoint(e.clone());
            }
            let exporter = b.build().context("building the OTLP/gRPC exporter")?;
            drop(_in);
            (exporter, Some(rt))
        }
        other => bail!("OTLP protocol {other:?} is not supported (http/protobuf or grpc)"),
    };
    let mut batch = BatchConfigBuilder::default();
    if env("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
        batch = batch.with_max_queue_size(SPAN_QUEUE_MAX);
    }
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.build())
        .build();
    let name = env("OTEL_SERVICE_NAME").unwrap_or_else(|| service.to_string());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    Ok(Some((provider, runtime)))
}

/// OTLP/HTTP over reqwest's blocking client: the batch processor exports from its own thread,
/// outside any async runtime (reqwest's blocking client runs one of its own).
#[derive(Debug)]
struct BlockingHttp(reqwest::blocking::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for BlockingHttp {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        use std::io::Read;
        let request = reqwest::blocking::Request::try_from(request.map(|b| b.to_vec()))?;
        let mut response = self.0.execute(request)?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body = Vec::new();
        response
            .by_ref()
            .take(RESPONSE_BYTES_MAX)
            .read_to_end(&mut body)?;
        let mut out = opentelemetry_http::Response::builder()
            .status(status)
            .body(opentelemetry_http::Bytes::from(body))?;
        *out.headers_mut() = headers;
        Ok(out)
    }
}
