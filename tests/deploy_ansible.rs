//! deploy/ for real: ansible connects over ssh to four "hosts" and deploys a gateway, a prefill
//! and two decode processes as systemd services; the official openai client sends requests
//! through the gateway; a second run changes nothing (`changed=0`, and `--check --diff` too); the
//! rolling restart runs under a steady stream of requests and none fails, every worker process
//! draining (it says so and exits by itself); the re-runs the gateway logs are counted. The Prometheus site.yml
//! installs on the gateway host scrapes every process (each target `up`, the requests the client
//! sent counted) with deploy/prometheus's rules loaded.
//!
//! A host is a systemd-nspawn container booted (systemd as its PID 1, the services supervised by
//! it as on a real machine) from a Debian root made by debootstrap — one overlay per host over a
//! shared read-only root, so every host has its own /etc, /opt and /var — in its own network
//! namespace with its own address and sshd. The control node (ansible, the client) is one more
//! namespace on the same bridge.
//!
//! Needs root, iproute2, systemd-nspawn (Debian's systemd-container), the Debian root at
//! target/deploy-rootfs, and the venvs target/venv-ansible and target/venv-openai: scripts/test.sh
//! makes all of them. Where one is missing the test says why; under CI (`CI` set, as `.ci/run`
//! does) that is a failure, elsewhere it passes without running (it cannot fake hosts).
//!
//! Not covered here: GPU and RDMA steps (no such devices; they run only where facts show them),
//! applying sysctls and huge pages (a container does not own its kernel: the files are written,
//! not applied), and resource limits above the sandbox's own hard limits (systemd caps them).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const HOSTS: [&str; 4] = ["gw", "pf", "d1", "d2"];
/// Booting a container and starting its sshd takes a few seconds; this bounds a stuck boot.
const SSH_DEADLINE: Duration = Duration::from_secs(90);
/// How long a container gets to power off on SIGTERM before it is killed.
const POWEROFF_DEADLINE: Duration = Duration::from_secs(30);
/// Requests the rolling restart must at least see: about 3 workers × a few seconds of 4 streams.
const ROLLING_REQUESTS_MIN: u64 = 50;
/// Prometheus's scrape interval in the test (the role's default is 15 s) and how long the test
/// waits for what it expects to appear in Prometheus: a few intervals.
const SCRAPE_INTERVAL: &str = "2s";
const PROMETHEUS_DEADLINE: Duration = Duration::from_secs(30);

fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// What the test needs from the machine, or why it cannot run.
fn prerequisites() -> Result<(), String> {
    if !is_root() {
        return Err("not root".into());
    }
    for tool in ["ip", "systemd-nspawn", "ssh", "ssh-keygen", "mount"] {
        run(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
            .map_err(|_| format!("{tool} is not installed"))?;
    }
    for (path, what) in [
        (
            "target/deploy-rootfs/usr/sbin/sshd",
            "the Debian root (debootstrap)",
        ),
        (
            "target/venv-ansible/bin/ansible-playbook",
            "ansible-core's venv",
        ),
        ("target/venv-openai/bin/python", "the openai client's venv"),
        (
            "target/deploy-rootfs/usr/bin/prometheus",
            "Debian's prometheus package in the Debian root",
        ),
    ] {
        if !Path::new(ROOT).join(path).exists() {
            return Err(format!(
                "{path} is missing ({what}: scripts/test.sh makes it)"
            ));
        }
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The hosts: a bridge in a switch namespace, the control node and four hosts on it, each host
/// a booted container on its own overlay root.
struct Lab {
    tag: String,
    dir: PathBuf,
    netns: Vec<String>,
    containers: Vec<Child>,
    mounts: Vec<PathBuf>,
}

impl Lab {
    fn addr(i: usize) -> String {
        format!("10.77.0.{}", i + 2) // the control node is .1
    }

    fn host_addr(host: &str) -> String {
        Self::addr(HOSTS.iter().position(|h| *h == host).unwrap())
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.tag)
    }

    fn new() -> Result<Lab, String> {
        let mut lab = Lab {
            tag: format!("da{}", std::process::id() % 100_000),
            dir: common::tmp("deploy-ansible"),
            netns: Vec::new(),
            containers: Vec::new(),
            mounts: Vec::new(),
        };
        std::fs::create_dir_all(&lab.dir).map_err(|e| e.to_string())?;
        let sw = lab.ns("sw");
        ip(&["netns", "add", &sw])?;
        lab.netns.push(sw.clone());
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        let ctl = std::iter::once(("ctl", "10.77.0.1".to_string()));
        let hosts = HOSTS.iter().enumerate().map(|(i, h)| (*h, Self::addr(i)));
        for (h, addr) in ctl.chain(hosts) {
            let ns = lab.ns(h);
            ip(&["netns", "add", &ns])?;
            lab.netns.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", h, "netns", &sw,
            ])?;
            ip(&["-n", &sw, "link", "set", h, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", h, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        let key = lab.dir.join("id_ed25519");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(&key))?;
        let pubkey = std::fs::read(key.with_extension("pub")).map_err(|e| e.to_string())?;
        for h in HOSTS {
            lab.boot(h, &pubkey)?;
        }
        Ok(lab)
    }

    /// Mounts the host's own root (an overlay over the shared Debian root) and boots it.
    fn boot(&mut self, host: &str, pubkey: &[u8]) -> Result<(), String> {
        let base = self.dir.join(host);
        let (upper, work, root) = (base.join("upper"), base.join("work"), base.join("root"));
        for d in [&upper, &work, &root] {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        let lower = Path::new(ROOT).join("target/deploy-rootfs");
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&root))?;
        self.mounts.push(root.clone());
        let write = |rel: &str, data: &[u8]| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).map_err(|e| e.to_string())?;
            std::fs::write(&p, data).map_err(|e| format!("{}: {e}", p.display()))
        };
        write("etc/hostname", format!("{host}\n").as_bytes())?;
        write("root/.ssh/authorized_keys", pubkey)?;
        let log =
            std::fs::File::create(base.with_extension("console")).map_err(|e| e.to_string())?;
        let child = Command::new("systemd-nspawn")
            .args([
                "--quiet",
                "--boot",
                "--console=passive",
                "--register=no",
                "--keep-unit",
            ])
            .arg(format!("--machine={}", self.ns(host)))
            .arg(format!(
                "--network-namespace-path=/var/run/netns/{}",
                self.ns(host)
            ))
            .arg("--directory")
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("systemd-nspawn: {e}"))?;
        self.containers.push(child);
        Ok(())
    }

    /// A command run on the control node (inside its namespace).
    fn ctl(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns("ctl"), program]);
        c.current_dir(ROOT);
        c
    }

    fn ssh(&self, host: &str, command: &str) -> Result<String, String> {
        let key = self.dir.join("id_ed25519");
        let out = run(self
            .ctl("ssh")
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args([
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=2",
                "-o",
                "BatchMode=yes",
            ])
            .arg("-i")
            .arg(&key)
            .arg(format!("root@{}", Self::host_addr(host)))
            .arg(command))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn wait_ssh(&self) -> Result<(), String> {
        let start = Instant::now();
        for h in HOSTS {
            loop {
                match self.ssh(h, "systemctl is-system-running --wait >/dev/null; true") {
                    Ok(_) => break,
                    Err(e) if start.elapsed() > SSH_DEADLINE => {
                        return Err(format!("{h}'s sshd did not answer: {e}"));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(250)),
                }
            }
        }
        Ok(())
    }

    fn ansible(&self, inventory: &Path, args: &[&str]) -> (Output, Duration) {
        let start = Instant::now();
        let out = self
            .ctl(&format!("{ROOT}/target/venv-ansible/bin/ansible-playbook"))
            .env("ANSIBLE_CONFIG", format!("{ROOT}/deploy/ansible.cfg"))
            .env("ANSIBLE_HOST_KEY_CHECKING", "False")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_LOCAL_TEMP", self.dir.join("ansible-tmp"))
            .arg("-i")
            .arg(inventory)
            .args(args)
            .output()
            .expect("running ansible-playbook");
        (out, start.elapsed())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // SIGTERM makes systemd-nspawn power the container off (its systemd stops the services).
        for c in &self.containers {
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.containers {
            let start = Instant::now();
            while matches!(c.try_wait(), Ok(None)) && start.elapsed() < POWEROFF_DEADLINE {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for m in &self.mounts {
            let _ = Command::new("umount").arg(m).status();
        }
        for ns in self.netns.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// `host: (ok, changed, unreachable, failed)` from ansible's PLAY RECAP.
fn recap(out: &Output) -> Vec<(String, [u64; 4])> {
    let text = String::from_utf8_lossy(&out.stdout);
    let tail = &text[text.rfind("PLAY RECAP").unwrap_or_else(|| {
        panic!(
            "no PLAY RECAP in ansible's output:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })..];
    tail.lines()
        .skip(1)
        .filter_map(|l| {
            let (host, counts) = l.split_once(':')?;
            let get = |k: &str| -> u64 {
                counts
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix(&format!("{k}=")))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {k}= in {l}"))
            };
            Some((
                host.trim().to_string(),
                [get("ok"), get("changed"), get("unreachable"), get("failed")],
            ))
        })
        .collect()
}

fn assert_ran(what: &str, out: &Output) -> Vec<(String, [u64; 4])> {
    let r = recap(out);
    let log = || {
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    assert!(out.status.success(), "{what} failed:\n{}", log());
    for (host, [_, _, unreachable, failed]) in &r {
        assert!(
            *unreachable == 0 && *failed == 0,
            "{what}: {host} unreachable={unreachable} failed={failed}\n{}",
            log()
        );
    }
    r
}

fn changed(r: &[(String, [u64; 4])]) -> Vec<(String, u64)> {
    r.iter().map(|(h, c)| (h.clone(), c[1])).collect()
}

/// The client's JSON line: (ok, failed, errors).
fn client_result(out: &Output) -> (u64, u64, String) {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_else(|| {
        panic!(
            "no output from the client: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("client output {line}: {e}"));
    (
        v["ok"].as_u64().unwrap(),
        v["failed"].as_u64().unwrap(),
        v["errors"].to_string(),
    )
}

fn write_inventory(dir: &Path, model: &Path, key: &Path) {
    std::fs::create_dir_all(dir.join("group_vars")).unwrap();
    // The layout `duet plan --out` writes, with this lab's addresses.
    let mut ini = String::new();
    for (group, hosts) in [
        ("duet_gateway", &["gw"][..]),
        ("duet_prefill", &["pf"][..]),
        ("duet_decode", &["d1", "d2"][..]),
    ] {
        ini.push_str(&format!("[{group}]\n"));
        for h in hosts {
            ini.push_str(&format!("{h} ansible_host={}\n", Lab::host_addr(h)));
        }
        ini.push('\n');
    }
    ini.push_str(&format!(
        "[all:vars]\nansible_user=root\nansible_ssh_private_key_file={}\n",
        key.display()
    ));
    std::fs::write(dir.join("inventory.ini"), ini).unwrap();
    let vars = format!(
        "---\nduet_binary_src: {bin}\nduet_model_src: {model}\n\
         duet_prefill_kv_pages: 64\nduet_decode_kv_pages: 64\nduet_decode_max_running: 8\n\
         duet_prometheus_scrape_interval: {SCRAPE_INTERVAL}\n\
         duet_env:\n  RAYON_NUM_THREADS: \"1\"\n",
        bin = env!("CARGO_BIN_EXE_duet"),
        model = model.display(),
    );
    std::fs::write(dir.join("group_vars/all.yml"), vars).unwrap();
    std::fs::write(
        dir.join("duet.toml"),
        "[limits]\ndrain_timeout_s = 30\nrequest_timeout_s = 120\n",
    )
    .unwrap();
}

/// GET `path` of the Prometheus on the gateway host from the control node, as JSON.
fn prometheus_api(lab: &Lab, path: &str) -> Result<serde_json::Value, String> {
    let url = format!("http://{}:9090{path}", Lab::host_addr("gw"));
    let get = "import sys, urllib.request; \
               sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())";
    let out = run(lab
        .ctl(&format!("{ROOT}/target/venv-openai/bin/python"))
        .args(["-c", get, &url]))?;
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{url}: {e}"))
}

/// Polls Prometheus until `check` passes (Ok) or PROMETHEUS_DEADLINE passed (its last Err).
fn wait_prometheus<T>(
    lab: &Lab,
    path: &str,
    check: impl Fn(&serde_json::Value) -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        let last = prometheus_api(lab, path).and_then(|v| check(&v));
        match last {
            Ok(t) => return t,
            Err(e) if start.elapsed() > PROMETHEUS_DEADLINE => {
                panic!("Prometheus {path} after {PROMETHEUS_DEADLINE:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The Prometheus site.yml installed: every duet process a target and `up`, the requests the
/// client sent scraped from the gateway, deploy/prometheus's rule groups loaded.
fn check_prometheus(lab: &Lab, requests_sent: u64) {
    let mut expected: Vec<(String, String)> = [
        ("duet-gateway", "gw", 9965),
        ("duet-prefill", "pf", 9967),
        ("duet-decode", "d1", 9967),
        ("duet-decode", "d2", 9967),
    ]
    .iter()
    .map(|(job, h, port)| (job.to_string(), format!("{}:{port}", Lab::host_addr(h))))
    .collect();
    expected.sort();
    wait_prometheus(lab, "/api/v1/targets?state=active", |v| {
        let targets = v["data"]["activeTargets"]
            .as_array()
            .ok_or_else(|| v.to_string())?;
        let mut seen: Vec<(String, String)> = targets
            .iter()
            .map(|t| {
                let l = &t["labels"];
                let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
                (s(&l["job"]), s(&l["instance"]))
            })
            .collect();
        seen.sort();
        // Right after a (re)load the targets appear once discovery has run (a few seconds).
        if seen != expected {
            return Err(format!("targets {seen:?}, expected {expected:?}"));
        }
        match targets.iter().find(|t| t["health"] != "up") {
            Some(t) => Err(format!("not up: {t}")),
            None => Ok(()),
        }
    });
    let query = "/api/v1/query?query=sum(duet_requests_total%7Bjob%3D%22duet-gateway%22%7D)";
    wait_prometheus(lab, query, |v| {
        let n: f64 = v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("no duet_requests_total yet: {v}"))?;
        if n as u64 >= requests_sent {
            Ok(())
        } else {
            Err(format!(
                "duet_requests_total is {n}, {requests_sent} were sent"
            ))
        }
    });
    let rules = prometheus_api(lab, "/api/v1/rules").unwrap();
    let groups: Vec<(&str, &str, usize)> = rules["data"]["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("{rules}"))
        .iter()
        .map(|g| {
            (
                g["name"].as_str().unwrap_or_default(),
                g["file"].as_str().unwrap_or_default(),
                g["rules"].as_array().map_or(0, |r| r.len()),
            )
        })
        .collect();
    // Every rule of deploy/prometheus/duet-rules.yml, in its group.
    let src = std::fs::read_to_string(format!("{ROOT}/deploy/prometheus/duet-rules.yml")).unwrap();
    let count = |what: &str| {
        src.lines()
            .filter(|l| l.trim_start().starts_with(what))
            .count()
    };
    let mut want = vec![
        (
            "duet.alerts",
            "/etc/prometheus/duet-rules.yml",
            count("- alert:"),
        ),
        (
            "duet.recording",
            "/etc/prometheus/duet-rules.yml",
            count("- record:"),
        ),
    ];
    let mut groups = groups;
    groups.sort();
    want.sort();
    assert_eq!(groups, want, "Prometheus's rules: {rules}");
    eprintln!(
        "Prometheus: 4 targets up, {} recording rules and {} alerts loaded",
        want[1].2, want[0].2
    );
}

/// The worker processes' main PIDs, by host.
fn worker_pids(lab: &Lab) -> Vec<(String, String)> {
    [("pf", "prefill"), ("d1", "decode"), ("d2", "decode")]
        .iter()
        .map(|(h, role)| {
            let pid = lab
                .ssh(h, &format!("systemctl show -p MainPID --value duet-{role}"))
                .unwrap();
            (h.to_string(), pid)
        })
        .collect()
}

#[test]
fn ansible_deploys_serves_is_idempotent_and_restarts_rolling_without_a_failed_request() {
    if let Err(why) = prerequisites() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set, so this test must run: {why}"
        );
        eprintln!("SKIPPED the ansible deploy test (CI is not set): {why}");
        return;
    }
    let t0 = Instant::now();
    let lab = Lab::new().unwrap_or_else(|e| panic!("building the hosts: {e}"));
    lab.wait_ssh().unwrap();
    eprintln!("hosts up in {:.1?}", t0.elapsed());

    let model = lab.dir.join("model");
    run(Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["tiny-model", "--out"])
        .arg(&model))
    .unwrap();
    let inv_dir = lab.dir.join("inventory");
    write_inventory(&inv_dir, &model, &lab.dir.join("id_ed25519"));
    let inv = inv_dir.join("inventory.ini");
    let site = format!("{ROOT}/deploy/site.yml");

    let (out, took) = lab.ansible(&inv, &[&site]);
    let first = assert_ran("the first site.yml", &out);
    eprintln!(
        "site.yml (first run) took {took:.1?}: changed {:?}",
        changed(&first)
    );
    assert_eq!(first.len(), HOSTS.len(), "{first:?}");

    let base = format!("http://{}:9965/v1", Lab::host_addr("gw"));
    let client = format!("{ROOT}/target/venv-openai/bin/python");
    let script = format!("{ROOT}/tests/deploy_ansible/client.py");
    let out = lab
        .ctl(&client)
        .args([&script, &base, "smoke", "16"])
        .output()
        .unwrap();
    let (ok, failed, errors) = client_result(&out);
    assert_eq!((ok, failed), (16, 0), "{errors}");
    let t = Instant::now();
    check_prometheus(&lab, 16);
    eprintln!("Prometheus checked in {:.1?}", t.elapsed());

    // The secret: generated once on the control node, 0600 there and on every host.
    let secret = inv_dir.join("cluster.secret");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", secret.display());
    for h in HOSTS {
        let st = lab
            .ssh(h, "stat -c '%a %U' /etc/duet/cluster.secret")
            .unwrap();
        assert_eq!(st, "600 duet", "{h}");
    }

    let (out, took) = lab.ansible(&inv, &[&site]);
    let again = assert_ran("the second site.yml", &out);
    eprintln!(
        "site.yml (second run) took {took:.1?}: changed {:?}",
        changed(&again)
    );
    assert!(
        again.iter().all(|(_, c)| c[1] == 0),
        "not idempotent: {again:?}"
    );

    let (out, took) = lab.ansible(&inv, &["--check", "--diff", &site]);
    let check = assert_ran("site.yml --check --diff", &out);
    eprintln!(
        "site.yml --check --diff took {took:.1?}: changed {:?}",
        changed(&check)
    );
    assert!(check.iter().all(|(_, c)| c[1] == 0), "{check:?}");

    // The rolling restart under a steady stream of requests.
    let gateway_pid = lab
        .ssh("gw", "systemctl show -p MainPID --value duet-gateway")
        .unwrap();
    let before = worker_pids(&lab);
    let stop = lab.dir.join("stop-load");
    let load = lab
        .ctl(&client)
        .args([&script, &base, "load"])
        .arg(&stop)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A few requests of its own before the first worker goes, so the stream is under way.
    let out = lab
        .ctl(&client)
        .args([&script, &base, "smoke", "4"])
        .output()
        .unwrap();
    assert_eq!(client_result(&out).1, 0, "{}", client_result(&out).2);
    let (out, took) = lab.ansible(&inv, &[&format!("{ROOT}/deploy/rolling-restart.yml")]);
    std::fs::write(&stop, b"").unwrap();
    let load = load.wait_with_output().unwrap();
    let restart = assert_ran("rolling-restart.yml", &out);
    let (ok, failed, errors) = client_result(&load);
    eprintln!(
        "rolling-restart.yml took {took:.1?}: {ok} requests succeeded and {failed} failed during it"
    );
    assert_eq!(
        failed, 0,
        "requests failed during the rolling restart: {errors}"
    );
    assert!(
        ok >= ROLLING_REQUESTS_MIN,
        "only {ok} requests during the rolling restart"
    );
    assert_eq!(restart.len(), 3, "{restart:?}");
    let after = worker_pids(&lab);
    for ((h, a), (_, b)) in before.iter().zip(&after) {
        assert_ne!(a, b, "{h}'s worker was not restarted");
        assert_ne!(b, "0", "{h}'s worker is not running after the restart");
    }
    let gateway_after = lab
        .ssh("gw", "systemctl show -p MainPID --value duet-gateway")
        .unwrap();
    assert_eq!(gateway_pid, gateway_after, "the gateway was restarted");
    // Each worker drained: the stopped process said so (the journal keeps its log).
    let mut journals = String::new();
    for (h, role) in [("pf", "prefill"), ("d1", "decode"), ("d2", "decode")] {
        let log = lab
            .ssh(h, &format!("journalctl -q -o short-precise -u duet-{role}"))
            .unwrap();
        assert!(
            log.contains("duet: draining") && log.contains("duet: drained, exiting"),
            "{h}'s worker did not drain:\n{log}"
        );
        journals.push_str(&format!("--- {h} duet-{role}\n{log}\n"));
    }
    // No sequence was re-run, in the whole test (the gateway logs every re-run and every sequence
    // lost with a process; its /metrics has no counter of them): the drained workers lost
    // nothing, and KV connections idle between the test's phases stayed up.
    let log = lab
        .ssh("gw", "journalctl -q -o short-precise -u duet-gateway")
        .unwrap();
    let reruns: Vec<&str> = log.lines().filter(|l| l.contains("re-running")).collect();
    assert!(
        reruns.is_empty(),
        "{} sequences re-run:\n--- gw duet-gateway\n{log}\n{journals}",
        reruns.len()
    );
    eprintln!("the whole test took {:.1?}", t0.elapsed());
}

/// `duet plan --out DIR` writes what site.yml consumes: ansible reads DIR/inventory.ini with its
/// group_vars, every group and the variables the roles use, and site.yml parses against it.
/// Needs only ansible's venv (no root).
#[test]
fn the_planner_writes_an_inventory_site_yml_reads() {
    let ansible = Path::new(ROOT).join("target/venv-ansible/bin");
    if !ansible.join("ansible-inventory").exists() {
        let why = "target/venv-ansible is missing (scripts/test.sh makes it)";
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set, so this test must run: {why}"
        );
        eprintln!("SKIPPED the planner inventory test (CI is not set): {why}");
        return;
    }
    let dir = common::tmp("plan-inventory");
    run(Command::new(env!("CARGO_BIN_EXE_duet"))
        .args([
            "plan", "--gpu", "h200", "--isl", "1000", "--osl", "100", "--rate", "4",
        ])
        .args([
            "--verify-requests",
            "100",
            "--model-dir",
            "/srv/models/deepseek-v3",
            "--out",
        ])
        .arg(&dir))
    .unwrap();
    let toml = std::fs::read_to_string(dir.join("duet.toml")).unwrap();
    let out = run(Command::new(ansible.join("ansible-inventory"))
        .env("ANSIBLE_CONFIG", format!("{ROOT}/deploy/ansible.cfg"))
        .arg("-i")
        .arg(dir.join("inventory.ini"))
        .arg("--list"))
    .unwrap();
    let inv: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for group in [
        "duet_gateway",
        "duet_prefill",
        "duet_decode",
        "duet_prometheus",
    ] {
        assert!(
            inv[group]["hosts"]
                .as_array()
                .is_some_and(|h| !h.is_empty()),
            "{group}: {inv}"
        );
    }
    let host = inv["duet_decode"]["hosts"][0].as_str().unwrap();
    let vars = &inv["_meta"]["hostvars"][host];
    // The worker's batch cap and KV pages are the config's.
    let field = |section: &str, key: &str| -> u64 {
        let s = &toml[toml.find(&format!("[{section}]")).unwrap()..];
        let line = s
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(
        vars["duet_decode_max_running"],
        field("decode", "max_running"),
        "{vars}"
    );
    assert_eq!(
        vars["duet_decode_kv_pages"],
        field("decode", "kv_pages"),
        "{vars}"
    );
    assert_eq!(vars["duet_decode_ep"], field("decode", "ep_size"), "{vars}");
    assert_eq!(vars["duet_model_src"], "/srv/models/deepseek-v3", "{vars}");
    assert!(vars["duet_instance"].is_u64(), "{vars}");
    assert_eq!(
        inv["duet_prometheus"]["hosts"], inv["duet_gateway"]["hosts"],
        "Prometheus runs on the gateway host: {inv}"
    );
    run(Command::new(ansible.join("ansible-playbook"))
        .env("ANSIBLE_CONFIG", format!("{ROOT}/deploy/ansible.cfg"))
        .arg("-i")
        .arg(dir.join("inventory.ini"))
        .args(["--syntax-check", &format!("{ROOT}/deploy/site.yml")]))
    .unwrap();
}
