//! `duet sim` through the real binary: every chart of `--chart-dir` as SVG and PNG, and the expert
//! balance flags. Its own test binary: cargo runs test binaries one at a time, so these simulations
//! never run beside `cli_sim.rs`'s CPU timing loops.

mod common;

use common::{duet, ok_json};

#[test]
fn charts_come_out_as_svg_and_png() {
    let dir = common::tmp("sim-charts");
    let dir_s = dir.to_str().unwrap();
    let report = ok_json(duet(&[
        "sim",
        "--gpu",
        "h800",
        "--prefill-nodes",
        "4",
        "--decode-nodes",
        "4",
        "--isl",
        "2000",
        "--osl",
        "100",
        "--rate",
        "20",
        "--requests",
        "300",
        "--sweep-rates",
        "10,40",
        "--chart-dir",
        dir_s,
        "--json",
    ]));
    assert_eq!(report["requests_finished"], 300, "{report}");
    for name in [
        "ttft_cdf",
        "tpot_cdf",
        "throughput_vs_rate",
        "latency_vs_rate",
    ] {
        let svg = std::fs::read_to_string(dir.join(format!("{name}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("</svg>"),
            "{name}.svg"
        );
        let png = std::fs::read(dir.join(format!("{name}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{name}.png");
    }
    let latency = std::fs::read_to_string(dir.join("latency_vs_rate.svg")).unwrap();
    assert!(latency.contains("TTFT p99") && latency.contains("requests/s"));

    // Rates without a place to draw them are refused rather than simulated for nothing.
    let o = duet(&[
        "sim",
        "--gpu",
        "h800",
        "--prefill-nodes",
        "4",
        "--decode-nodes",
        "4",
        "--sweep-rates",
        "10",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--chart-dir"));
}

#[test]
fn expert_balance_flags_reach_the_report() {
    let sim = |flag: Option<&str>| {
        let mut args = vec![
            "sim",
            "--gpu",
            "h800",
            "--prefill-nodes",
            "4",
            "--decode-nodes",
            "4",
            "--isl",
            "1000",
            "--osl",
            "20",
            "--requests",
            "100",
            "--json",
        ];
        args.extend(flag);
        duet(&args)
    };
    for (flag, name) in [
        (None, "eplb"),
        (Some("--no-eplb"), "static"),
        (Some("--balanced-moe"), "balanced"),
    ] {
        let r = ok_json(sim(flag));
        assert_eq!(r["moe_balance"], name, "{r}");
        let imb = r["decode_expert_imbalance"].as_f64().unwrap();
        assert_eq!(imb == 1.0, name == "balanced", "{r}");
    }
    let both = duet(&[
        "sim",
        "--gpu",
        "h800",
        "--prefill-nodes",
        "1",
        "--decode-nodes",
        "1",
        "--balanced-moe",
        "--no-eplb",
    ]);
    assert!(!both.status.success());
    let err = String::from_utf8_lossy(&both.stderr);
    assert!(err.contains("--no-eplb"), "{err}");
}
