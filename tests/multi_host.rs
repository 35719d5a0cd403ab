//! Multi-host: every role in its own network namespace with its own addresses (ip netns + veth +
//! a bridge), the control plane on one network and the KV data path on another, as on a GPU
//! cluster with a separate RDMA fabric. Then links are cut (veth down) under load.
//!
//! Needs root and iproute2 (scripts/test.sh installs iproute2). Where a namespace cannot be
//! created the test says why; under CI (`CI` set, as `.ci/run` does) that is a failure, elsewhere
//! (a developer without root) it passes without running, saying so (it cannot fake hosts).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Proc;
use serde_json::{Value, json};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Hosts on two networks: control (10.<n>.1.0/24, every host) and data (10.<n>.2.0/24, the
/// workers), each a bridge in a "switch" namespace.
struct Net {
    tag: String,
    net: u8,
    hosts: Vec<String>,
}

impl Net {
    fn new(hosts: &[&str]) -> Result<Net, String> {
        let tag = format!("d{}", std::process::id() % 100_000);
        let net = 100 + (std::process::id() % 100) as u8;
        let mut n = Net {
            tag,
            net,
            hosts: Vec::new(),
        };
        let sw = n.ns("sw");
        ip(&["netns", "add", &sw])?;
        n.hosts.push("sw".into());
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        for br in ["br0", "br1"] {
            ip(&["-n", &sw, "link", "add", br, "type", "bridge"])?;
            ip(&["-n", &sw, "link", "set", br, "up"])?;
        }
        for (i, h) in hosts.iter().enumerate() {
            let ns = n.ns(h);
            ip(&["netns", "add", &ns])?;
            n.hosts.push(h.to_string());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            for (net_i, br) in [(1, "br0"), (2, "br1")] {
                if net_i == 2 && *h == "gw" {
                    continue; // the gateway is not on the data network
                }
                let dev = format!("eth{}", net_i - 1);
                let port = format!("{h}{net_i}");
                ip(&[
                    "-n", &ns, "link", "add", &dev, "type", "veth", "peer", "name", &port, "netns",
                    &sw,
                ])?;
                ip(&["-n", &sw, "link", "set", &port, "master", br])?;
                ip(&["-n", &sw, "link", "set", &port, "up"])?;
                let addr = format!("10.{}.{net_i}.{}/24", n.net, i + 1);
                ip(&["-n", &ns, "addr", "add", &addr, "dev", &dev])?;
                ip(&["-n", &ns, "link", "set", &dev, "up"])?;
            }
        }
        Ok(n)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.tag)
    }

    fn addr(&self, host: &str, net_i: u8) -> String {
        let i = self.hosts.iter().skip(1).position(|h| h == host).unwrap() + 1;
        format!("10.{}.{net_i}.{i}", self.net)
    }

    /// Sets `host`'s link on network `net_i` (1 control, 2 data) up or down, at the switch.
    fn link(&self, host: &str, net_i: u8, up: bool) {
        let port = format!("{host}{net_i}");
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.ns("sw"), "link", "set", &port, state]).unwrap();
    }

    fn spawn(&self, host: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host), env!("CARGO_BIN_EXE_duet")]);
        cmd.args(args);
        Proc::spawn_cmd(cmd)
    }

    /// Starts `f` on a thread inside `host`'s namespace (its sockets are that host's).
    fn spawn_in<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.ns_path(host);
        std::thread::spawn(move || {
            enter_ns(&path);
            f()
        })
    }

    /// Runs `f` inside `host`'s namespace and waits for it; `f` may borrow.
    fn run_in<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = self.ns_path(host);
        std::thread::scope(|s| {
            s.spawn(|| {
                enter_ns(&path);
                f()
            })
            .join()
            .unwrap()
        })
    }

    fn ns_path(&self, host: &str) -> String {
        format!("/var/run/netns/{}", self.ns(host))
    }

    /// The host whose control address appears in `line`.
    fn host_in(&self, line: &str, hosts: &[&'static str]) -> &'static str {
        hosts
            .iter()
            .find(|h| line.contains(&format!("from {}:", self.addr(h, 1))))
            .unwrap_or_else(|| panic!("no host of {hosts:?} in {line}"))
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_ns(path: &str) {
    let file = std::fs::File::open(path).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: a valid namespace fd; setns only changes this thread's network namespace.
    let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veths (and their peers).
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &self.ns(h)]);
        }
    }
}

fn secret_file() -> std::path::PathBuf {
    let p = common::tmp("secret");
    std::fs::write(&p, "multi-host cluster secret, long enough\n").unwrap();
    p
}

fn text_of(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"].get(0)?["text"].as_str().map(String::from))
        .collect()
}

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn roles_on_separate_hosts_survive_cut_links() {
    let net = match Net::new(&["gw", "pf", "d1", "d2"]) {
        Ok(n) => n,
        Err(why) => {
            let why = format!("cannot build network namespaces here: {why}");
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set, so this test must run: {why} (run as root with iproute2 installed)"
            );
            eprintln!("SKIPPED roles_on_separate_hosts_survive_cut_links (CI is not set): {why}");
            return;
        }
    };
    let secret = secret_file();
    let s = secret.to_str().unwrap();
    let gw = net.spawn(
        "gw",
        &[
            "gateway",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--cluster-port",
            "0",
            "--secret-file",
            s,
        ],
    );
    let line = gw
        .wait_line(DEADLINE, |l| l.starts_with("duet gateway serving"))
        .unwrap_or_else(|| panic!("gateway: {}", gw.log()));
    let (http, cluster) = common::gateway_addrs(&line);
    let port = cluster.rsplit(':').next().unwrap();
    let join = format!("{}:{port}", net.addr("gw", 1));
    let worker = |host: &str, role: &str| {
        let kv = format!("{}:0", net.addr(host, 2));
        net.spawn(
            host,
            &[
                role,
                "--join",
                &join,
                "--secret-file",
                s,
                "--dtype",
                "f32",
                "--kv-addr",
                &kv,
            ],
        )
    };
    let _pf = worker("pf", "prefill");
    let mut decode: std::collections::BTreeMap<&str, Proc> = ["d1", "d2"]
        .into_iter()
        .map(|h| (h, worker(h, "decode")))
        .collect();
    let mut joined = Vec::new();
    for _ in 0..3 {
        joined.push(
            gw.wait_line(DEADLINE, |l| l.starts_with("joined "))
                .unwrap_or_else(|| panic!("join: {}", gw.log())),
        );
    }
    // Each process joined from its own host's address.
    for h in ["pf", "d1", "d2"] {
        let from = format!("from {}:", net.addr(h, 1));
        assert!(joined.iter().any(|l| l.contains(&from)), "{h}: {joined:?}");
    }

    let prompts: Vec<String> = (0..4)
        .map(|i| format!("Host test {i} keeps going"))
        .collect();
    let max_tokens = 160;
    let client_side = {
        let prompts = prompts.clone();
        let http = http.clone();
        move |phase: &str| -> Vec<String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let url = format!("{http}/v1/completions");
                let mut out = Vec::new();
                for p in &prompts {
                    let body = json!({"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
                    let (status, v) = common::post(&url, &body).await;
                    assert_eq!(status, 200, "{phase}: {v}");
                    out.push(v["choices"][0]["text"].as_str().unwrap().to_string());
                }
                out
            })
        }
    };
    // Undisturbed texts first.
    let reference = {
        let f = client_side.clone();
        net.run_in("gw", move || f("reference"))
    };

    // 1. Cut the control link of the decode host holding the most KV while every stream is under
    // way: the gateway hears nothing from it, declares it dead, and re-runs its sequences on the
    // other decode host; the streams go on.
    let (texts, victim) = net.run_in("gw", || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let bodies = prompts
                .iter()
                .map(|p| json!({"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true}))
                .collect();
            let streams =
                common::start_streams(&format!("{http}/v1/completions"), bodies, 4).await;
            let (_, metrics) = common::get(&format!("{http}/metrics")).await;
            let (worker, pages) = common::busiest_decode_worker(&metrics);
            assert!(pages > 0.0, "no decode host holds KV: {metrics}");
            let line = joined
                .iter()
                .find(|l| l.contains(&format!("[{worker}]")))
                .unwrap();
            let victim = net.host_in(line, &["d1", "d2"]);
            net.link(victim, 1, false);
            let mut texts = Vec::new();
            for s in streams {
                texts.push(text_of(&s.await.unwrap()));
            }
            (texts, victim)
        })
    });
    let other = if victim == "d1" { "d2" } else { "d1" };
    assert_eq!(texts, reference, "streams continued across the cut");
    let left = gw
        .wait_line(DEADLINE, |l| l.starts_with("left "))
        .expect("the gateway noticed the cut host");
    assert_eq!(net.host_in(&left, &["d1", "d2"]), victim, "{left}");
    assert!(
        gw.log().contains("sequences lost with worker process"),
        "the cut host held sequences that were re-run: {}",
        gw.log()
    );

    // The link comes back: the host rejoins by itself, without a restart.
    net.link(victim, 1, true);
    let back = gw
        .wait_line(DEADLINE, |l| l.starts_with("joined decode"))
        .unwrap_or_else(|| panic!("{victim} did not rejoin: {}", gw.log()));
    assert_eq!(net.host_in(&back, &["d1", "d2"]), victim, "{back}");
    assert!(
        decode[victim]
            .wait_line(DEADLINE, |l| l.starts_with("joined the gateway"))
            .is_some()
    );

    // 2. Cut the same host's data link only, with the other decode host gone: control still flows, so the gateway keeps
    // routing to d1, but the KV cannot arrive. The transfer misses its deadline, the sequence is
    // re-run (never decoded from missing KV), and once the link is back the answer is the
    // undisturbed one.
    decode.get_mut(other).unwrap().kill9();
    let left = gw
        .wait_line(DEADLINE, |l| l.starts_with("left "))
        .expect("the gateway noticed the dead decode host");
    assert_eq!(net.host_in(&left, &["d1", "d2"]), other, "{left}");
    net.link(victim, 2, false);
    let one = {
        let http = http.clone();
        let p = prompts[0].clone();
        net.spawn_in("gw", move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let body = json!({"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
                common::post(&format!("{http}/v1/completions"), &body).await
            })
        })
    };
    let end = Instant::now() + DEADLINE;
    while !gw.log().contains("arrived within") {
        assert!(
            Instant::now() < end,
            "no transfer deadline fired: {}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gw.log().contains("re-running"), "{}", gw.log());
    net.link(victim, 2, true);
    let (status, v) = one.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), reference[0]);
}
