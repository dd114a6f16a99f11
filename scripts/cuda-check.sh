#!/usr/bin/env bash
# Keeps the CUDA path compiling on machines without a GPU: fetches (once, cached) a CUDA toolchain
# from PyPI's NVIDIA wheels with scripts/cuda-toolchain.sh, then type-checks the crate with the
# `cuda` feature — candle's CUDA backend, its kernels (compiled by nvcc), and our CUDA-only code
# (custom ops' `cuda_fwd`). It checks, it does not link or run: scripts/device-check.sh does that
# on a GPU machine.
#
#   scripts/cuda-check.sh [extra cargo check args]
#
# PEFT_WIT_CUDA_DIR: where the toolchain lives (default ~/.cache/peft-wit-cuda, ~1.9 GB with the
# wheels). CARGO_TARGET_DIR is respected (default: the repo's target/). Cache both between runs:
# a cold check spends most of its time in candle-kernels' build script (nvcc on 15 .cu files).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cuda_dir=${PEFT_WIT_CUDA_DIR:-$HOME/.cache/peft-wit-cuda}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

t0=$(date +%s)
scripts/cuda-toolchain.sh "$cuda_dir" >/dev/null
# shellcheck source=/dev/null
. "$cuda_dir/env.sh"
t1=$(date +%s)
echo "cuda-check: toolchain ready in $((t1 - t0)) s ($CUDA_ROOT; $(nvcc --version | tail -n 1))"

echo "cuda-check: cargo check --release --features cuda --lib --bins --examples (target dir $CARGO_TARGET_DIR)"
cargo check --release --features cuda --lib --bins --examples "$@"
t2=$(date +%s)
echo "cuda-check: cargo check took $((t2 - t1)) s"
echo "cuda-check: OK in $((t2 - t0)) s"
