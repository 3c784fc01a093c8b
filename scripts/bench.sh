#!/usr/bin/env bash
# The benchmark: roam's figures beside their baselines, measured in the same run, checked
# against SPECIFICATION.md. `bash scripts/bench.sh --json` prints one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  bash scripts/setup.sh
  cargo build --release --bins -p roamd -p roam-control -p roam-lab -p roam-agent -p roam-nbd -p roam-hipnet
} 1>&2
exec "${CARGO_TARGET_DIR:-target}/release/roam-lab" bench "$@"
