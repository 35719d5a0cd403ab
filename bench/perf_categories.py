"""Puts each perf sample of a `duet serve` process into one category of the serving path, by the
first category (in this order) whose pattern matches a frame on its stack; prints the shares and
the CPU milliseconds per request. Usage: perf_categories.py PERF_DATA REQUESTS [HZ]."""
import collections
import re
import subprocess
import sys

CATEGORIES = [
    ("detokenization", r"Detokenizer::(push|finish)|TextTokenizer::decode|ByteVocab"),
    ("JSON + SSE encoding", r"generating::sse_event|generating::Endpoint>::(delta|opening|usage)"
     r"|serde_json::ser|sse::Event::(data|finalize)|chat_chunks"),
    ("text pipeline (stop strings, reasoning, tools)",
     r"ChoiceRun::on_token|StopMatcher|ReasoningParser|ToolCallParser|route_text"),
    ("latency metrics", r"Timing::on_tokens|Timing::finish|duet_actors::metrics"),
    ("gateway actor, admission, submit", r"duet_actors::gateway::Gateway>|ChoiceRun::(start|submit)"
     r"|start_choice|duet_actors::registry|GatewayCore"),
    ("engine, decode and prefill actors",
     r"duet_actors::decode|duet_actors::prefill|duet_core::|duet_actors::engine"),
    ("HTTP response write (hyper, socket)", r"poll_flush|poll_write|Encoder|role::Server>::encode"
     r"|tcp_sendmsg|writev|sys_write|sys_sendmsg|Body>::poll_frame"),
    ("HTTP request read and parse", r"read_body|parse_json|Endpoint>::prepare|role::Server>::parse"
     r"|tcp_recvmsg|sys_read|sys_recvfrom|poll_read|accept"),
    ("channels, wake-ups, scheduler", r"tokio::sync|tokio::runtime|futex|epoll|try_to_wake_up"),
]


def main():
    data, requests = sys.argv[1], int(sys.argv[2])
    hz = int(sys.argv[3]) if len(sys.argv) > 3 else 999
    pats = [(name, re.compile(p)) for name, p in CATEGORIES]
    out = subprocess.run(["perf", "script", "-i", data, "-F", "comm,ip,sym"],
                         capture_output=True, text=True, check=True).stdout
    counts = collections.Counter()
    total = 0
    for block in out.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines:
            continue
        total += 1
        stack = "\n".join(lines[1:])
        name = next((n for n, p in pats if p.search(stack)), "other")
        counts[name] += 1
    print(f"{'category':48} {'share':>6} {'CPU ms/request':>15}")
    for name in [n for n, _ in CATEGORIES] + ["other"]:
        share = counts[name] / max(total, 1)
        ms = counts[name] / hz * 1000 / requests
        print(f"{name:48} {share:6.1%} {ms:15.3f}")
    print(f"{'total':48} {1:6.0%} {total / hz * 1000 / requests:15.3f}  ({total} samples)")


if __name__ == "__main__":
    main()
