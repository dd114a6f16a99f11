#!/usr/bin/env bash
# The CUDA path, measured: on a machine WITH an NVIDIA GPU (driver installed, `nvidia-smi`
# working), builds with `--features cuda`, runs the reference-parity tests on the GPU
# (PEFT_WIT_TEST_DEVICE=cuda: tests/tiny_reference.rs and tests/smollm2_reference.rs, bases in
# f32, bf16, f16 and quantized, against the transformers + PEFT references) and
# `peft-wit bench train --device cuda` (f32 and bf16 bases), printing the figures.
#
#   scripts/device-check.sh
#
# The CUDA toolkit: the one in CUDA_ROOT/CUDA_PATH/CUDA_HOME or on PATH if it has nvcc 11.4–13.4,
# else the PyPI wheels through scripts/cuda-toolchain.sh into PEFT_WIT_CUDA_DIR (default
# ~/.cache/peft-wit-cuda; needs PyPI). The kernels are compiled for the GPU's compute capability
# (nvidia-smi). CARGO_TARGET_DIR is respected (default: the repo's target/). Needs the default
# model (scripts/fetch-model.sh, run here) and ../shared/reference beside the checkout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "device-check: error: $*" >&2; exit 1; }
phase() { echo; echo "=== device-check: $* ($(date +%T))"; }

command -v nvidia-smi >/dev/null 2>&1 \
  || die "nvidia-smi not found: this script needs a machine with an NVIDIA GPU and its driver (for a compile-only check without a GPU, run scripts/cuda-check.sh)"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
  || die "nvidia-smi failed: is the NVIDIA driver loaded?"
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
[[ $cap =~ ^[0-9]+$ ]] || die "could not read the GPU's compute capability from nvidia-smi (got '$cap')"
export CUDA_COMPUTE_CAP=$cap
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
t_start=$(date +%s)

phase "CUDA toolkit"
toolkit_ok() {
  command -v nvcc >/dev/null 2>&1 || return 1
  local v
  v=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  [ -n "$v" ] || return 1
  set -- $v
  # cudarc 0.19.10 (candle 0.11.1) supports CUDA 11.4 to 13.4 and panics on others.
  { [ "$1" -gt 11 ] || { [ "$1" -eq 11 ] && [ "$2" -ge 4 ]; }; } \
    && { [ "$1" -lt 13 ] || { [ "$1" -eq 13 ] && [ "$2" -le 4 ]; }; }
}
for root in "${CUDA_ROOT:-}" "${CUDA_PATH:-}" "${CUDA_HOME:-}" /usr/local/cuda; do
  if [ -n "$root" ] && [ -x "$root/bin/nvcc" ] && ! command -v nvcc >/dev/null 2>&1; then
    export PATH=$root/bin:$PATH
  fi
done
if toolkit_ok; then
  echo "using the installed toolkit: $(command -v nvcc)"
else
  cuda_dir=${PEFT_WIT_CUDA_DIR:-$HOME/.cache/peft-wit-cuda}
  echo "no usable nvcc (CUDA 11.4-13.4) installed; fetching the PyPI toolchain into $cuda_dir"
  scripts/cuda-toolchain.sh "$cuda_dir" >/dev/null
  # shellcheck source=/dev/null
  . "$cuda_dir/env.sh"
fi
nvcc --version | tail -n 1

# `-lcuda` needs an unversioned libcuda.so at link time, which the driver does not always
# install (the toolkit's stub usually provides it; the wheels have none): link against the
# driver's own libcuda.so.1 through a private symlink on LIBRARY_PATH. At run time the loader
# finds libcuda.so.1 the usual way.
driver_lib=$({ ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | awk '$1 == "libcuda.so.1" && /x86-64/ {print $NF; exit}')
[ -n "$driver_lib" ] || die "the NVIDIA driver library libcuda.so.1 is not in the loader cache (ldconfig -p)"
link_dir=$CARGO_TARGET_DIR/libcuda-link
mkdir -p "$link_dir"
ln -sfn "$driver_lib" "$link_dir/libcuda.so"
export LIBRARY_PATH=$link_dir${LIBRARY_PATH:+:$LIBRARY_PATH}
echo "driver library: $driver_lib (compute capability $CUDA_COMPUTE_CAP)"
t_toolkit=$(date +%s)

phase "model"
scripts/fetch-model.sh

phase "build (--release --features cuda)"
cargo build --release --features cuda --bins
cargo test --release --features cuda --test tiny_reference --test smollm2_reference --no-run
bin=$CARGO_TARGET_DIR/release/peft-wit
ldd "$bin" | grep -E 'libcuda|libcudart|libcublas|libcurand|libnvrtc|not found' || true
! ldd "$bin" | grep -q 'not found' || die "$bin has unresolved libraries (above)"
t_build=$(date +%s)

phase "reference parity on the GPU (PEFT_WIT_TEST_DEVICE=cuda)"
PEFT_WIT_TEST_DEVICE=cuda cargo test --release --features cuda \
  --test tiny_reference --test smollm2_reference -- --nocapture --test-threads 1
t_tests=$(date +%s)

phase "peft-wit bench train --device cuda"
for dtype in f32 bf16; do
  echo "--- base $dtype"
  "$bin" bench train --device cuda --base-dtype "$dtype" --batch-size 4 --seq-len 256 --rank 16
done
t_bench=$(date +%s)

echo
echo "device-check: OK on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
echo "  toolkit $((t_toolkit - t_start)) s, build $((t_build - t_toolkit)) s, parity tests $((t_tests - t_build)) s, bench $((t_bench - t_tests)) s"
