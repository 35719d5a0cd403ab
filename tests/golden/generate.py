#!/usr/bin/env python3
"""Generate the HF-transformers golden fixtures for duet's Rust tests.

Usage (run by hand, from the repository root; nothing here is run by cargo):

    python3 -m venv /work/venv-golden            # any venv OUTSIDE the repo
    /work/venv-golden/bin/pip install torch 'transformers>=5' safetensors numpy jinja2
    /work/venv-golden/bin/python tests/golden/generate.py            # all fixtures
    /work/venv-golden/bin/python tests/golden/generate.py v3-tiny    # just one

Versions used to produce the committed fixtures:
    Python 3.11.7, torch 2.15.0 (+cu132 wheel, run on CPU only), transformers 5.23.0,
    safetensors 0.8.0, numpy 2.4.6, jinja2 3.1.6, tokenizers 0.23.3

It writes tests/golden/fixtures/<name>/ with
    config.json            hand-written in the layout of the RELEASED DeepSeek checkpoints
    *.safetensors          released tensor names (un-fused experts, MTP layer, FP8 + weight_scale_inv, ...)
    golden.json            input_ids, HF float64 logits for every prompt position, HF greedy continuation

Everything is deterministic: weights come from torch.Generator seeds; for each fixture the script walks
through seeds (starting at its base seed) until every sanity check passes (logit spread, distinct greedy
tokens, greedy top-2 margins, expert-routing margins, no EOS); the seed used is recorded in golden.json.

Reference computation: HF transformers' own DeepseekV3ForCausalLM / DeepseekV2ForCausalLM, loaded with
from_pretrained(fixture_dir, dtype=torch.float64, attn_implementation="eager", experts_implementation="eager")
on CPU, i.e. the released-layout files are read by HF's own loader (the FP8 fixture is first dequantised
(fp8 -> f64 * weight_scale_inv) into a temporary float64 copy, since HF's FP8 quantizer needs a GPU).
In addition an independent float64 re-implementation (`ref_forward`, written from HF_SEMANTICS.md and
reading the released names directly) must reproduce HF's logits; its max difference is recorded.
"""

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
OUT = HERE / "fixtures"
N_PROMPT = 24
N_NEW = 16

# ----------------------------------------------------------------------------------------------------------
# Fixture definitions (configs in released layout)
# ----------------------------------------------------------------------------------------------------------


def v3_config(fp8: bool) -> dict:
    c = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 96,
        "initializer_range": 0.02,
        "intermediate_size": 160,
        "kv_lora_rank": 32,
        "max_position_embeddings": 64,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 48,
        "moe_layer_freq": 1,
        "n_group": 4,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "num_nextn_predict_layers": 1,
        "pretraining_tp": 1,
        "q_lora_rank": 48,
        "qk_nope_head_dim": 24,
        "qk_rope_head_dim": 16,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 4,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
            "original_max_position_embeddings": 16,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": 24,
        "vocab_size": 512,
    }
    if fp8:
        c["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [32, 32],
        }
        # keep alphabetical order like the released file
        c = dict(sorted(c.items()))
    return c


def v2_config(grouped: bool) -> dict:
    c = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "kv_lora_rank": 32,
        "max_position_embeddings": 64,
        "model_type": "deepseek_v2",
        "moe_intermediate_size": 32,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 16,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_attention_heads": 4,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "pretraining_tp": 1,
        "q_lora_rank": None,
        "qk_nope_head_dim": 24,
        "qk_rope_head_dim": 16,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 4,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 16,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "greedy",
        "torch_dtype": "float32",
        "use_cache": True,
        "v_head_dim": 24,
        "vocab_size": 512,
    }
    if grouped:  # DeepSeek-V2 (236B)-style: q-LoRA, group_limited_greedy, routed_scaling_factor != 1
        c.update(
            {
                "ep_size": 1,
                "n_group": 4,
                "topk_group": 2,
                "q_lora_rank": 48,
                "topk_method": "group_limited_greedy",
                "routed_scaling_factor": 4.0,
                "torch_dtype": "float16",
            }
        )
        # With original_max 16 and beta 32/1 the yarn ramp is 0/1 only (low=0, high=1); these betas give
        # low=0, high=2, i.e. one pair with a fractional blend (ramp 0.5) so the blend formula is exercised.
        c["rope_scaling"] = dict(c["rope_scaling"], beta_fast=4, beta_slow=0.5)
        c = dict(sorted(c.items()))
    return c


def qwen2_config(tied: bool) -> dict:
    """Released R1-Distill-Qwen layout (its config.json's fields, incl. the inactive sliding-window settings)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 64,
        "max_window_layers": 3,
        "model_type": "qwen2",
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 64,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16" if tied else "float32",
        "use_cache": True,
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": 512,
    }


def llama3_config() -> dict:
    """Released R1-Distill-Llama layout: llama3 rope scaling (factor 8, low 1, high 4) from an original context of 32,
    so the 40 positions of a fixture run past it; head_dim 24 set explicitly (hidden 64 / 4 heads would be 16)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "head_dim": 24,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "num_key_value_heads": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 32,
            "rope_type": "llama3",
        },
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": 512,
    }


DENSE = ("qwen2", "llama")

FIXTURES = {
    # name: (config, storage dtype, fp8?, mtp?, shards, base seed)
    "v3-tiny": dict(config=v3_config(False), dtype=torch.bfloat16, fp8=False, shards=1, seed=1000),
    "v3-tiny-fp8": dict(config=v3_config(True), dtype=torch.bfloat16, fp8=True, shards=1, seed=1000),
    "v2-lite-tiny": dict(config=v2_config(False), dtype=torch.float32, fp8=False, shards=2, seed=2000),
    "v2-tiny-grouped": dict(config=v2_config(True), dtype=torch.float16, fp8=False, shards=1, seed=3000),
    # The R1 distillations' architectures.
    "qwen2-tiny-tied": dict(config=qwen2_config(True), dtype=torch.bfloat16, fp8=False, shards=1, seed=4000),
    "qwen2-tiny": dict(config=qwen2_config(False), dtype=torch.float32, fp8=False, shards=2, seed=5000),
    "llama3-tiny": dict(config=llama3_config(), dtype=torch.float16, fp8=False, shards=1, seed=6000),
    # The same checkpoints as transformers 5 writes them: routed experts fused (see fuse_experts), config.json from
    # DeepseekV3Config.to_json_string() (rope_parameters, dtype, ...), no MTP layer (HF drops it on load).
    "v3-tiny-fused": dict(config=v3_config(False), dtype=torch.bfloat16, fp8=False, shards=1, seed=1000, fused=True),
    "v3-tiny-fp8-fused": dict(config=v3_config(True), dtype=torch.bfloat16, fp8=True, shards=1, seed=1000,
                              fused=True),
}

# ----------------------------------------------------------------------------------------------------------
# Random weights with real magnitude, released tensor names
# ----------------------------------------------------------------------------------------------------------


def layer_tensor_specs(cfg: dict, i: int, moe: bool) -> list:
    """(name, shape, kind) for decoder layer i; kind selects the init and whether FP8 quantises it."""
    H, h = cfg["num_attention_heads"], cfg["hidden_size"]
    dn, dr, dv, C = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    p = f"model.layers.{i}."
    s = [(p + "input_layernorm.weight", (h,), "norm"), (p + "post_attention_layernorm.weight", (h,), "norm")]
    a = p + "self_attn."
    if cfg["q_lora_rank"] is None:
        s.append((a + "q_proj.weight", (H * (dn + dr), h), "linear"))
    else:
        r = cfg["q_lora_rank"]
        s += [
            (a + "q_a_proj.weight", (r, h), "linear"),
            (a + "q_a_layernorm.weight", (r,), "norm"),
            (a + "q_b_proj.weight", (H * (dn + dr), r), "linear"),
        ]
    s += [
        (a + "kv_a_proj_with_mqa.weight", (C + dr, h), "linear"),
        (a + "kv_a_layernorm.weight", (C,), "norm"),
        (a + "kv_b_proj.weight", (H * (dn + dv), C), "linear"),
        (a + "o_proj.weight", (h, H * dv), "linear"),
    ]
    m = p + "mlp."
    if not moe:
        I = cfg["intermediate_size"]
        s += [(m + "gate_proj.weight", (I, h), "linear"), (m + "up_proj.weight", (I, h), "linear"),
              (m + "down_proj.weight", (h, I), "linear")]
    else:
        E, mi = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        s.append((m + "gate.weight", (E, h), "router"))
        if cfg["model_type"] == "deepseek_v3":
            s.append((m + "gate.e_score_correction_bias", (E,), "bias"))
        for e in range(E):
            x = f"{m}experts.{e}."
            s += [(x + "gate_proj.weight", (mi, h), "linear"), (x + "up_proj.weight", (mi, h), "linear"),
                  (x + "down_proj.weight", (h, mi), "linear")]
        si = mi * cfg["n_shared_experts"]
        x = m + "shared_experts."
        s += [(x + "gate_proj.weight", (si, h), "linear"), (x + "up_proj.weight", (si, h), "linear"),
              (x + "down_proj.weight", (h, si), "linear")]
    return s


def dense_tensor_specs(cfg: dict) -> list:
    """Qwen2 / Llama names: q/k/v/o_proj (Qwen2: q/k/v biases), SwiGLU mlp, lm_head unless tied."""
    h, V, L, I = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // H
    # Tied: the embedding is also the output head; at std 1 a token's own embedding dominates the residual stream
    # and every greedy step repeats the last token, so a tied fixture's embedding is smaller (logits std still > 1).
    s = [("model.embed_tokens.weight", (V, h), "embed_tied" if cfg["tie_word_embeddings"] else "embed")]
    for i in range(L):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        s += [(p + "input_layernorm.weight", (h,), "norm"), (p + "post_attention_layernorm.weight", (h,), "norm")]
        s += [(a + "q_proj.weight", (H * d, h), "linear"), (a + "k_proj.weight", (KV * d, h), "linear"),
              (a + "v_proj.weight", (KV * d, h), "linear")]
        if cfg["model_type"] == "qwen2" or cfg.get("attention_bias"):
            s += [(a + "q_proj.bias", (H * d,), "attn_bias"), (a + "k_proj.bias", (KV * d,), "attn_bias"),
                  (a + "v_proj.bias", (KV * d,), "attn_bias")]
        s.append((a + "o_proj.weight", (h, H * d), "linear"))
        if cfg["model_type"] == "llama" and cfg.get("attention_bias"):
            s.append((a + "o_proj.bias", (h,), "attn_bias"))
        m = p + "mlp."
        s += [(m + "gate_proj.weight", (I, h), "linear"), (m + "up_proj.weight", (I, h), "linear"),
              (m + "down_proj.weight", (h, I), "linear")]
    s.append(("model.norm.weight", (h,), "norm"))
    if not cfg["tie_word_embeddings"]:
        s.append(("lm_head.weight", (V, h), "lm_head"))
    return s


def tensor_specs(cfg: dict) -> list:
    if cfg["model_type"] in DENSE:
        return dense_tensor_specs(cfg)
    h, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    s = [("model.embed_tokens.weight", (V, h), "embed")]
    for i in range(L):
        s += layer_tensor_specs(cfg, i, i >= cfg["first_k_dense_replace"])
    s += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (V, h), "lm_head")]
    for k in range(cfg.get("num_nextn_predict_layers", 0)):  # MTP layer(s), as released: model.layers.{L+k}.*
        p = f"model.layers.{L + k}."
        s += [(p + "embed_tokens.weight", (V, h), "embed"), (p + "enorm.weight", (h,), "norm"),
              (p + "hnorm.weight", (h,), "norm"), (p + "eh_proj.weight", (h, 2 * h), "mtp_linear")]
        s += layer_tensor_specs(cfg, L + k, True)
        s += [(p + "shared_head.norm.weight", (h,), "norm"), (p + "shared_head.head.weight", (V, h), "lm_head")]
    return s


def make_weights(cfg: dict, seed: int) -> dict:
    """float64 master weights (before storage rounding)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape, kind in tensor_specs(cfg):
        n = torch.randn(shape, generator=g, dtype=torch.float64)
        if kind == "embed":
            w = n
        elif kind == "embed_tied":
            w = 0.3 * n
        elif kind == "norm":
            w = 1.0 + 0.1 * n
        elif kind == "bias":
            w = 0.1 * n
        elif kind == "attn_bias":  # Qwen2's q/k/v biases are large in the released models; make them matter
            w = 0.5 * n
        elif kind == "router":
            w = n * (2.0 / math.sqrt(shape[1]))
        elif kind == "lm_head":
            w = n * (3.0 / math.sqrt(shape[1]))
        else:  # linear / mtp_linear
            w = n * (1.0 / math.sqrt(shape[1]))
        out[name] = (w, kind)
    return out


FP8_MAX = 448.0


def fp8_quantize(w: torch.Tensor, block: int):
    """DeepSeek block FP8: per [block x block] tile scale_inv = amax/448 (f32); q = w / scale_inv -> e4m3."""
    out_f, in_f = w.shape
    nb_o, nb_i = math.ceil(out_f / block), math.ceil(in_f / block)
    w32 = w.to(torch.float32)
    scale_inv = torch.empty(nb_o, nb_i, dtype=torch.float32)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    for bo in range(nb_o):
        for bi in range(nb_i):
            t = w32[bo * block:(bo + 1) * block, bi * block:(bi + 1) * block]
            s = (t.abs().max() / FP8_MAX).to(torch.float32)
            assert s > 0
            scale_inv[bo, bi] = s
            q[bo * block:(bo + 1) * block, bi * block:(bi + 1) * block] = (t / s).clamp(-FP8_MAX, FP8_MAX).to(
                torch.float8_e4m3fn)
    return q, scale_inv


def fp8_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: int) -> torch.Tensor:
    s = scale_inv.to(torch.float64).repeat_interleave(block, 0).repeat_interleave(block, 1)
    s = s[: q.shape[0], : q.shape[1]]
    return q.to(torch.float64) * s


def build_storage(fx: dict, master: dict):
    """Returns (tensors to write in released layout, float64 dequantised/upcast values by released name)."""
    cfg = fx["config"]
    store, f64 = {}, {}
    block = cfg.get("quantization_config", {}).get("weight_block_size", [None])[0]
    for name, (w, kind) in master.items():
        if kind == "bias":  # e_score_correction_bias is F32 in the released checkpoints
            t = w.to(torch.float32)
            store[name] = t
            f64[name] = t.to(torch.float64)
        elif fx["fp8"] and kind == "linear":  # attention projections, dense MLP, experts, shared experts
            q, si = fp8_quantize(w, block)
            store[name] = q
            store[name + "_scale_inv"] = si
            f64[name] = fp8_dequantize(q, si, block)
        else:  # embed, lm_head, norms, router weight, MTP eh_proj/head: storage dtype (bf16 as released)
            t = w.to(fx["dtype"])
            store[name] = t
            f64[name] = t.to(torch.float64)
    return store, f64


def fuse_experts(cfg: dict, tensors: dict) -> dict:
    """Released per-expert tensors -> transformers 5's fused layout (DeepseekV3NaiveMoe / FP8Experts parameters):
    mlp.experts.gate_up_proj [E, 2*I, H] (expert e: its gate_proj rows, then its up_proj rows) and
    mlp.experts.down_proj [E, H, I], stacked from the very same stored values; MTP layers dropped. FP8 scales of the
    fused tensors are made by fp8_fused_scales (blocks run over the fused rows), not here."""
    L, E = cfg["num_hidden_layers"], cfg["n_routed_experts"]
    out = {n: t for n, t in tensors.items() if not n.startswith(f"model.layers.{L}.")}
    for i in range(cfg["first_k_dense_replace"], L):
        m = f"model.layers.{i}.mlp.experts."
        names = [f"{m}{e}.{p}_proj.weight" for e in range(E) for p in ("gate", "up", "down")]
        ts = {n: out.pop(n) for n in names}
        for n in list(out):
            if n.startswith(m) and n.endswith("_scale_inv"):
                del out[n]
        out[m + "gate_up_proj"] = torch.stack(
            [torch.cat([ts[f"{m}{e}.gate_proj.weight"], ts[f"{m}{e}.up_proj.weight"]]) for e in range(E)])
        out[m + "down_proj"] = torch.stack([ts[f"{m}{e}.down_proj.weight"] for e in range(E)])
    return out


def unfuse_experts(cfg: dict, tensors: dict) -> dict:
    """The inverse of fuse_experts for float64 values (ref_forward reads released names)."""
    L, E, I = cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    out = dict(tensors)
    for i in range(cfg["first_k_dense_replace"], L):
        m = f"model.layers.{i}.mlp.experts."
        gu, dn = out.pop(m + "gate_up_proj"), out.pop(m + "down_proj")
        for e in range(E):
            out[f"{m}{e}.gate_proj.weight"], out[f"{m}{e}.up_proj.weight"] = gu[e, :I], gu[e, I:]
            out[f"{m}{e}.down_proj.weight"] = dn[e]
    return out


def build_fused_storage(fx: dict, master: dict):
    """build_storage in transformers 5's fused layout. Unquantised: the released stored values, stacked (exactly the
    same weights as the per-expert fixture). FP8: every expert's [2I, H] gate_up is quantised as one matrix, blocks
    over the fused rows (gate_up_proj_scale_inv [E, ceil(2I/b), ceil(H/b)], as FP8Experts allocates it; with I=48 and
    b=32 the middle block straddles gate and up rows); down_proj quantised per expert as released."""
    cfg = fx["config"]
    store, f64 = build_storage(fx, master)
    fused_store, fused_f64 = fuse_experts(cfg, store), fuse_experts(cfg, f64)
    if fx["fp8"]:
        block = cfg["quantization_config"]["weight_block_size"][0]
        for i in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
            m = f"model.layers.{i}.mlp.experts."
            for proj in ("gate_up_proj", "down_proj"):
                w = fused_master(cfg, master, i, proj)
                qs = [fp8_quantize(w[e], block) for e in range(w.shape[0])]
                fused_store[m + proj] = torch.stack([q for q, _ in qs])
                fused_store[m + proj + "_scale_inv"] = torch.stack([si for _, si in qs])
                fused_f64[m + proj] = torch.stack([fp8_dequantize(q, si, block) for q, si in qs])
    return fused_store, unfuse_experts(cfg, fused_f64)


def fused_master(cfg: dict, master: dict, i: int, proj: str) -> torch.Tensor:
    m, E = f"model.layers.{i}.mlp.experts.", cfg["n_routed_experts"]
    if proj == "down_proj":
        return torch.stack([master[f"{m}{e}.down_proj.weight"][0] for e in range(E)])
    return torch.stack([torch.cat([master[f"{m}{e}.gate_proj.weight"][0], master[f"{m}{e}.up_proj.weight"][0]])
                        for e in range(E)])


def config_text(fx: dict) -> str:
    """config.json: the released layout, or (fused fixtures) what transformers 5's save_pretrained writes."""
    if not fx.get("fused"):
        return json.dumps(fx["config"], indent=2) + "\n"
    cls = (transformers.DeepseekV3Config if fx["config"]["model_type"] == "deepseek_v3"
           else transformers.DeepseekV2Config)
    return cls(**fx["config"]).to_json_string(use_diff=True)


def write_fixture_files(d: Path, fx: dict, store: dict):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(config_text(fx))
    names = list(store.keys())  # spec order: embed, layers..., norm, lm_head, MTP
    if fx["shards"] == 1:
        save_file({n: store[n].contiguous() for n in names}, str(d / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(d / "model.safetensors", 0o644)
        return
    n_sh = fx["shards"]
    L = fx["config"]["num_hidden_layers"]
    # split by layer like HF's sharding: embed + first layers in shard 1, the rest + norm + lm_head in the last
    def shard_of(n):
        if n.startswith("model.layers."):
            return min(int(n.split(".")[2]) * n_sh // L, n_sh - 1)
        return 0 if n == "model.embed_tokens.weight" else n_sh - 1
    weight_map, total = {}, 0
    for s in range(n_sh):
        fname = f"model-{s + 1:05d}-of-{n_sh:05d}.safetensors"
        part = {n: store[n].contiguous() for n in names if shard_of(n) == s}
        save_file(part, str(d / fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# HF reference
# ----------------------------------------------------------------------------------------------------------


HF_CLASSES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def hf_load(model_dir: Path, cfg: dict):
    cls = getattr(transformers, HF_CLASSES[cfg["model_type"]])
    extra = {} if cfg["model_type"] in DENSE else {"experts_implementation": "eager"}
    model, info = cls.from_pretrained(str(model_dir), dtype=torch.float64, attn_implementation="eager",
                                      output_loading_info=True, **extra)
    model.eval()
    L = cfg["num_hidden_layers"]
    assert not info["missing_keys"], info["missing_keys"]
    fused = any(k.endswith("mlp.experts.gate_up_proj") for k in load_file(str(next(model_dir.glob("*.safetensors")))))
    assert not (fused and info["unexpected_keys"]), info["unexpected_keys"]
    bad = [k for k in info["unexpected_keys"] if not k.startswith(f"model.layers.{L}.")]
    assert not bad, bad
    assert not info.get("mismatched_keys"), info["mismatched_keys"]
    return model


def hf_dir_for(fixture_dir: Path, fx: dict, f64: dict, tmp: Path) -> Path:
    """Directory HF loads from: the fixture itself, or (FP8) a float64 dequantised copy without quant config."""
    if not fx["fp8"]:
        return fixture_dir
    cfg = dict(fx["config"])
    del cfg["quantization_config"]
    cfg["torch_dtype"] = "float64"
    (tmp / "config.json").write_text(json.dumps(cfg))
    if fx.get("fused"):  # HF reads the fused layout here too
        f64 = fuse_experts(cfg, f64)
    save_file({k: v.contiguous() for k, v in f64.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return tmp


# ----------------------------------------------------------------------------------------------------------
# Independent float64 reference (from HF_SEMANTICS.md), also used for routing margins
# ----------------------------------------------------------------------------------------------------------


def rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def yarn(cfg):
    rs = cfg["rope_scaling"]
    dim, base, f = cfg["qk_rope_head_dim"], float(cfg["rope_theta"]), float(rs["factor"])
    om, bf, bs = rs["original_max_position_embeddings"], rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    gm = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extrap, interp = 1.0 / pos_freqs, 1.0 / (f * pos_freqs)
    cd = lambda r: dim * math.log(om / (r * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(cd(bf)), 0), min(math.ceil(cd(bs)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    ef = 1 - ramp
    inv_freq = interp * (1 - ef) + extrap * ef
    ms, msa = rs.get("mscale"), rs.get("mscale_all_dim")
    af = gm(f, ms) / gm(f, msa) if (ms and msa) else gm(f)
    scale = (cfg["qk_nope_head_dim"] + dim) ** -0.5
    if msa:
        scale *= gm(f, msa) ** 2
    return inv_freq, af, scale


def rope_interleaved(x, ang, af):
    # pairs (2i, 2i+1) rotated by ang[..., i]; output kept interleaved (dot products equal HF's de-interleaved one)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = torch.cos(ang) * af, torch.sin(ang) * af
    return torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)


def llama3_inv_freq(cfg: dict, dim: int) -> torch.Tensor:
    base = float(cfg["rope_theta"])
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    rs = cfg.get("rope_scaling")
    if not rs:
        return inv
    assert rs["rope_type"] == "llama3"
    f, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    out = []
    for x in inv.tolist():
        wl = 2 * math.pi / x
        if wl < old / hi:
            out.append(x)
        elif wl > old / lo:
            out.append(x / f)
        else:
            sm = (old / wl - lo) / (hi - lo)
            out.append((1 - sm) * x / f + sm * x)
    return torch.tensor(out, dtype=torch.float64)


def ref_forward_dense(cfg: dict, W: dict, ids: list) -> torch.Tensor:
    """Qwen2 / Llama in float64: GQA (query head h reads kv head h // (H/KV)), rotate-half rope, biases, SwiGLU."""
    T, h = len(ids), cfg["hidden_size"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // H
    eps = cfg["rms_norm_eps"]
    ang = torch.arange(T, dtype=torch.float64)[:, None] * llama3_inv_freq(cfg, d)[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)  # [T, d]
    rot = lambda x: torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    rope = lambda x: x * cos[:, None, :] + rot(x) * sin[:, None, :]
    lin = lambda x, n: x @ W[n + ".weight"].T + (W[n + ".bias"] if n + ".bias" in W else 0)
    x = W["model.embed_tokens.weight"][torch.tensor(ids)]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        hN = rms(x, W[p + "input_layernorm.weight"], eps)
        q = rope(lin(hN, a + "q_proj").view(T, H, d))
        k = rope(lin(hN, a + "k_proj").view(T, KV, d)).repeat_interleave(H // KV, dim=1)
        v = lin(hN, a + "v_proj").view(T, KV, d).repeat_interleave(H // KV, dim=1)
        pr = torch.softmax(torch.einsum("thd,shd->hts", q, k) * d ** -0.5 + mask, dim=-1)
        x = x + lin(torch.einsum("hts,shd->thd", pr, v).reshape(T, H * d), a + "o_proj")
        hN = rms(x, W[p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."
        x = x + lin(torch.nn.functional.silu(lin(hN, m + "gate_proj")) * lin(hN, m + "up_proj"), m + "down_proj")
    head = W["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W["lm_head.weight"]
    return rms(x, W["model.norm.weight"], eps) @ head.T


def ref_forward(cfg: dict, W: dict, ids: list, margins: list):
    """Full causal forward over ids (no cache). Appends per-token routing margins to `margins`."""
    if cfg["model_type"] in DENSE:
        return ref_forward_dense(cfg, W, ids)
    T = len(ids)
    H, dn, dr, dv, C = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                        cfg["v_head_dim"], cfg["kv_lora_rank"])
    eps = cfg["rms_norm_eps"]
    v3 = cfg["model_type"] == "deepseek_v3"
    inv_freq, af, scale = yarn(cfg)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [T, dr/2]
    lin = lambda x, n: x @ W[n].T
    mlp = lambda x, p: lin(torch.nn.functional.silu(lin(x, p + "gate_proj.weight")) * lin(x, p + "up_proj.weight"),
                           p + "down_proj.weight")
    x = W["model.embed_tokens.weight"][torch.tensor(ids)]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        hN = rms(x, W[p + "input_layernorm.weight"], eps)
        if cfg["q_lora_rank"] is None:
            q = lin(hN, a + "q_proj.weight")
        else:
            q = lin(rms(lin(hN, a + "q_a_proj.weight"), W[a + "q_a_layernorm.weight"], 1e-6), a + "q_b_proj.weight")
        q = q.view(T, H, dn + dr)
        q_nope, q_pe = q[..., :dn], q[..., dn:]
        ckv = lin(hN, a + "kv_a_proj_with_mqa.weight")
        c_kv, k_pe = rms(ckv[:, :C], W[a + "kv_a_layernorm.weight"], 1e-6), ckv[:, C:]
        q_pe = rope_interleaved(q_pe, ang[:, None, :], af)
        k_pe = rope_interleaved(k_pe, ang, af)
        kv = lin(c_kv, a + "kv_b_proj.weight").view(T, H, dn + dv)
        k_nope, v = kv[..., :dn], kv[..., dn:]
        s = (torch.einsum("thd,shd->hts", q_nope, k_nope) + torch.einsum("thd,sd->hts", q_pe, k_pe)) * scale
        pr = torch.softmax(s + mask, dim=-1)
        o = torch.einsum("hts,shd->thd", pr, v).reshape(T, H * dv)
        x = x + lin(o, a + "o_proj.weight")
        hN = rms(x, W[p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."
        if i < cfg["first_k_dense_replace"]:
            x = x + mlp(hN, m)
            continue
        E, K = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
        ng, tg = cfg["n_group"], cfg["topk_group"]
        logits = lin(hN, m + "gate.weight")
        if v3:
            sc = torch.sigmoid(logits)
            sel = sc + W[m + "gate.e_score_correction_bias"]
            gs = sel.view(T, ng, E // ng).topk(2, dim=-1).values.sum(-1)
        else:
            sc = torch.softmax(logits, dim=-1)
            sel = sc.clone()
            gs = sel.view(T, ng, E // ng).max(-1).values
        gsort = gs.sort(-1, descending=True).values
        gmargin = (gsort[:, tg - 1] - gsort[:, tg]) if tg < ng else torch.full((T,), float("inf"))
        keep = torch.zeros(T, ng, dtype=torch.bool)
        keep.scatter_(1, gs.topk(tg, dim=-1).indices, True)
        sel = sel.masked_fill(~keep.repeat_interleave(E // ng, 1), float("-inf"))
        ssort = sel.sort(-1, descending=True).values
        emargin = ssort[:, K - 1] - ssort[:, K]
        idx = sel.topk(K, dim=-1).indices
        w = sc.gather(1, idx)
        if v3 and cfg["norm_topk_prob"]:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * cfg["routed_scaling_factor"]
        for t in range(T):
            margins.append((i, t, float(gmargin[t]), float(emargin[t])))
        y = mlp(hN, m + "shared_experts.")
        for t in range(T):
            for k in range(K):
                y[t] += w[t, k] * mlp(hN[t:t + 1], f"{m}experts.{int(idx[t, k])}.")[0]
        x = x + y
    return lin(rms(x, W["model.norm.weight"], eps), "lm_head.weight")


# ----------------------------------------------------------------------------------------------------------


def attempt(name: str, fx: dict, seed: int, workdir: Path):
    cfg = fx["config"]
    master = make_weights(cfg, seed)
    store, f64 = (build_fused_storage if fx.get("fused") else build_storage)(fx, master)
    fdir = workdir / name
    if fdir.exists():
        shutil.rmtree(fdir)
    write_fixture_files(fdir, fx, store)
    g = torch.Generator().manual_seed(seed + 7)
    ids = [cfg["bos_token_id"]] + torch.randint(2, cfg["vocab_size"], (N_PROMPT - 1,), generator=g).tolist()

    with tempfile.TemporaryDirectory() as tmp:
        model = hf_load(hf_dir_for(fdir, fx, f64, Path(tmp)), cfg)
    inp = torch.tensor([ids])
    with torch.no_grad():
        logits = model(inp).logits[0]  # [24, V] float64
        gen = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False, max_new_tokens=N_NEW,
                             pad_token_id=cfg["eos_token_id"])
        greedy = gen[0, N_PROMPT:].tolist()
        full = ids + greedy
        full_logits = model(torch.tensor([full[:-1]])).logits[0]
    assert logits.dtype == torch.float64

    problems = []
    if len(greedy) != N_NEW:
        problems.append(f"generation stopped early ({len(greedy)} tokens, EOS?)")
    std = logits.std(dim=-1)
    if not bool((std > 1).all()):
        problems.append(f"logit std too small: {std.min():.3f}")
    if len(set(greedy)) < 4:
        problems.append(f"greedy tokens not diverse: {greedy}")
    steps = []
    for j in range(len(greedy)):
        row = full_logits[N_PROMPT - 1 + j]
        top = row.topk(2)
        if int(top.indices[0]) != greedy[j]:
            problems.append(f"step {j}: full-forward argmax {int(top.indices[0])} != generate {greedy[j]}")
        margin = float(top.values[0] - top.values[1])
        steps.append((greedy[j], margin, float(top.values[0])))
        if margin < max(0.05, 5e-3 * abs(float(top.values[0]))):
            problems.append(f"step {j}: small top-2 margin {margin:.4g}")

    # independent float64 implementation: logits + routing margins over prompt + generated tokens
    margins = []
    with torch.no_grad():
        ref_full = ref_forward(cfg, f64, full[:-1], margins)
    ref_diff = float((ref_full - full_logits).abs().max())
    ref_rel = ref_diff / float(full_logits.abs().max())
    if ref_rel > 1e-5:
        problems.append(f"independent reference disagrees with HF: max abs diff {ref_diff:.3g}")
    min_g = min((m[2] for m in margins), default=float("inf"))  # dense models route nothing
    min_e = min((m[3] for m in margins), default=float("inf"))
    if min_g < 1e-4 or min_e < 1e-4:
        problems.append(f"routing margin too small: group {min_g:.3g}, expert {min_e:.3g}")
    # prefill vs cached path consistency (prefix logits must match the 24-token forward)
    pre_diff = float((full_logits[:N_PROMPT] - logits).abs().max())
    if pre_diff > 1e-9:
        problems.append(f"prefix logits differ between 24- and 39-token forwards: {pre_diff:.3g}")
    stats = dict(std_min=float(std.min()), std_max=float(std.max()), steps=steps, ref_diff=ref_diff,
                 min_group_margin=min_g, min_expert_margin=min_e, n_moe_tokens=len(margins))
    return problems, ids, logits, greedy, stats, fdir


def write_hf5_config(name: str, fx: dict):
    """hf5-configs/<name>.json: the dense fixture's config.json as transformers 5's save_pretrained writes it
    (rope_parameters, layer_types, dtype, ...), for the test that both config layouts load the same model."""
    cls = getattr(transformers, HF_CLASSES[fx["config"]["model_type"]].replace("ForCausalLM", "Config"))
    d = HERE / "hf5-configs"
    d.mkdir(exist_ok=True)
    (d / f"{name}.json").write_text(cls(**fx["config"]).to_json_string(use_diff=True))


def main(argv):
    names = argv[1:] or list(FIXTURES)
    transformers.logging.set_verbosity_error()  # MTP tensors are reported as UNEXPECTED (expected: HF drops them)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        fx = FIXTURES[name]
        with tempfile.TemporaryDirectory() as wd:
            for seed in range(fx["seed"], fx["seed"] + 60):
                problems, ids, logits, greedy, st, fdir = attempt(name, fx, seed, Path(wd))
                if not problems:
                    break
                print(f"[{name}] seed {seed} rejected: {problems[:3]}")
            else:
                raise SystemExit(f"{name}: no acceptable seed found")
            final = OUT / name
            if final.exists():
                shutil.rmtree(final)
            shutil.copytree(fdir, final)
        cfg = fx["config"]
        golden = {
            "input_ids": ids,
            "logits": [[float(v) for v in row] for row in logits.tolist()],
            "greedy_prompt_ids": ids,
            "greedy_ids": greedy,
            "greedy_top2_margins": [m for _, m, _ in st["steps"]],
            "seed": seed,
            "reference": (
                f"HF transformers {transformers.__version__} (torch {torch.__version__}, CPU) "
                f"{cfg['architectures'][0]}.from_pretrained(dtype=torch.float64, attn_implementation='eager'"
                + ("" if cfg["model_type"] in DENSE else ", experts_implementation='eager'")
                + ") on the files of this directory"
                + (" (FP8 weights dequantised as fp8->f64 * weight_scale_inv into a float64 copy first)" if fx["fp8"]
                   else f" (stored {str(fx['dtype']).replace('torch.', '')} values upcast exactly to float64)")
                + (" Routed experts stored fused as transformers 5 does (mlp.experts.gate_up_proj [E, 2I, H], "
                   "down_proj [E, H, I]" + (", FP8 blocks over the fused rows" if fx["fp8"] else
                                            ": the stacked values of the per-expert fixture") +
                   "), read by HF as such." if fx.get("fused") else "")
                + ". logits: model(input_ids).logits[0], every prompt position, float64 (repr). greedy_ids: "
                  f"model.generate(input_ids, do_sample=False, max_new_tokens={N_NEW}) (HF's naive cached path, "
                  "float64). HF keeps float32 islands in a float64 model (RMSNorm, router, attention softmax, "
                  "rope cos/sin), so these are float64 only to ~1e-6 relative: an independent pure-float64 "
                  f"re-implementation differs by at most {st['ref_diff']:.3g} (abs) on the 39-token forward. "
                + ("Dense model: no routing." if cfg["model_type"] in DENSE else
                   f"MoE routing margins over prompt+generated tokens: min group-selection margin "
                   f"{st['min_group_margin']:.3g}, min k-th vs (k+1)-th expert score margin "
                   f"{st['min_expert_margin']:.3g}.")
            ),
        }
        (final / "golden.json").write_text(json.dumps(golden) + "\n")
        size = sum(p.stat().st_size for p in final.iterdir())
        print(f"[{name}] seed {seed}: logits std {st['std_min']:.2f}..{st['std_max']:.2f}, "
              f"ref-vs-HF max |diff| {st['ref_diff']:.3g}, min routing margins group {st['min_group_margin']:.3g} "
              f"expert {st['min_expert_margin']:.3g}, size {size / 1e6:.2f} MB")
        print(f"[{name}] greedy: {greedy}")
        print(f"[{name}] top-2 margins: " + " ".join(f"{m:.3f}" for _, m, _ in st["steps"]))
        if cfg["model_type"] in DENSE:
            write_hf5_config(name, fx)


if __name__ == "__main__":
    main(sys.argv)
