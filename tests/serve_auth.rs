//! API keys and binding, through the real binary as an operator starts it: keys from
//! `--api-key`, `--api-key-file` and DUET_API_KEY; 401 in OpenAI's shape without one; the exempt
//! paths (configurable); 127.0.0.1 unless `--host` says otherwise, and the printed URL is the
//! address bound.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Proc, cache_dir, tmp};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

/// `duet ARGS` with `env`, and the URL it printed once serving.
fn start(args: &[&str], env: &[(&str, &str)], banner: &str) -> (Proc, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_duet"));
    cmd.args(args).env_remove("DUET_API_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let p = Proc::spawn_cmd(cmd);
    let line = p
        .wait_line(DEADLINE, |l| l.starts_with(banner))
        .unwrap_or_else(|| panic!("no {banner:?} line: {}", p.log()));
    let url = line.split(" at ").nth(1).unwrap();
    let url = url.split(' ').next().unwrap().to_string();
    (p, url)
}

/// Status, `WWW-Authenticate`, and body of a request with an optional bearer key.
async fn call(url: &str, key: Option<&str>, body: Option<&Value>) -> (u16, Option<String>, Value) {
    let c = common::client();
    let mut r = match body {
        Some(b) => c.post(url).json(b),
        None => c.get(url),
    };
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    (
        status,
        www,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_flags_file_and_env_guard_every_endpoint_but_the_exempt() {
    let file = tmp("keys");
    std::fs::write(&file, "# operators\nsk-file-1\n\n  sk-file-2  \n").unwrap();
    let (_srv, url) = start(
        &[
            "serve",
            "--port",
            "0",
            "--engine",
            "echo",
            "--api-key",
            "sk-flag-1",
            "--api-key",
            "sk-flag-2",
            "--api-key-file",
            file.to_str().unwrap(),
        ],
        &[
            ("DUET_CACHE_DIR", cache_dir().to_str().unwrap()),
            ("DUET_API_KEY", "sk-env"),
        ],
        "duet serving",
    );
    // No --host: loopback, and the printed URL has the port the OS gave.
    let port: u16 = url
        .strip_prefix("http://127.0.0.1:")
        .unwrap_or_else(|| panic!("{url}"))
        .parse()
        .unwrap();
    assert_ne!(port, 0);

    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let guarded: [(&str, Option<&Value>); 6] = [
        ("/v1/models", None),
        ("/v1/models/default", None),
        ("/openapi.json", None),
        ("/v1/chat/completions", Some(&chat)),
        ("/tokenize", Some(&json!({"prompt": "hi"}))),
        ("/no/such/path", None),
    ];
    for (path, body) in guarded {
        let u = format!("{url}{path}");
        for key in [None, Some("sk-flag"), Some("sk-flag-1x"), Some("sk-env2")] {
            let (status, www, e) = call(&u, key, body).await;
            assert_eq!(status, 401, "{path} with {key:?}: {e}");
            assert_eq!(www.as_deref(), Some("Bearer"));
            assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
            assert_eq!(e["error"]["code"], "invalid_api_key", "{e}");
        }
    }
    for key in ["sk-flag-1", "sk-flag-2", "sk-file-1", "sk-file-2", "sk-env"] {
        let (status, _, v) = call(
            &format!("{url}/v1/chat/completions"),
            Some(key),
            Some(&chat),
        )
        .await;
        assert_eq!(status, 200, "{key}: {v}");
        assert_eq!(v["object"], "chat.completion");
    }
    // Probes and scrapers carry no key.
    for path in ["/health", "/metrics"] {
        let (status, _, _) = call(&format!("{url}{path}"), None, None).await;
        assert_eq!(status, 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exempt_paths_come_from_the_config_and_bad_keys_are_refused_at_start() {
    let cfg = tmp("auth.toml");
    std::fs::write(
        &cfg,
        "[gateway]\nhost = \"127.0.0.1\"\nauth_exempt_paths = [\"/v1/models\"]\n",
    )
    .unwrap();
    let cache = cache_dir();
    let (_srv, url) = start(
        &[
            "serve",
            "--port",
            "0",
            "--engine",
            "echo",
            "--config",
            cfg.to_str().unwrap(),
            "--api-key",
            "sk-1",
        ],
        &[("DUET_CACHE_DIR", cache.to_str().unwrap())],
        "duet serving",
    );
    assert_eq!(call(&format!("{url}/v1/models"), None, None).await.0, 200);
    assert_eq!(call(&format!("{url}/health"), None, None).await.0, 401);
    assert_eq!(
        call(&format!("{url}/health"), Some("sk-1"), None).await.0,
        200
    );

    // A missing key file, or a key no client could send, stops the server before it binds.
    for args in [
        &["serve", "--api-key-file", "/nonexistent/keys"][..],
        &["serve", "--api-key", "two words"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_duet"))
            .args(args)
            .env("DUET_CACHE_DIR", &cache)
            .env_remove("DUET_API_KEY")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("API key"), "{args:?}: {err}");
    }
}

/// `duet gateway` too: loopback by default, real addresses printed, keys checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_binds_loopback_and_checks_keys() {
    let secret = tmp("secret");
    std::fs::write(&secret, "a cluster secret for the tests, 48 bytes long..\n").unwrap();
    let (_gw, url) = start(
        &[
            "gateway",
            "--port",
            "0",
            "--cluster-port",
            "0",
            "--secret-file",
            secret.to_str().unwrap(),
            "--api-key",
            "sk-gw",
        ],
        &[("DUET_CACHE_DIR", cache_dir().to_str().unwrap())],
        "duet gateway serving",
    );
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert!(!url.ends_with(":0"), "{url}");
    assert_eq!(call(&format!("{url}/v1/models"), None, None).await.0, 401);
    assert_eq!(
        call(&format!("{url}/v1/models"), Some("sk-gw"), None)
            .await
            .0,
        200
    );
    // No workers yet: 503, but never 401.
    assert_eq!(call(&format!("{url}/health"), None, None).await.0, 503);
}
