//! Spawning `duet serve` as a user does and talking HTTP to it.
#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use duet_openai::sse::{SseParser, is_done};
use serde_json::Value;

pub mod cluster;

pub struct Server {
    child: Child,
    pub base: String,
    pub stderr: PathBuf,
}

/// The tests' model cache: the embedded default model is written here once, not into $HOME.
pub fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("duet-cache")
}

/// Runs the `duet` binary to completion, as a user runs a one-shot command.
pub fn duet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duet"))
        .env("DUET_CACHE_DIR", cache_dir())
        .args(args)
        .output()
        .unwrap()
}

/// The JSON a successful command printed; fails the test with its stderr otherwise.
pub fn ok_json(out: Output) -> Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

impl Server {
    /// Starts `duet serve` on a free port and returns once it printed its URL, which it does only
    /// after every worker registered.
    pub fn start(args: &[&str]) -> Server {
        let stderr = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "serve-{}-{}.log",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_duet"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("DUET_CACHE_DIR", cache_dir())
            // A key in the developer's environment would lock the tests out.
            .env_remove("DUET_API_KEY")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawning duet serve");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut base = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(url) = line
                .split(" at ")
                .nth(1)
                .filter(|_| line.starts_with("duet serving"))
            {
                base = Some(url.trim().to_string());
                break;
            }
        }
        let Some(base) = base else {
            let _ = child.kill();
            panic!(
                "duet serve exited without printing its URL: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            base,
            stderr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the process to exit, up to `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        wait_exit(&mut self.child, deadline)
    }
}

fn wait_exit(child: &mut Child, deadline: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static NEXT_TMP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        NEXT_TMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ))
}

/// One `duet` process; its stdout lines arrive on a channel (the tests wait on what it prints,
/// never on a guessed time).
pub struct Proc {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Proc {
    /// `duet ARGS`.
    pub fn spawn(args: &[&str]) -> Proc {
        Self::spawn_env(args, &[])
    }

    /// `duet ARGS` with these environment variables set.
    pub fn spawn_env(args: &[&str], env: &[(String, String)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_duet"));
        cmd.args(args).env_remove("DUET_API_KEY");
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        Self::spawn_cmd(cmd)
    }

    /// Any command that runs `duet` (e.g. through `ip netns exec`).
    pub fn spawn_cmd(mut cmd: Command) -> Proc {
        let stderr = tmp("proc.log");
        let mut child = cmd
            .env("DUET_CACHE_DIR", cache_dir())
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawning duet");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines,
            stderr,
        }
    }

    /// The next line satisfying `pred`, within `deadline`.
    pub fn wait_line(&self, deadline: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let end = Instant::now() + deadline;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        // std's kill is SIGKILL on Unix: no chance to say goodbye.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        wait_exit(&mut self.child, deadline)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

pub async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = client().post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub async fn post_raw(
    url: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub async fn get(url: &str) -> (u16, String) {
    let r = client().get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Posts a streaming request and collects every JSON event; asserts the stream ends with [DONE].
pub async fn stream(url: &str, body: &Value) -> Vec<Value> {
    stream_counting(url, body, 0, &std::sync::atomic::AtomicUsize::new(0)).await
}

/// [`stream`], adding one to `seen` for each of the first `first` events (so a test can act once
/// every stream is under way).
pub async fn stream_counting(
    url: &str,
    body: &Value,
    first: usize,
    seen: &std::sync::atomic::AtomicUsize,
) -> Vec<Value> {
    use futures::StreamExt;
    let r = client().post(url).json(body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    let mut parser = SseParser::new();
    let mut out = Vec::new();
    let mut done = false;
    let mut bytes = r.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        for ev in parser.push(&chunk.unwrap()).unwrap() {
            assert!(!done, "event after [DONE]");
            if is_done(&ev) {
                done = true;
            } else {
                out.push(serde_json::from_str(&ev.data).unwrap());
                if out.len() <= first {
                    seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }
    assert!(done, "stream ended without [DONE]");
    out
}

/// Streams every body at once and returns once each stream has `first` events.
pub async fn start_streams(
    url: &str,
    bodies: Vec<Value>,
    first: usize,
) -> Vec<tokio::task::JoinHandle<Vec<Value>>> {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let total = bodies.len() * first;
    let tasks = bodies
        .into_iter()
        .map(|body| {
            let url = url.to_string();
            let seen = seen.clone();
            tokio::spawn(async move { stream_counting(&url, &body, first, &seen).await })
        })
        .collect();
    let end = Instant::now() + Duration::from_secs(120);
    while seen.load(std::sync::atomic::Ordering::Relaxed) < total {
        assert!(Instant::now() < end, "streams never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tasks
}

/// `(http base URL, cluster address)` from `duet gateway`'s start line
/// ("duet gateway serving NAME at http://H:P ; workers join at H:P").
pub fn gateway_addrs(line: &str) -> (String, String) {
    let http = line
        .split(" at ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let join = line.rsplit(' ').next().unwrap();
    (http.to_string(), join.to_string())
}

/// The `role` worker ("prefill" or "decode") holding the most sequences (running or waiting),
/// from the gateway's /metrics text: `(worker id, sequences)`.
pub fn busiest_worker(metrics: &str, role: &str) -> (String, f64) {
    let prefix = format!("duet_worker_sequences{{worker=\"{role}-");
    metrics
        .lines()
        .filter_map(|l| {
            let (id, rest) = l.strip_prefix(&prefix)?.split_once("\"}")?;
            Some((id.to_string(), rest.trim().parse::<f64>().ok()?))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_else(|| panic!("no {role} workers in /metrics: {metrics}"))
}

/// Sequences the gateway re-ran because worker process `name` (e.g. "decode-1234") was lost,
/// from its log lines "N sequences lost with worker process NAME (why); re-running them".
pub fn sequences_lost_with(gateway_log: &str, name: &str) -> usize {
    let needle = format!(" sequences lost with worker process {name} ");
    gateway_log
        .lines()
        .filter_map(|l| {
            let (before, _) = l.split_once(&needle)?;
            before.rsplit(' ').next()?.parse::<usize>().ok()
        })
        .sum()
}

/// The decode worker with the most KV pages in use, from the gateway's /metrics text.
pub fn busiest_decode_worker(metrics: &str) -> (String, f64) {
    metrics
        .lines()
        .filter_map(|l| {
            let (id, rest) = l
                .strip_prefix("duet_kv_pages_used{worker=\"decode-")?
                .split_once("\"}")?;
            Some((id.to_string(), rest.trim().parse::<f64>().ok()?))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("decode workers in /metrics")
}

/// Value of a Prometheus sample line `name{labels} value` (first match).
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `check` until it holds or `deadline` passes (waiting on the server's own endpoints,
/// not sleeping for a guessed time).
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Checks a Prometheus exposition with Prometheus's own `promtool check metrics`. Where promtool
/// is missing the check is skipped with a note, except under CI (scripts/test.sh installs it),
/// where that is a failure.
pub fn promtool_check(text: &str) {
    use std::io::Write as _;
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("promtool not run ({e}): install Debian's prometheus package");
            return;
        }
        Err(e) => panic!("promtool is needed under CI (scripts/test.sh installs it): {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
