#!/usr/bin/env bash
# Runs every test of the workspace, installing what it needs first. This is the README's test
# command and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (stable, edition 2024) first" >&2
    exit 1
fi

if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
APT_UPDATED=
apt_install() {
    if [ -z "$APT_UPDATED" ]; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@"
}

# The UCX transport's tests need the system UCX (found by pkg-config) and libclang for bindgen.
# Only these tests do: a plain `cargo build` needs neither (UCX is behind duet-transport's `ucx`
# feature).
if ! pkg-config --exists ucx 2>/dev/null || ! ldconfig -p | grep libclang >/dev/null; then
    echo "installing UCX and libclang for the UCX transport tests" >&2
    apt_install libucx-dev ucx-utils libclang-dev pkg-config
fi

# The multi-host test builds network namespaces with iproute2 and needs root. Under CI (`CI` set,
# as .ci/run does) it fails when it cannot; elsewhere it says why and does not run.
if ! command -v ip >/dev/null; then
    echo "installing iproute2 for the multi-host test" >&2
    apt_install iproute2
fi

# Every /metrics endpoint is checked with Prometheus's own `promtool check metrics`, and
# deploy/prometheus's rules with `promtool check rules` / `test rules` (tests/deploy_observability.rs).
if ! command -v promtool >/dev/null; then
    echo "installing Prometheus (promtool) for the metrics and rules checks" >&2
    apt_install prometheus
fi

# The openai-client tests need Python 3 with venv, and the official `openai` package from PyPI,
# installed into a venv under target/ (never into the system Python).
VENV=target/venv-openai
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
    if ! command -v python3 >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then
        echo "installing python3-venv" >&2
        apt_install python3 python3-venv
    fi
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40"
fi
# litellm's OpenAI-compatible provider against the same server (tests/openai_client/test_litellm.py),
# in its own venv under target/ (litellm pins its own openai and pydantic).
LL_VENV=target/venv-litellm
if [ ! -x "$LL_VENV/bin/python" ] || ! "$LL_VENV/bin/python" -c "import litellm" 2>/dev/null; then
    rm -rf "$LL_VENV"
    python3 -m venv "$LL_VENV"
    "$LL_VENV/bin/pip" install --quiet --disable-pip-version-check "litellm>=1.60"
fi
# The schema fuzz test (tests/serve_conformance.rs) runs schemathesis from PyPI against
# /openapi.json; it lives in its own venv under target/, which the test finds.
ST_VENV=target/venv-schemathesis
if [ ! -x "$ST_VENV/bin/st" ]; then
    rm -rf "$ST_VENV"
    python3 -m venv "$ST_VENV"
    "$ST_VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis>=4.3,<5"
fi

# The ansible deploy test (tests/deploy_ansible.rs) boots four Debian hosts as systemd-nspawn
# containers (systemd-container), each from an overlay over one Debian 12 root made here once by
# debootstrap (about 600 MB, cached in target/), with openssh-server in it, python3-apt (ansible's
# apt module) and Debian's prometheus package (the hosts have no network: site.yml's Prometheus
# role finds it installed); ansible-core and ansible-lint come from PyPI into a venv under
# target/. Needs root, like the multi-host test.
# The root records the package list it was made with and is made again when that list changes.
if [ "$(id -u)" = 0 ]; then
    if ! command -v systemd-nspawn >/dev/null || ! command -v debootstrap >/dev/null \
        || ! command -v ssh >/dev/null; then
        echo "installing systemd-container, debootstrap and openssh-client for the deploy test" >&2
        apt_install systemd-container debootstrap openssh-client
    fi
    ROOTFS=target/deploy-rootfs
    ROOTFS_PACKAGES=systemd,systemd-sysv,dbus,openssh-server,python3,iproute2,sudo,python3-apt,prometheus
    if [ ! -x "$ROOTFS/usr/sbin/sshd" ] \
        || [ "$(cat "$ROOTFS/.duet-packages" 2>/dev/null)" != "$ROOTFS_PACKAGES" ]; then
        echo "making the deploy test's Debian root (debootstrap bookworm) in $ROOTFS" >&2
        rm -rf "$ROOTFS.tmp" "$ROOTFS"
        debootstrap --variant=minbase --include="$ROOTFS_PACKAGES" \
            bookworm "$ROOTFS.tmp" http://deb.debian.org/debian >target/deploy-rootfs.log 2>&1 \
            || { tail -n 20 target/deploy-rootfs.log >&2; exit 1; }
        # Each host names itself and gets its own machine id at boot.
        rm -f "$ROOTFS.tmp/etc/hostname"
        : >"$ROOTFS.tmp/etc/machine-id"
        # prometheus's postinst enabled its service: off in the image, so that it runs only where
        # site.yml puts it (the duet_prometheus hosts), with the config the role writes.
        rm -f "$ROOTFS.tmp/etc/systemd/system/multi-user.target.wants/prometheus.service"
        rm -f "$ROOTFS.tmp"/var/cache/apt/archives/*.deb
        echo "$ROOTFS_PACKAGES" >"$ROOTFS.tmp/.duet-packages"
        mv "$ROOTFS.tmp" "$ROOTFS"
    fi
fi
AN_VENV=target/venv-ansible
if [ ! -x "$AN_VENV/bin/ansible-playbook" ] || [ ! -x "$AN_VENV/bin/ansible-lint" ]; then
    rm -rf "$AN_VENV"
    python3 -m venv "$AN_VENV"
    "$AN_VENV/bin/pip" install --quiet --disable-pip-version-check "ansible-core>=2.16,<2.18" "ansible-lint>=24,<26"
fi
(cd deploy && PATH="../$AN_VENV/bin:$PATH" ansible-lint --offline -q)

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --features ucx --locked -- -D warnings
cargo test --workspace --locked
# BF16 weights have two CPU matmul kernels, chosen once per process: AVX512-BF16 where the CPU
# has it (the run above), AVX2/FMA otherwise. The op and golden tests again on the AVX2 kernel,
# so both are tested on every machine that can run them.
# (--workspace keeps the feature set of the run above: nothing is rebuilt.)
DUET_NO_AVX512=1 cargo test --workspace --locked --test ops --test golden_hf
# The transport suite again with UCX (shared memory and tcp) in it.
cargo test -p duet-transport --features ucx --locked
# Role processes with KV over UCX (shared memory and tcp) instead of QUIC.
cargo test --features ucx --locked --test cluster_procs ucx

# The official openai client against the real binary (built by the cargo test run above).
DUET_BIN="$(pwd)/target/debug/duet" "$VENV/bin/python" -m unittest -v tests/openai_client/test_openai_client.py 2>&1 | tee target/openai-client.log
tail -n 3 target/openai-client.log | grep -q '^OK' || { echo "openai client tests failed" >&2; exit 1; }
# litellm's OpenAI provider against the real binary (imports the openai tests' helpers).
(cd tests/openai_client && DUET_BIN="$(pwd)/../../target/debug/duet" LITELLM_LOCAL_MODEL_COST_MAP=True \
    "../../$LL_VENV/bin/python" -m unittest -v test_litellm) 2>&1 | tee target/litellm-client.log
tail -n 3 target/litellm-client.log | grep -q '^OK' || { echo "litellm client tests failed" >&2; exit 1; }
