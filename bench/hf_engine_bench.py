#!/usr/bin/env python3
"""HF transformers side of `duet engine-bench`: the same measurements, on the same checkpoint.

Usage:

    python bench/hf_engine_bench.py --model DIR [--dtype f32|bf16] [--prompt-len 512] [--batches 1,16]
        [--decode-context 128] [--decode-steps 16] [--repeats 2] [--threads N] [--json]
        [--attn-impl eager|sdpa] [--experts-impl grouped_mm|eager|batched_mm]

Needs torch, transformers (>= 5) and safetensors; runs on the CPU only. `bench/model_vs_hf.sh`
runs it beside `duet engine-bench` and `bench/compare.py` tabulates the two.

What is measured mirrors src/engine_bench.rs:

* prefill: one forward over a random `--prompt-len`-token prompt (into a fresh DynamicCache, as a
  serving engine would) producing only the last position's logits (`logits_to_keep=1`); best wall
  time of `--repeats` runs, no separate warm-up; prefill_tok_s = prompt_len / best.
* decode at each batch size B: B random prompts of `--decode-context` tokens are prefilled together
  into one DynamicCache (not timed); every sequence is then fed the same random token, one
  untimed warm-up step, then `--decode-steps` timed steps of one token per sequence, each step's
  greedy argmax fed back; a step's time covers the forward and the argmax.
  tok_s = B * decode_steps / (sum of the timed steps).

Everything runs under torch.inference_mode() with torch.set_num_threads(--threads).

Implementations: attention "eager" by default (`--attn-impl sdpa` is available); experts
"grouped_mm" by default (transformers' own default: tokens sorted by expert, one
torch.nn.functional.grouped_mm per projection; on CPU with torch >= 2.10 a native kernel). The
alternatives are "eager" (a Python loop over the experts that were hit) and "batched_mm"
(gathers one weight matrix per token-expert pair: very slow and memory-hungry on CPU).
"""

import argparse
import json
import os
import platform
import resource
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (released DeepSeek-V3 layout)")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="bf16")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--batches", default="1,16", help="comma-separated decode batch sizes")
    p.add_argument("--decode-context", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--attn-impl", default="eager", choices=["eager", "sdpa"])
    p.add_argument("--experts-impl", default="grouped_mm", choices=["grouped_mm", "eager", "batched_mm"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="one line of JSON (default: indented JSON)")
    a = p.parse_args()
    a.batches = [int(b) for b in a.batches.split(",") if b.strip()]
    if a.prompt_len < 1 or a.decode_context < 1 or a.decode_steps < 1 or a.threads < 1 or not a.batches:
        p.error("--prompt-len, --decode-context, --decode-steps, --threads must be >= 1 and --batches non-empty")
    return a


def main():
    a = parse_args()
    # Thread pools are sized before torch is imported, then pinned again with set_num_threads.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import safetensors
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM, DynamicCache

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]

    rss_scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    rss_before_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * rss_scale
    t0 = time.perf_counter()
    with open(os.path.join(a.model, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type in ("qwen2", "llama"):
        # A dense R1-Distill checkpoint: no experts to choose an implementation for.
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation=a.attn_impl)
    else:
        model = DeepseekV3ForCausalLM.from_pretrained(
            a.model,
            dtype=dtype,
            attn_implementation=a.attn_impl,
            experts_implementation=a.experts_impl,
        )
    model.eval()
    load_s = time.perf_counter() - t0
    cfg = model.config
    # from_pretrained silently falls back (e.g. grouped_mm -> eager) when an implementation cannot run.
    experts_impl = getattr(cfg, "_experts_implementation", None) if model_type not in ("qwen2", "llama") else a.experts_impl
    attn_impl = cfg._attn_implementation
    if experts_impl != a.experts_impl or attn_impl != a.attn_impl:
        print(f"note: running attention={attn_impl} experts={experts_impl}", file=sys.stderr)

    # Token ids drawn uniformly from [1000, 101000) like duet's (clipped to the vocabulary).
    gen = torch.Generator().manual_seed(a.seed)
    lo = min(1000, cfg.vocab_size // 2)
    hi = min(lo + 100_000, cfg.vocab_size)

    def rand_ids(*shape):
        return torch.randint(lo, hi, shape, generator=gen, dtype=torch.long)

    with torch.inference_mode():
        # Prefill.
        prompt = rand_ids(1, a.prompt_len)
        best = float("inf")
        for _ in range(max(a.repeats, 1)):
            cache = DynamicCache(config=cfg)
            t = time.perf_counter()
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            best = min(best, time.perf_counter() - t)
            del out, cache
        prefill_tok_s = a.prompt_len / best

        # Decode.
        decode = []
        for b in a.batches:
            cache = DynamicCache(config=cfg)
            prompts = rand_ids(b, a.decode_context)
            model(input_ids=prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
            last = rand_ids(1, 1).expand(b, 1).contiguous()
            elapsed = 0.0
            for step in range(a.decode_steps + 1):
                t = time.perf_counter()
                out = model(input_ids=last, past_key_values=cache, use_cache=True, logits_to_keep=1)
                ids = out.logits[:, -1, :].argmax(dim=-1)
                if step > 0:
                    elapsed += time.perf_counter() - t
                last = ids.view(b, 1)
                del out
            assert cache.get_seq_length() == a.decode_context + a.decode_steps + 1
            del cache
            decode.append({"batch": b, "tok_s": b * a.decode_steps / elapsed})

    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    weight_bytes += sum(t.numel() * t.element_size() for t in model.buffers())
    report = {
        "engine": "hf-transformers",
        "model": a.model,
        "dtype": {"f32": "F32", "bf16": "BF16"}[a.dtype],  # spelled as duet engine-bench spells it
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "prefill_tokens": a.prompt_len,
        "prefill_tok_s": prefill_tok_s,
        "decode": decode,
        "decode_context": a.decode_context,
        "decode_steps": a.decode_steps,
        "repeats": a.repeats,
        "weights_resident_bytes": weight_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * rss_scale,
        # The interpreter with torch and transformers imported, before any weight is read.
        "peak_rss_before_load_bytes": rss_before_load,
        "attn_implementation": attn_impl,
        "experts_implementation": experts_impl if model_type not in ("qwen2", "llama") else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_bf16": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: None)()),
        },
    }
    print(json.dumps(report) if a.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
