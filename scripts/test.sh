#!/usr/bin/env bash
# The test suite: fetch the default model (the real-model parity tests need it), then run every
# test in release mode (the real-model tests are slow in debug builds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh
cargo test --release "$@"
