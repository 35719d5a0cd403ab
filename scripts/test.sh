#!/usr/bin/env bash
# Runs every test of the workspace, installing what it needs first. This is the README's test
# command and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Nothing outside cargo is needed yet: the model engine, tokenizer and chat template are pure
# Rust. (UCX and the openai-client venv arrive with the serving and transport issues, and are
# installed here when they do.)
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (stable, edition 2024) first" >&2
    exit 1
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
