//! SwiGLU feed-forward weights (`down(silu(gate(x)) · up(x))`): dense MLPs, DeepSeek's shared
//! experts, and its routed experts in either checkpoint layout.
//!
//! Routed experts come in two layouts, detected per layer from the tensor names:
//! - **released** (DeepSeek's checkpoints, transformers 4): `mlp.experts.{e}.gate_proj.weight`
//!   `[I, H]`, `up_proj.weight` `[I, H]`, `down_proj.weight` `[H, I]` per expert, FP8 scales in
//!   `weight_scale_inv` beside each;
//! - **fused** (transformers 5's `save_pretrained`): `mlp.experts.gate_up_proj` `[E, 2I, H]`, each
//!   expert's gate rows then its up rows, and `mlp.experts.down_proj` `[E, H, I]`; FP8 scales in
//!   `gate_up_proj_scale_inv` `[E, ⌈2I/b⌉, ⌈H/b⌉]` and `down_proj_scale_inv` `[E, ⌈H/b⌉, ⌈I/b⌉]`
//!   (transformers' `FP8Experts`), whose blocks run over the fused rows.
//!
//! Both load to the same [`Ffn`] per expert (gate and up stacked as one `[2I, H]` weight), and
//! both can load any subset of the experts, reading only those experts' bytes: what an expert-
//! parallel worker holding a shard of them needs.

use duet_kernels::{Tensor, ops};

use crate::loader::TensorSource;
use crate::{Error, Result};

pub(crate) struct Ffn {
    /// `gate_proj` and `up_proj` stacked: one matmul gives `[gate | up]`.
    pub gate_up: Tensor,
    pub down: Tensor,
}

impl Ffn {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = ops::matmul(x, &self.gate_up)?;
        let h = ops::silu_mul(&gu)?;
        Ok(ops::matmul(&h, &self.down)?)
    }

    pub fn size_bytes(&self) -> usize {
        self.gate_up.size_bytes() + self.down.size_bytes()
    }
}

/// A dense MLP or shared expert: `{prefix}.{gate,up,down}_proj.weight`.
pub(crate) fn load_ffn(
    src: &TensorSource<'_>,
    prefix: &str,
    hidden: usize,
    inter: usize,
) -> Result<Ffn> {
    let mut gu = src.f32_values(&format!("{prefix}.gate_proj.weight"), &[inter, hidden])?;
    gu.extend(src.f32_values(&format!("{prefix}.up_proj.weight"), &[inter, hidden])?);
    Ok(Ffn {
        gate_up: Tensor::from_f32_as(&[2 * inter, hidden], gu, src.dtype, src.device)?,
        down: src.weight(&format!("{prefix}.down_proj.weight"), &[hidden, inter])?,
    })
}

/// How a layer's routed experts are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExpertLayout {
    /// One set of tensors per expert, as DeepSeek released them.
    PerExpert,
    /// transformers 5's stacked `gate_up_proj` / `down_proj`.
    Fused,
}

/// The shape of one MoE layer's routed experts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExpertShape {
    pub experts: usize,
    pub hidden: usize,
    pub inter: usize,
}

/// Which layout `{mlp}.experts` (`mlp` = `model.layers.N.mlp`) is stored in, judged by the
/// tensors present for expert `probe` (the first one a caller wants).
pub(crate) fn expert_layout(
    src: &TensorSource<'_>,
    mlp: &str,
    probe: usize,
) -> Result<ExpertLayout> {
    let per_expert = format!("{mlp}.experts.{probe}.gate_proj.weight");
    let fused = format!("{mlp}.experts.gate_up_proj");
    match (src.contains(&per_expert), src.contains(&fused)) {
        (true, false) => Ok(ExpertLayout::PerExpert),
        (false, true) => Ok(ExpertLayout::Fused),
        (present, _) => Err(Error::ExpertLayout {
            file: src.dir().to_path_buf(),
            detail: if present {
                format!(
                    "both {per_expert} (per-expert layout) and {fused} (fused layout) are present; a checkpoint holds one layout"
                )
            } else {
                format!(
                    "no routed experts: neither {per_expert} (released per-expert layout) nor {fused} + {mlp}.experts.down_proj (transformers 5 fused layout) is present"
                )
            },
        }),
    }
}

/// Routed experts `ids` of `{mlp}.experts`, in the order given, from whichever layout the
/// checkpoint uses.
pub(crate) fn load_experts(
    src: &TensorSource<'_>,
    mlp: &str,
    shape: ExpertShape,
    ids: &[usize],
) -> Result<Vec<Ffn>> {
    let Some(&probe) = ids.first() else {
        return Ok(Vec::new());
    };
    let ExpertShape {
        experts,
        hidden,
        inter,
    } = shape;
    if let Some(&e) = ids.iter().find(|&&e| e >= experts) {
        return Err(Error::Invalid(format!(
            "expert {e} requested of a layer with {experts}"
        )));
    }
    match expert_layout(src, mlp, probe)? {
        ExpertLayout::PerExpert => ids
            .iter()
            .map(|e| load_ffn(src, &format!("{mlp}.experts.{e}"), hidden, inter))
            .collect(),
        ExpertLayout::Fused => {
            let gate_up = format!("{mlp}.experts.gate_up_proj");
            let down = format!("{mlp}.experts.down_proj");
            ids.iter()
                .map(|&e| {
                    let gu = src.f32_values_at(&gate_up, &[experts, 2 * inter, hidden], e)?;
                    let d = src.f32_values_at(&down, &[experts, hidden, inter], e)?;
                    Ok(Ffn {
                        gate_up: Tensor::from_f32_as(
                            &[2 * inter, hidden],
                            gu,
                            src.dtype,
                            src.device,
                        )?,
                        down: Tensor::from_f32_as(&[hidden, inter], d, src.dtype, src.device)?,
                    })
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use duet_kernels::{DType, Device};

    use super::*;
    use crate::loader::Mapped;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/golden/fixtures")
            .join(name)
    }

    /// Experts `ids` of layer 1 of a fixture (hidden 96, 16 experts × 48), as host values.
    fn experts(name: &str, ids: &[usize], block: Option<(usize, usize)>) -> Vec<Vec<f32>> {
        let dir = fixture(name);
        let mapped = Mapped::open(&dir).unwrap();
        let src =
            TensorSource::new(&dir, &mapped, block, DType::F32, Device::Cpu, &|_| {}).unwrap();
        let shape = ExpertShape {
            experts: 16,
            hidden: 96,
            inter: 48,
        };
        load_experts(&src, "model.layers.1.mlp", shape, ids)
            .unwrap()
            .iter()
            .map(|f| [f.gate_up.to_vec_f32(), f.down.to_vec_f32()].concat())
            .collect()
    }

    #[test]
    fn fused_and_per_expert_layouts_load_the_same_weights() {
        let all: Vec<usize> = (0..16).collect();
        assert_eq!(
            experts("v3-tiny", &all, None),
            experts("v3-tiny-fused", &all, None)
        );
    }

    #[test]
    fn a_subset_of_experts_loads_as_in_the_full_load() {
        for (name, block) in [
            ("v3-tiny", None),
            ("v3-tiny-fused", None),
            ("v3-tiny-fp8", Some((32, 32))),
            ("v3-tiny-fp8-fused", Some((32, 32))),
        ] {
            let all = experts(name, &(0..16).collect::<Vec<_>>(), block);
            let some = experts(name, &[11, 3], block);
            assert_eq!(some, [all[11].clone(), all[3].clone()], "{name}");
        }
    }

    #[test]
    fn layouts_are_told_apart_and_an_expert_outside_the_layer_is_an_error() {
        let dir = fixture("v3-tiny-fused");
        let mapped = Mapped::open(&dir).unwrap();
        let src = TensorSource::new(&dir, &mapped, None, DType::F32, Device::Cpu, &|_| {}).unwrap();
        assert_eq!(
            expert_layout(&src, "model.layers.2.mlp", 0).unwrap(),
            ExpertLayout::Fused
        );
        let err = expert_layout(&src, "model.layers.0.mlp", 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.layers.0.mlp.experts.0.gate_proj.weight")
                && err.contains("model.layers.0.mlp.experts.gate_up_proj"),
            "{err}"
        );
        let shape = ExpertShape {
            experts: 16,
            hidden: 96,
            inter: 48,
        };
        assert!(load_experts(&src, "model.layers.1.mlp", shape, &[16]).is_err());
    }
}
