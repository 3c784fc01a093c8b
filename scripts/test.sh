#!/usr/bin/env bash
# The test suite: set up this machine (idempotent), then run every tier of tests —
# unit and property tests, NBD interop with qemu-io/qemu-img/nbdinfo, network-namespace
# tests of the WAN emulator, and real-VM end-to-end migrations with failure injection.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The end-to-end tests drive the real binaries.
cargo build --bins -p roamd -p roam-control -p roam-lab -p roam-agent -p roam-nbd
exec cargo nextest run --workspace --no-fail-fast "$@"
