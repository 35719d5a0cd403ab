//! deploy/prometheus and deploy/grafana against the real thing: the rules, their unit tests and
//! the scrape config pass Prometheus's own `promtool`, and every metric the rules and the
//! dashboard name is one a running cluster's gateway or worker processes export.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::cluster::Cluster;
use common::get;
use serde_json::Value;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// `promtool ARGS`; `false` (skipped with a note) where promtool is missing, except under CI
/// (scripts/test.sh installs Debian's prometheus package), where that is a failure.
fn promtool(args: &[&str]) -> bool {
    let out = match Command::new("promtool").args(args).output() {
        Ok(o) => o,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("promtool not run ({e}): install Debian's prometheus package");
            return false;
        }
        Err(e) => panic!("promtool is needed under CI (scripts/test.sh installs it): {e}"),
    };
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

#[test]
fn the_rules_and_the_scrape_config_pass_promtool_and_the_rules_unit_tests() {
    let rules = deploy("prometheus/duet-rules.yml");
    if promtool(&["check", "rules", rules.to_str().unwrap()]) {
        promtool(&[
            "test",
            "rules",
            deploy("prometheus/tests.yml").to_str().unwrap(),
        ]);
        promtool(&[
            "check",
            "config",
            deploy("prometheus/prometheus.yml").to_str().unwrap(),
        ]);
    }
}

/// Names of duet metrics or recording rules in `text`: `duet_…` and `duet:…` tokens.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while i < b.len() {
        let starts = (b[i..].starts_with(b"duet_") || b[i..].starts_with(b"duet:"))
            && (i == 0 || !word(b[i - 1]));
        if starts {
            let end = (i..b.len()).find(|&j| !word(b[j])).unwrap_or(b.len());
            out.insert(text[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// The sample names of a Prometheus exposition (histograms as `_bucket`, `_sum`, `_count`).
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

/// Every `expr` of the dashboard's panels (rows hold none).
fn dashboard_exprs(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().expect("every target has an expr");
            out.push(e.to_string());
        }
        if p["type"] != "row" {
            assert!(
                p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "panel {} has no query",
                p["title"]
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_and_the_dashboard_name_only_metrics_a_cluster_exports() {
    let c = Cluster::start(1, 1, &["--engine", "echo", "--metrics-port", "0"]);
    let (prefill, decode) = (c.prefill[0].endpoint(), c.decode[0].endpoint());
    // One request, so every histogram has samples.
    let (status, _) = common::post(
        &c.url("/v1/completions"),
        &serde_json::json!({"prompt": "metrics please", "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200);
    let mut exported = BTreeSet::new();
    for url in [
        c.url("/metrics"),
        format!("{prefill}/metrics"),
        format!("{decode}/metrics"),
    ] {
        let (status, text) = get(&url).await;
        assert_eq!(status, 200, "{url}");
        exported.extend(sample_names(&text));
    }
    assert!(
        exported.contains("duet_time_to_first_token_seconds_bucket"),
        "{exported:?}"
    );

    let rules = std::fs::read_to_string(deploy("prometheus/duet-rules.yml")).unwrap();
    let recorded: BTreeSet<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(|r| r.trim().to_string())
        .collect();
    assert!(
        recorded.contains("duet:ttft_seconds:p99_5m"),
        "{recorded:?}"
    );
    let known = |n: &String| exported.contains(n) || recorded.contains(n);

    let unit_tests = std::fs::read_to_string(deploy("prometheus/tests.yml")).unwrap();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/duet-cluster.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "duet-cluster");
    let exprs = dashboard_exprs(&dashboard).join("\n");
    for (what, text) in [
        ("duet-rules.yml", &rules),
        ("tests.yml", &unit_tests),
        ("duet-cluster.json", &exprs),
    ] {
        let names = names_in(text);
        assert!(!names.is_empty(), "{what} names no metric");
        let unknown: Vec<&String> = names.iter().filter(|n| !known(n)).collect();
        assert!(
            unknown.is_empty(),
            "{what} names metrics nothing exports: {unknown:?}\nexported: {exported:?}"
        );
    }
    // What the alerts are about is on the dashboard too.
    for r in [
        "duet:ttft_seconds:p99_5m",
        "duet:itl_seconds:p99_5m",
        "duet:request_errors:ratio_rate5m",
        "duet:kv_pages_used:ratio",
        "duet_queue_depth",
    ] {
        assert!(exprs.contains(r), "the dashboard shows {r}");
    }
}
