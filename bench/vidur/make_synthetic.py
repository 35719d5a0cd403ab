"""Synthetic roofline profile for Llama-2-7b on A100 (TP=1), in the exact CSV
columns that vidur 0.0.26's SklearnExecutionTimePredictor reads.
Only used as a fallback / for pipeline validation."""
import sys, os, numpy as np, pandas as pd
out = sys.argv[1]; os.makedirs(out, exist_ok=True)
PEAK, BW, OVH = 312e12*0.6, 2.0e12*0.8, 0.005  # flop/s, byte/s, ms launch overhead
H, F, NH, V = 4096, 11008, 32, 32768
def t(flops, bytes_):  # ms
    return max(flops/PEAK, bytes_/BW)*1e3 + OVH
rows = []
for n in list(range(1, 128)) + list(range(128, 4097, 32)):
    r = dict(n_head=NH, n_kv_head=NH, n_embd=H, n_expanded_embd=F, vocab_size=V,
             use_gated_mlp=True, num_tokens=n, num_tensor_parallel_workers=1)
    gemm = lambda k, m: t(2*n*k*m, 2*(k*m + n*k + n*m))
    ew = lambda nbytes: t(0, nbytes)
    r["time_stats.attn_pre_proj.median"] = gemm(H, 3*H)
    r["time_stats.attn_post_proj.median"] = gemm(H, H)
    r["time_stats.mlp_up_proj.median"] = gemm(H, 2*F)
    r["time_stats.mlp_down_proj.median"] = gemm(F, H)
    r["time_stats.mlp_act.median"] = ew(2*n*3*F)
    r["time_stats.input_layernorm.median"] = ew(2*n*2*H)
    r["time_stats.post_attention_layernorm.median"] = ew(2*n*2*H)
    r["time_stats.attn_rope.median"] = ew(2*n*4*H)
    r["time_stats.add.median"] = ew(2*n*3*H)
    rows.append(r)
pd.DataFrame(rows).to_csv(f"{out}/mlp.csv", index=False)
rows = []
base = dict(n_embd=H, n_q_head=NH, n_kv_head=NH, block_size=16, num_tensor_parallel_workers=1, max_model_len=4096)
for kv in range(0, 4097, 256):
    for b in [1, 2, 4, 8, 16, 32, 48, 64, 96, 128]:
        if kv == 0: continue
        rows.append(dict(base, batch_size=b, prefill_chunk_size=0, kv_cache_size=kv, is_prefill=False,
                         **{"time_stats.attn_decode.median": t(4*b*kv*H, 2*2*b*kv*H),
                            "time_stats.attn_prefill.median": np.nan,
                            "time_stats.attn_kv_cache_save.median": t(0, 2*2*b*H)}))
    for c in [32, 64, 128, 256, 512, 1024, 2048, 4096]:
        if kv + c > 4096: continue
        rows.append(dict(base, batch_size=1, prefill_chunk_size=c, kv_cache_size=kv, is_prefill=True,
                         **{"time_stats.attn_decode.median": np.nan,
                            "time_stats.attn_prefill.median": t(4*c*(kv + c/2)*H, 2*2*(kv+c)*H + 2*2*c*H),
                            "time_stats.attn_kv_cache_save.median": t(0, 2*2*c*H)}))
pd.DataFrame(rows).to_csv(f"{out}/attention.csv", index=False)
print("wrote", out)
