"""Build vidur-0.0.26-format compute profile CSVs (mlp.csv, attention.csv) for
meta-llama/Llama-2-7b-hf on A100, TP=1, from the real measurements transcribed
(median columns only, values unchanged) out of the microsoft/vidur repository:
  data/profiling/compute/a100/meta-llama/Llama-2-7b-hf/mlp.csv
      (microsoft/vidur @ bee57dafa1eb2dc422dcaec46a66975599a6a242)
  data/profiling/compute/a100/meta-llama/Llama-2-7b-hf/attention.csv
      (same path; copy read from sw5sh/cs378-assignment3 @ 7ac2fe9fb6cea9d4630659a10c5cccfc9fbdd776,
       a fork of microsoft/vidur; file not stored for microsoft/vidur in the index)
See profile/README.txt for exactly which rows were taken."""
import sys, os, numpy as np, pandas as pd
src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profile")
out = sys.argv[1]; os.makedirs(out, exist_ok=True)
m = pd.read_csv(f"{src}/mlp_medians.csv")
mlp = pd.DataFrame({"n_head": 32, "n_kv_head": 32, "n_embd": 4096, "n_expanded_embd": 11008,
                    "vocab_size": 32768, "use_gated_mlp": True, "num_tokens": m.num_tokens,
                    "num_tensor_parallel_workers": 1})
for op in ["input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
           "mlp_up_proj", "mlp_act", "mlp_down_proj", "add"]:
    mlp[f"time_stats.{op}.median"] = m[op]
mlp.to_csv(f"{out}/mlp.csv", index=False)
d = pd.read_csv(f"{src}/attn_decode.csv"); p = pd.read_csv(f"{src}/attn_prefill.csv")
base = dict(n_embd=4096, n_q_head=32, n_kv_head=32, block_size=16, num_tensor_parallel_workers=1, max_model_len=4096)
dec = pd.DataFrame(dict(base, batch_size=d.batch_size, prefill_chunk_size=0, kv_cache_size=d.kv_cache_size,
                        is_prefill=False, **{"time_stats.attn_decode.median": d.attn_decode_median,
                                             "time_stats.attn_prefill.median": np.nan}))
pre = pd.DataFrame(dict(base, batch_size=1, prefill_chunk_size=p.prefill_chunk_size, kv_cache_size=p.kv_cache_size,
                        is_prefill=True, **{"time_stats.attn_decode.median": np.nan,
                                            "time_stats.attn_prefill.median": p.attn_prefill_median}))
pd.concat([dec, pre]).to_csv(f"{out}/attention.csv", index=False)
print("wrote", out, len(mlp), "mlp rows,", len(dec), "decode rows,", len(pre), "prefill rows")
