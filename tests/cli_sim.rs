//! `duet sim-calibrate-cpu` and `duet sim --gpu FILE.toml` through the real binary: the profile
//! the calibration writes is one the simulator runs, and a bad profile is a clear error.

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
