#!/usr/bin/env python3
"""Print a markdown table comparing `duet engine-bench --json` with `bench/hf_engine_bench.py --json`.

Usage:

    python3 bench/compare.py DUET.json HF_A.json [HF_B.json ...]

The first file is duet; every further file is a reference (HF transformers) run. Columns: one per
file, labelled "<engine> <dtype>", then "duet / best HF": duet's value over the best reference value
(highest tokens/s, lowest peak RSS), so > 1 means duet is ahead on throughput and < 1 means duet
uses less memory. Rows: prefill tok/s, decode tok/s per batch size, peak RSS GB. Standard library
only; a file may carry other lines before its JSON (the last line that parses is used).
"""

import json
import sys


def load(path):
    with open(path) as f:
        lines = [l for l in f.read().splitlines() if l.strip()]
    for start in range(len(lines) - 1, -1, -1):  # last JSON object in the file, single- or multi-line
        try:
            obj = json.loads("\n".join(lines[start:]))
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    sys.exit(f"compare.py: no JSON object in {path}")


def label(r):
    engine = {"duet": "duet", "hf-transformers": "HF"}.get(r.get("engine"), str(r.get("engine")))
    return f"{engine} {str(r.get('dtype', '?')).lower()}"


def fmt(v, digits):
    return "–" if v is None else f"{v:,.{digits}f}"


def main(paths):
    if len(paths) < 2:
        sys.exit(__doc__)
    runs = [load(p) for p in paths]
    duet, refs = runs[0], runs[1:]

    def decode_at(r, b):
        return next((d.get("tok_s") for d in r.get("decode", []) if d.get("batch") == b), None)

    def gb(r):
        v = r.get("peak_rss_bytes")
        return None if v is None else v / 1e9

    prompt_lens = {r.get("prefill_tokens") for r in runs}
    plen = "/".join(str(p) for p in sorted(prompt_lens, key=str))
    batches = sorted({d["batch"] for r in runs for d in r.get("decode", [])})
    rows = [(f"prefill tok/s ({plen})", lambda r: r.get("prefill_tok_s"), 1, max)]
    rows += [(f"decode tok/s batch {b}", (lambda b: lambda r: decode_at(r, b))(b), 1, max) for b in batches]
    rows += [("peak RSS GB", gb, 2, min)]

    out = ["| | " + " | ".join(label(r) for r in runs) + " | duet / best HF |"]
    out.append("|---|" + "---:|" * (len(runs) + 1))
    for name, get, digits, best in rows:
        vals = [get(r) for r in runs]
        ref_vals = [v for v in vals[1:] if v is not None]
        ratio = vals[0] / best(ref_vals) if vals[0] is not None and ref_vals and best(ref_vals) else None
        out.append(f"| {name} | " + " | ".join(fmt(v, digits) for v in vals) + f" | {fmt(ratio, 2)}× |".replace("–×", "–"))
    print("\n".join(out))

    threads = {r.get("threads") for r in runs}
    notes = [f"threads: {', '.join(str(t) for t in sorted(threads, key=str))}"]
    for r in refs:
        v = r.get("versions", {})
        notes.append(
            f"{label(r)}: torch {v.get('torch', '?')}, transformers {v.get('transformers', '?')}, "
            f"attention={r.get('attn_implementation', '?')}, experts={r.get('experts_implementation', '?')}, "
            f"load {fmt(r.get('load_s'), 1)} s"
        )
    notes.append(f"{label(duet)}: load {fmt(duet.get('load_s'), 1)} s")
    print()
    print("\n".join(f"- {n}" for n in notes))
    if len(threads) > 1:
        print(f"WARNING: the runs used different thread counts: {sorted(threads, key=str)}", file=sys.stderr)
    if len(prompt_lens) > 1:
        print(f"WARNING: the runs used different prompt lengths: {sorted(prompt_lens, key=str)}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
