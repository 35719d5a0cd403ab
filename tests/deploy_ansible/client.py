"""Requests through a deployed duet gateway with the official openai client (tests/deploy_ansible.rs).

    client.py BASE_URL smoke N          N requests (chat and completions, streamed and whole)
    client.py BASE_URL load STOP_FILE   streamed chat requests from 4 threads until STOP_FILE exists

Prints one JSON line: {"ok": n, "failed": n, "errors": [...], "seconds": s}. The client never
retries (max_retries=0), so a request that fails once counts as failed. Exits 1 when any failed.
"""

import json
import os
import sys
import threading
import time

import openai

THREADS = 4  # concurrent streams during the rolling restart: every worker holds some at once
MAX_TOKENS = 24
ERRORS_KEPT = 20


def one(client, i, stream):
    prompt = f"request {i}: count to ten"
    if i % 2 == 0:
        if stream:
            text = ""
            finish = None
            for chunk in client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
            ):
                if chunk.choices:
                    d = chunk.choices[0].delta
                    text += (d.content or "") + (getattr(d, "reasoning_content", None) or "")
                    finish = chunk.choices[0].finish_reason or finish
        else:
            r = client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
            m = r.choices[0].message
            text = (m.content or "") + (getattr(m, "reasoning_content", None) or "")
            finish = r.choices[0].finish_reason
    else:
        r = client.completions.create(
            model="default", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=stream
        )
        if stream:
            text, finish = "", None
            for chunk in r:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
    if finish not in ("stop", "length"):
        raise RuntimeError(f"finish_reason {finish!r}")
    if finish == "length" and not text:
        raise RuntimeError("no text")


def main():
    base, mode, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    client = openai.OpenAI(base_url=base, api_key="EMPTY", max_retries=0, timeout=120)
    lock = threading.Lock()
    counts = {"ok": 0, "failed": 0, "errors": []}

    def record(i, err):
        with lock:
            if err is None:
                counts["ok"] += 1
            else:
                counts["failed"] += 1
                if len(counts["errors"]) < ERRORS_KEPT:
                    counts["errors"].append(f"request {i}: {type(err).__name__}: {err}")

    def run(i, stream):
        try:
            one(client, i, stream)
            record(i, None)
        except Exception as e:  # every failure is counted and reported
            record(i, e)

    start = time.monotonic()
    if mode == "smoke":
        for i in range(int(arg)):
            run(i, stream=i % 4 < 2)
    elif mode == "load":
        def worker(t):
            i = t
            while not os.path.exists(arg):
                run(i, stream=True)
                i += THREADS
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        raise SystemExit(f"unknown mode {mode}")
    counts["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(counts), flush=True)
    sys.exit(1 if counts["failed"] else 0)


if __name__ == "__main__":
    main()
