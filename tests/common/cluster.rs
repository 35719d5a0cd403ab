//! A cluster of role processes on this host (`duet gateway` + `duet prefill` + `duet decode`),
//! started as a user would, for the tests that drive one.

use std::path::PathBuf;
use std::time::Duration;

use super::{Proc, get, tmp};

pub fn secret_file() -> PathBuf {
    let p = tmp("secret");
    std::fs::write(&p, "a cluster secret for the tests, 48 bytes long..\n").unwrap();
    p
}

pub struct Cluster {
    pub gateway: Proc,
    pub http: String,
    pub join: String,
    pub secret: PathBuf,
    pub prefill: Vec<Proc>,
    pub decode: Vec<Proc>,
    /// The gateway's "joined ..." lines so far.
    pub joined: Vec<String>,
    /// Environment variables every process of the cluster gets.
    pub env: Vec<(String, String)>,
}

pub const JOIN_DEADLINE: Duration = Duration::from_secs(60);

impl Cluster {
    pub fn gateway(secret: &std::path::Path, cluster_port: u16) -> (Proc, String, String) {
        Self::gateway_with(secret, cluster_port, &[], &[])
    }

    pub fn gateway_with(
        secret: &std::path::Path,
        cluster_port: u16,
        extra: &[&str],
        env: &[(String, String)],
    ) -> (Proc, String, String) {
        let port = cluster_port.to_string();
        let mut args = vec![
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--cluster-port",
            &port,
            "--secret-file",
            secret.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let gw = Proc::spawn_env(&args, env);
        let line = gw
            .wait_line(JOIN_DEADLINE, |l| l.starts_with("duet gateway serving"))
            .unwrap_or_else(|| panic!("gateway did not start: {}", gw.log()));
        let (http, join) = super::gateway_addrs(&line);
        (gw, http, join)
    }

    pub fn worker(&self, role: &str, extra: &[&str]) -> Proc {
        let mut args = vec![
            role,
            "--join",
            &self.join,
            "--secret-file",
            self.secret.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Proc::spawn_env(&args, &self.env)
    }

    /// Waits until the gateway printed `n` more joins.
    pub fn await_joins(&mut self, n: usize) {
        for i in 0..n {
            let line = self
                .gateway
                .wait_line(JOIN_DEADLINE, |l| l.starts_with("joined "))
                .unwrap_or_else(|| {
                    panic!("only {i} of {n} workers joined: {}", self.gateway.log())
                });
            self.joined.push(line);
        }
    }

    /// The `role` process ("prefill" or "decode") whose worker holds the most sequences now, from
    /// the gateway's /metrics (a process that holds sequences, so killing it really loses work):
    /// its index in `self.prefill` / `self.decode` and its name as the gateway logs it.
    pub async fn busiest(&self, role: &str) -> (usize, String) {
        let (_, metrics) = get(&self.url("/metrics")).await;
        let (worker, held) = super::busiest_worker(&metrics, role);
        assert!(held > 0.0, "no {role} worker holds a sequence: {metrics}");
        // "joined ROLE ROLE-PID workers [ID, ...] from ADDR"
        let line = self
            .joined
            .iter()
            .find(|l| {
                l.starts_with(&format!("joined {role} "))
                    && l.split_once('[')
                        .and_then(|(_, r)| r.split_once(']'))
                        .is_some_and(|(ids, _)| ids.split(", ").any(|id| id == worker))
            })
            .unwrap_or_else(|| panic!("{role} worker {worker} never joined: {:?}", self.joined));
        let name = line.split(' ').nth(2).unwrap().to_string();
        let pid: u32 = name
            .strip_prefix(&format!("{role}-"))
            .unwrap()
            .parse()
            .unwrap();
        let procs = if role == "prefill" {
            &self.prefill
        } else {
            &self.decode
        };
        let i = procs.iter().position(|p| p.child.id() == pid).unwrap();
        (i, name)
    }

    /// How many sequences the gateway re-ran because process `name` was lost (its log).
    pub fn lost_with(&self, name: &str) -> usize {
        super::sequences_lost_with(&self.gateway.log(), name)
    }

    /// A gateway with no workers yet.
    pub fn gateway_only() -> Cluster {
        Self::gateway_only_with(&[])
    }

    pub fn gateway_only_with(gateway_args: &[&str]) -> Cluster {
        Self::gateway_only_env(gateway_args, Vec::new())
    }

    pub fn gateway_only_env(gateway_args: &[&str], env: Vec<(String, String)>) -> Cluster {
        let secret = secret_file();
        let (gateway, http, join) = Self::gateway_with(&secret, 0, gateway_args, &env);
        Cluster {
            gateway,
            http,
            join,
            secret,
            prefill: Vec::new(),
            decode: Vec::new(),
            joined: Vec::new(),
            env,
        }
    }

    pub fn start(prefill: usize, decode: usize, extra: &[&str]) -> Cluster {
        Self::start_with(prefill, decode, &[], extra)
    }

    pub fn start_with(
        prefill: usize,
        decode: usize,
        gateway_args: &[&str],
        extra: &[&str],
    ) -> Cluster {
        Self::start_env(prefill, decode, gateway_args, extra, Vec::new())
    }

    /// A cluster whose every process gets `env`.
    pub fn start_env(
        prefill: usize,
        decode: usize,
        gateway_args: &[&str],
        extra: &[&str],
        env: Vec<(String, String)>,
    ) -> Cluster {
        let mut c = Self::gateway_only_env(gateway_args, env);
        for _ in 0..prefill {
            let p = c.worker("prefill", extra);
            c.prefill.push(p);
        }
        for _ in 0..decode {
            let d = c.worker("decode", extra);
            c.decode.push(d);
        }
        c.await_joins(prefill + decode);
        c
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.http)
    }
}

impl Proc {
    /// A worker process's own `/health` and `/metrics` base URL (started with `--metrics-port`),
    /// from the line it prints once serving them.
    pub fn endpoint(&self) -> String {
        let line = self
            .wait_line(JOIN_DEADLINE, |l| l.starts_with("health and metrics: "))
            .unwrap_or_else(|| panic!("no endpoint line: {}", self.log()));
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|a| a.strip_suffix("/health "))
            .unwrap_or_else(|| panic!("{line}"));
        let port = addr.rsplit(':').next().unwrap();
        format!("http://127.0.0.1:{port}")
    }
}
