#!/usr/bin/env bash
# The main job: set up this machine (idempotent), build roam, start two roam hosts
# ("office" and "home") in network namespaces joined by an emulated WAN, boot a VM on
# office with a busy guest, live-migrate it to home and print the results.
#   bash scripts/demo.sh [--json] [--bandwidth-mbit N] [--rtt-ms N] [--loss-pct P] ...
# Everything but the result goes to stderr, so `--json` yields exactly one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  bash scripts/setup.sh
  cargo build --release --bins -p roamd -p roam-control -p roam-lab -p roam-agent -p roam-nbd
} 1>&2
exec "${CARGO_TARGET_DIR:-target}/release/roam-lab" demo "$@"
