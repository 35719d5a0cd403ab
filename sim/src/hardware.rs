//! The GPU catalogue: per-GPU peak figures from `shared/reference/anchors-performance.md` §9.
//!
//! Peaks only; how much of a peak a kernel reaches is a calibration factor (`calibration.toml`), the
//! same for every GPU. "Dense" FLOP/s (no 2:4 sparsity). NVLink is stored per direction (NVIDIA
//! quotes the bidirectional total, twice as large), because an all-to-all sends and receives at once.

use serde::{Deserialize, Serialize};

use crate::SimError;

/// One GPU type and the node it usually comes in.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Gpu {
    /// Catalogue name, as given to `--gpu`.
    pub name: &'static str,
    pub hbm_bytes: f64,
    pub hbm_bytes_per_s: f64,
    pub bf16_flops: f64,
    /// FP8 dense FLOP/s; for a GPU without FP8 tensor cores (A100) the BF16 figure, since FP8
    /// weights are then dequantised and multiplied in BF16.
    pub fp8_flops: f64,
    /// NVLink (or Infinity Fabric) bandwidth per direction, per GPU.
    pub nvlink_bytes_per_s: f64,
    /// GPUs one NVLink domain spans: 8 in an HGX node, 72 in a GB200 NVL72 rack.
    pub nvlink_domain_gpus: usize,
    /// Scale-out (RDMA NIC) bandwidth per GPU, per direction.
    pub nic_bytes_per_s: f64,
    /// GPUs per node in the usual build (HGX: 8; GB200 compute tray: 4).
    pub gpus_per_node: usize,
    /// Rental price per GPU-hour in US dollars, for `duet plan --minimise cost`. Only H800's $2 is
    /// published (DeepSeek's day-6 cost figure, anchors §1); the others are rough market figures
    /// (assumed, not sourced) and only their ratios matter to the plan.
    pub usd_per_gpu_hour: f64,
    /// Where the figures come from and how sure they are (anchors §9 "Status").
    pub source: &'static str,
}

const GB: f64 = 1e9;
const TB: f64 = 1e12;
const TFLOPS: f64 = 1e12;

/// Every GPU the simulator knows, by `--gpu` name.
pub const CATALOGUE: [Gpu; 8] = [
    Gpu {
        name: "h100",
        hbm_bytes: 80.0 * GB,
        hbm_bytes_per_s: 3.35 * TB,
        bf16_flops: 989.0 * TFLOPS,
        fp8_flops: 1979.0 * TFLOPS,
        nvlink_bytes_per_s: 450.0 * GB,
        nvlink_domain_gpus: 8,
        nic_bytes_per_s: 50.0 * GB,
        gpus_per_node: 8,
        usd_per_gpu_hour: 2.5,
        source: "anchors §9 H100 SXM5 (secondary, consistent across sources)",
    },
    Gpu {
        name: "h800",
        hbm_bytes: 80.0 * GB,
        hbm_bytes_per_s: 3.35 * TB,
        bf16_flops: 989.0 * TFLOPS,
        fp8_flops: 1979.0 * TFLOPS,
        // 400 GB/s bidirectional; DeepSeek measures ~160 of the 200 per direction (calibration).
        nvlink_bytes_per_s: 200.0 * GB,
        nvlink_domain_gpus: 8,
        nic_bytes_per_s: 50.0 * GB,
        gpus_per_node: 8,
        usd_per_gpu_hour: 2.0,
        source: "anchors §9 H800 SXM5 (confirmed: FlashMLA deep dive, ISCA'25 §4, DeepEP)",
    },
    Gpu {
        name: "h200",
        hbm_bytes: 141.0 * GB,
        hbm_bytes_per_s: 4.8 * TB,
        bf16_flops: 989.0 * TFLOPS,
        fp8_flops: 1979.0 * TFLOPS,
        nvlink_bytes_per_s: 450.0 * GB,
        nvlink_domain_gpus: 8,
        nic_bytes_per_s: 50.0 * GB,
        gpus_per_node: 8,
        usd_per_gpu_hour: 3.0,
        source: "anchors §9 H200 SXM (secondary)",
    },
    Gpu {
        name: "h20",
        hbm_bytes: 96.0 * GB,
        hbm_bytes_per_s: 4.0 * TB,
        bf16_flops: 148.0 * TFLOPS,
        fp8_flops: 296.0 * TFLOPS,
        nvlink_bytes_per_s: 450.0 * GB,
        nvlink_domain_gpus: 8,
        nic_bytes_per_s: 50.0 * GB,
        gpus_per_node: 8,
        usd_per_gpu_hour: 1.0,
        source: "anchors §9 H20 (unconfirmed: secondary pages only)",
    },
    Gpu {
        name: "b200",
        hbm_bytes: 180.0 * GB,
        hbm_bytes_per_s: 8.0 * TB,
        bf16_flops: 2250.0 * TFLOPS,
        fp8_flops: 4500.0 * TFLOPS,
        nvlink_bytes_per_s: 900.0 * GB,
        nvlink_domain_gpus: 8,
        nic_bytes_per_s: 50.0 * GB,
        gpus_per_node: 8,
        usd_per_gpu_hour: 5.0,
        source: "anchors §9 B200 HGX (secondary)",
    },
    Gpu {
        name: "gb200",
        hbm_bytes: 186.0 * GB,
        hbm_bytes_per_s: 8.0 * TB,
        bf16_flops: 2500.0 * TFLOPS,
        fp8_flops: 5000.0 * TFLOPS,
        nvlink_bytes_per_s: 900.0 * GB,
        nvlink_domain_gpus: 72,
        nic_bytes_per_s: 50.0 * GB,
        gpus_per_node: 4,
        usd_per_gpu_hour: 6.0,
        source: "anchors §9 GB200 NVL72 (secondary; FP8 dense conflicts 4.5 vs 5 PF)",
    },
    Gpu {
        name: "mi300x",
        hbm_bytes: 192.0 * GB,
        hbm_bytes_per_s: 5.3 * TB,
        bf16_flops: 1307.0 * TFLOPS,
        fp8_flops: 2615.0 * TFLOPS,
        // 7 × 128 GB/s Infinity Fabric links; the 896 GB/s total is already per direction per link
        // pair, but an all-to-all over a fully connected 8-GPU mesh uses all 7 at once.
        nvlink_bytes_per_s: 448.0 * GB,
        nvlink_domain_gpus: 8,
        nic_bytes_per_s: 50.0 * GB,
        gpus_per_node: 8,
        usd_per_gpu_hour: 2.0,
        source: "anchors §9 MI300X (secondary)",
    },
    Gpu {
        name: "a100",
        hbm_bytes: 80.0 * GB,
        hbm_bytes_per_s: 2.039 * TB,
        bf16_flops: 312.0 * TFLOPS,
        // No FP8 tensor cores: FP8 weights are multiplied in BF16.
        fp8_flops: 312.0 * TFLOPS,
        nvlink_bytes_per_s: 300.0 * GB,
        nvlink_domain_gpus: 8,
        // One 200 Gb/s HDR NIC per GPU in a DGX A100.
        nic_bytes_per_s: 25.0 * GB,
        gpus_per_node: 8,
        usd_per_gpu_hour: 1.2,
        source: "not in anchors §9: NVIDIA A100 80GB SXM datasheet figures from memory (unconfirmed)",
    },
];

/// Looks a GPU up by name, case-insensitively; "h100-sxm", "h100_sxm" and "H100" all find "h100".
pub fn gpu(name: &str) -> Option<Gpu> {
    let n = name.to_ascii_lowercase().replace(['-', '_', ' '], "");
    let n = n.trim_end_matches("sxm5").trim_end_matches("sxm");
    let n = n.trim_end_matches("nvl72");
    CATALOGUE.iter().copied().find(|g| g.name == n)
}

/// A device described by a TOML file (`duet sim --gpu FILE.toml`): the fields of [`Gpu`], rates in
/// bytes/s and FLOP/s. `duet sim-calibrate-cpu` writes one for this machine's CPU. The two names are
/// leaked: a profile is loaded once per process and lives as long as it, like the catalogue.
pub fn from_toml(text: &str) -> Result<Gpu, SimError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        name: String,
        hbm_bytes: f64,
        hbm_bytes_per_s: f64,
        bf16_flops: f64,
        fp8_flops: f64,
        nvlink_bytes_per_s: f64,
        nvlink_domain_gpus: usize,
        nic_bytes_per_s: f64,
        gpus_per_node: usize,
        #[serde(default)]
        usd_per_gpu_hour: f64,
        #[serde(default)]
        source: String,
    }
    let f: File =
        toml::from_str(text).map_err(|e| SimError::Invalid(format!("hardware profile: {e}")))?;
    let rates = [
        ("hbm_bytes", f.hbm_bytes),
        ("hbm_bytes_per_s", f.hbm_bytes_per_s),
        ("bf16_flops", f.bf16_flops),
        ("fp8_flops", f.fp8_flops),
        ("nvlink_bytes_per_s", f.nvlink_bytes_per_s),
        ("nic_bytes_per_s", f.nic_bytes_per_s),
    ];
    if let Some((k, v)) = rates.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
        return Err(SimError::Invalid(format!(
            "hardware profile: {k} = {v} must be a positive number"
        )));
    }
    if f.nvlink_domain_gpus == 0 || f.gpus_per_node == 0 {
        return Err(SimError::Invalid(
            "hardware profile: nvlink_domain_gpus and gpus_per_node must be at least 1".into(),
        ));
    }
    Ok(Gpu {
        name: Box::leak(f.name.into_boxed_str()),
        hbm_bytes: f.hbm_bytes,
        hbm_bytes_per_s: f.hbm_bytes_per_s,
        bf16_flops: f.bf16_flops,
        fp8_flops: f.fp8_flops,
        nvlink_bytes_per_s: f.nvlink_bytes_per_s,
        nvlink_domain_gpus: f.nvlink_domain_gpus,
        nic_bytes_per_s: f.nic_bytes_per_s,
        gpus_per_node: f.gpus_per_node,
        usd_per_gpu_hour: f.usd_per_gpu_hour,
        source: Box::leak(f.source.into_boxed_str()),
    })
}

impl Gpu {
    /// The profile as [`from_toml`] reads it.
    pub fn to_toml(&self) -> String {
        format!(
            "# {}\nname = {:?}\nhbm_bytes = {:e}\nhbm_bytes_per_s = {:e}\nbf16_flops = {:e}\nfp8_flops = {:e}\n\
             nvlink_bytes_per_s = {:e}\nnvlink_domain_gpus = {}\nnic_bytes_per_s = {:e}\ngpus_per_node = {}\n\
             usd_per_gpu_hour = {:e}\nsource = {:?}\n",
            self.source,
            self.name,
            self.hbm_bytes,
            self.hbm_bytes_per_s,
            self.bf16_flops,
            self.fp8_flops,
            self.nvlink_bytes_per_s,
            self.nvlink_domain_gpus,
            self.nic_bytes_per_s,
            self.gpus_per_node,
            self.usd_per_gpu_hour,
            self.source,
        )
    }
}

/// The names `--gpu` accepts.
pub fn names() -> Vec<&'static str> {
    CATALOGUE.iter().map(|g| g.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup() {
        assert_eq!(gpu("H100-SXM").unwrap().name, "h100");
        assert_eq!(gpu("gb200_nvl72").unwrap().name, "gb200");
        assert!(gpu("tpu").is_none());
        for g in CATALOGUE {
            assert!(
                g.fp8_flops >= g.bf16_flops && g.hbm_bytes > 0.0,
                "{}",
                g.name
            );
        }
    }
}
