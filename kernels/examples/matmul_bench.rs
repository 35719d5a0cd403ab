//! Matmul throughput for decode- and prefill-shaped problems:
//! `cargo run --release -p duet-kernels --example matmul_bench`.
//! Prints GB/s of weight read and GFLOP/s for each (m, n, k, dtype).

use std::time::Instant;

use duet_kernels::{DType, Device, Tensor, ops};

fn bench(m: usize, n: usize, k: usize, dtype: DType) {
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w = Tensor::from_f32_as(&[n, k], w, dtype, Device::Cpu).unwrap();
    let x = Tensor::from_f32(
        &[m, k],
        (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect(),
        Device::Cpu,
    )
    .unwrap();
    ops::matmul(&x, &w).unwrap();
    let reps = (2_000_000_000 / (n * k * dtype.size_bytes())).clamp(3, 200);
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(ops::matmul(&x, &w).unwrap());
    }
    let dt = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "m={m:4} n={n:6} k={k:5} {dtype:?}: {:8.3} ms  {:6.1} GB/s weights  {:6.1} GFLOP/s",
        dt * 1e3,
        w.size_bytes() as f64 / dt / 1e9,
        2.0 * (m * n * k) as f64 / dt / 1e9
    );
}

/// Many distinct weights used in turn, so every read comes from DRAM as in a decode step.
fn bench_cold(m: usize, n: usize, k: usize, count: usize, grouped: usize) {
    let ws: Vec<Tensor> = (0..count)
        .map(|c| {
            let w: Vec<f32> = (0..n * k)
                .map(|i| (((i + c) * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            Tensor::from_f32_as(&[n, k], w, DType::BF16, Device::Cpu).unwrap()
        })
        .collect();
    let x = Tensor::from_f32(
        &[m, k],
        (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect(),
        Device::Cpu,
    )
    .unwrap();
    let t = Instant::now();
    for _ in 0..3 {
        for chunk in ws.chunks(grouped) {
            let pairs: Vec<(&Tensor, &Tensor)> = chunk.iter().map(|w| (&x, w)).collect();
            std::hint::black_box(ops::matmul_grouped(&pairs).unwrap());
        }
    }
    let dt = t.elapsed().as_secs_f64() / (3 * count) as f64;
    println!(
        "cold m={m:3} n={n:5} k={k:5} x{count} grouped by {grouped}: {:7.3} ms each  {:6.1} GB/s",
        dt * 1e3,
        (n * k * 2) as f64 / dt / 1e9
    );
}

fn main() {
    if std::env::args().any(|a| a == "--cold") {
        for &g in &[1, 7] {
            bench_cold(1, 1024, 2048, 210, g);
            bench_cold(1, 2048, 512, 210, g);
        }
        bench_cold(16, 1024, 2048, 210, 7);
        return;
    }
    for &(n, k) in &[
        (129_280, 2048),
        (1024, 2048),
        (2048, 512),
        (3072, 768),
        (576, 2048),
    ] {
        for &m in &[1, 2, 4, 16] {
            bench(m, n, k, DType::BF16);
        }
    }
    for &m in &[16, 24, 32, 48, 64, 512] {
        bench(m, 1024, 2048, DType::BF16);
    }
    bench(512, 2048, 2048, DType::F32);
    bench(1, 1024, 2048, DType::F32);
}
