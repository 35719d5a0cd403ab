//! `duet sim-calibrate-cpu`, `duet sim --gpu FILE.toml` and `duet plan` on a dense config through the
//! real binary: the profile the calibration writes is one the simulator runs, a bad profile is a
//! clear error, and a distill checkpoint's config.json plans a deployment.

mod common;

use common::{duet, ok_json};

#[test]
fn a_calibrated_cpu_profile_drives_the_simulator() {
    let out = common::tmp("cpu-profile");
    let out_s = out.to_str().unwrap();
    // Short measurements: the contract is under test here, not the figures (BENCHMARKS.md has those).
    let fit = ok_json(duet(&[
        "sim-calibrate-cpu",
        "--out",
        out_s,
        "--prefill-lens",
        "16,128",
        "--batches",
        "1,4",
        "--decode-context",
        "64",
    ]));
    assert!(fit["fitted_layer_gflops"].as_f64().unwrap() > 0.0, "{fit}");
    assert!(fit["fitted_head_gflops"].as_f64().unwrap() > 0.0, "{fit}");
    // The fit reproduces the steps it was fitted to: decode batch 1 and 4 exactly, unless the decode
    // overhead had to be clamped at 0 (a noisy machine can time the prefills slow enough that the
    // fitted layers alone exceed a decode step); prefill likewise.
    let clamped = fit["decode_step_overhead_us"].as_f64().unwrap() == 0.0;
    for s in fit["steps"].as_array().unwrap() {
        if s.get("decode_batch").is_some() && !clamped {
            let (m, p) = (
                s["measured_us"].as_f64().unwrap(),
                s["model_us"].as_f64().unwrap(),
            );
            assert!((p / m - 1.0).abs() < 0.01, "{s}");
        }
    }
    let config = format!("{}/config.json", fit["model"].as_str().unwrap());
    let gpu = format!("{out_s}/cpu.toml");
    let cal = format!("{out_s}/calibration.toml");
    let report = ok_json(duet(&[
        "sim",
        "--model-config",
        &config,
        "--gpu",
        &gpu,
        "--calibration",
        &cal,
        "--prefill-nodes",
        "1",
        "--decode-nodes",
        "2",
        "--gpus-per-node",
        "1",
        "--prefill-ep",
        "1",
        "--decode-ep",
        "1",
        "--decode-batch-per-gpu",
        "8",
        "--prefill-tokens-per-gpu",
        "512",
        "--isl",
        "64",
        "--osl",
        "8",
        "--rate",
        "20",
        "--requests",
        "40",
        "--seed",
        "3",
        "--json",
    ]));
    assert_eq!(report["requests_finished"], 40, "{report}");
    assert_eq!(report["gpu"], "cpu");
    // The serving config's pool: duet serve's 512 pages per worker.
    assert_eq!(report["kv_pages_per_decode_gpu"], 512, "{report}");
    assert!(report["ttft_ms_p50"].as_f64().unwrap() > 0.0);
    assert!(report["tpot_ms_p50"].as_f64().unwrap() > 0.0);

    // A profile with a missing field or a zero rate is refused with the reason.
    let bad = out.join("bad.toml");
    let text = std::fs::read_to_string(&gpu)
        .unwrap()
        .replace("bf16_flops = ", "bf16_flops = 0.0\n# was ");
    std::fs::write(&bad, text).unwrap();
    let o = duet(&[
        "sim",
        "--gpu",
        bad.to_str().unwrap(),
        "--prefill-nodes",
        "1",
        "--decode-nodes",
        "1",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bf16_flops"), "{err}");
    let o = duet(&[
        "sim",
        "--gpu",
        "/nonexistent/cpu.toml",
        "--prefill-nodes",
        "1",
        "--decode-nodes",
        "1",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/cpu.toml"));
}

/// DeepSeek-R1-Distill-Qwen-7B's config.json as released (Qwen2 architecture, BF16).
const DISTILL_QWEN_7B: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
 "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
 "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
 "max_position_embeddings": 131072, "rope_theta": 10000, "sliding_window": 4096,
 "use_sliding_window": false, "tie_word_embeddings": false, "torch_dtype": "bfloat16"}"#;

#[test]
fn a_distill_config_plans_a_dense_deployment_and_an_unknown_type_is_named() {
    let dir = common::tmp("distill-plan");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, DISTILL_QWEN_7B).unwrap();
    let out = dir.join("out");
    let o = duet(&[
        "plan",
        "--model-config",
        cfg.to_str().unwrap(),
        "--gpu",
        "h100",
        "--rate",
        "20",
        "--osl",
        "300",
        "--verify-requests",
        "200",
        "--out",
        out.to_str().unwrap(),
        "--model-dir",
        "/srv/models/r1-distill-qwen-7b",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let toml = std::fs::read_to_string(out.join("duet.toml")).unwrap();
    assert!(toml.contains("dense model, no experts"), "{toml}");
    // Each instance is one TP rank: `ep_size` equals `tp_size` in both roles, and a TP size that
    // splits Qwen2-7B's 28 heads and 4 KV heads.
    let field = |section: &str, key: &str| -> usize {
        let s = &toml[toml.find(&format!("[{section}]")).unwrap()..];
        let line = s
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    for role in ["prefill", "decode"] {
        let tp = field(role, "tp_size");
        assert_eq!(field(role, "ep_size"), tp, "{toml}");
        assert!([1, 2, 4].contains(&tp), "{toml}");
    }
    assert!(toml.contains("path = \"/srv/models/r1-distill-qwen-7b\""));

    let mistral = dir.join("mistral.json");
    std::fs::write(
        &mistral,
        r#"{"model_type": "mistral", "hidden_size": 4096}"#,
    )
    .unwrap();
    let o = duet(&[
        "plan",
        "--model-config",
        mistral.to_str().unwrap(),
        "--gpu",
        "h100",
        "--rate",
        "1",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("\"mistral\"") && err.contains("qwen2"),
        "{err}"
    );
}
