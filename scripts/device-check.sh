#!/usr/bin/env bash
# The CUDA path, measured: the reference-parity tests on the GPU (PEFT_WIT_TEST_DEVICE=cuda:
# tests/tiny_reference.rs and tests/smollm2_reference.rs, bases in f32, bf16, f16 and quantized,
# against the transformers + PEFT references) and `peft-wit bench train --device cuda` (f32 and
# bf16 bases), printing the figures.
#
#   scripts/device-check.sh              build and run, on a machine WITH an NVIDIA GPU (driver
#                                        installed, `nvidia-smi` working) and a Rust toolchain
#   scripts/device-check.sh --bundle DIR build here, GPU or not (CUDA_COMPUTE_CAP, default 90),
#                                        and put the binaries and references into DIR
#   scripts/device-check.sh --run DIR [PARTS]
#                                        on a GPU machine without Rust or a network: run a bundle;
#                                        PARTS, a comma list of tiny, smollm2 and bench (default:
#                                        all), runs some of them (tiny needs no model)
#
# The CUDA toolkit for building: the one in CUDA_ROOT/CUDA_PATH/CUDA_HOME or on PATH if it has nvcc
# 11.4–13.4, else the PyPI wheels through scripts/cuda-toolchain.sh into PEFT_WIT_CUDA_DIR (default
# ~/.cache/peft-wit-cuda; needs PyPI). CARGO_TARGET_DIR is respected (default: the repo's target/).
# The runs need the default model (scripts/fetch-model.sh; PEFT_WIT_MODELS names another folder)
# and ../shared/reference beside the checkout (a bundle carries its own copy). A bundle's binaries
# load the CUDA runtime libraries (cudart, cuBLAS, cuRAND, NVRTC of CUDA 13) from LD_LIBRARY_PATH,
# the CUDA toolkit or the nvidia-* Python wheels found on the machine.
set -euo pipefail

die() { echo "device-check: error: $*" >&2; exit 1; }
phase() { echo; echo "=== device-check: $* ($(date +%T))"; }

mode=whole
dir=
parts=,tiny,smollm2,bench,
case "${1:-}" in
  --bundle | --run)
    mode=${1#--}
    [ -n "${2:-}" ] || die "$1 needs a folder"
    dir=$(mkdir -p "$2" && cd "$2" && pwd)
    parts=,${3:-tiny,smollm2,bench},
    ;;
  "") ;;
  *) die "unknown argument '$1' (none, --bundle DIR or --run DIR)" ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
model=${PEFT_WIT_MODELS:-$PWD/models}/SmolLM2-135M-Instruct.Q4_1.gguf
t_start=$(date +%s)

gpu_info() {
  command -v nvidia-smi >/dev/null 2>&1 \
    || die "nvidia-smi not found: this needs a machine with an NVIDIA GPU and its driver (for a compile-only check without a GPU, run scripts/cuda-check.sh; to build for another machine, --bundle DIR)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
    || die "nvidia-smi failed: is the NVIDIA driver loaded?"
}

# Puts a CUDA 11.4–13.4 nvcc on PATH (cudarc 0.19.10, under candle 0.11.1, panics on others) and
# makes `-lcuda` linkable.
toolkit() {
  phase "CUDA toolkit"
  toolkit_ok() {
    command -v nvcc >/dev/null 2>&1 || return 1
    local v
    v=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    [ -n "$v" ] || return 1
    set -- $v
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
    local cuda_dir=${PEFT_WIT_CUDA_DIR:-$HOME/.cache/peft-wit-cuda}
    echo "no usable nvcc (CUDA 11.4-13.4) installed; fetching the PyPI toolchain into $cuda_dir"
    scripts/cuda-toolchain.sh "$cuda_dir" >/dev/null
    # shellcheck source=/dev/null
    . "$cuda_dir/env.sh"
  fi
  nvcc --version | tail -n 1
  # `-lcuda` needs an unversioned libcuda.so at link time, which the driver does not always
  # install: link against the driver's own libcuda.so.1 through a private symlink where there
  # is one (the PyPI toolchain's env.sh has put a stub on LIBRARY_PATH otherwise).
  local driver_lib
  driver_lib=$({ ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | awk '$1 == "libcuda.so.1" && /x86-64/ {print $NF; exit}')
  if [ -n "$driver_lib" ]; then
    local link_dir=$CARGO_TARGET_DIR/libcuda-link
    mkdir -p "$link_dir"
    ln -sfn "$driver_lib" "$link_dir/libcuda.so"
    export LIBRARY_PATH=$link_dir${LIBRARY_PATH:+:$LIBRARY_PATH}
    echo "driver library: $driver_lib"
  fi
  echo "kernels for compute capability $CUDA_COMPUTE_CAP"
}

# Builds the binary and the two parity test binaries; prints their paths, one a line.
build() {
  phase "build (--release --features cuda)" >&2
  cargo build --release --features cuda --bins >&2
  echo "$CARGO_TARGET_DIR/release/peft-wit"
  cargo test --release --features cuda --test tiny_reference --test smollm2_reference --no-run \
    --message-format=json \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])'
}

# Adds folders holding the CUDA runtime libraries a binary misses to LD_LIBRARY_PATH.
find_runtime_libs() {
  local bin=$1 lib found
  for lib in $(ldd "$bin" | awk '/not found/ {print $1}'); do
    found=$(find "${CUDA_HOME:-/usr/local/cuda}/" /usr/local /opt /usr/lib -name "$lib" \
      \( -type f -o -type l \) 2>/dev/null | head -n 1 || true)
    [ -n "$found" ] || die "$bin needs $lib, which is nowhere under /usr/local, /opt or /usr/lib (install the CUDA 13 runtime libraries or set LD_LIBRARY_PATH)"
    export LD_LIBRARY_PATH=$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  done
  ! ldd "$bin" | grep 'not found' || die "$bin has unresolved libraries (above)"
  ldd "$bin" | grep -E 'libcuda|libcudart|libcublas|libcurand|libnvrtc' || true
}

wants() { [[ $parts == *",$1,"* ]]; }

# Runs the parity tests and the bench (those PARTS asks for): $1 the peft-wit binary, then the
# tiny_reference and smollm2_reference test binaries.
check() {
  local bin=$1 tiny=$2 smollm2=$3 t
  if wants smollm2 || wants bench; then
    [ -f "$model" ] || die "$model is missing (scripts/fetch-model.sh, or PEFT_WIT_MODELS)"
  fi
  find_runtime_libs "$bin"
  t_ready=$(date +%s)
  phase "reference parity on the GPU (PEFT_WIT_TEST_DEVICE=cuda)"
  for t in tiny smollm2; do
    wants $t || continue
    echo "--- ${t}_reference"
    PEFT_WIT_TEST_DEVICE=cuda PEFT_WIT_MODELS=$(dirname "$model") "${!t}" --nocapture --test-threads 1
  done
  t_tests=$(date +%s)
  if wants bench; then
    phase "peft-wit bench train --device cuda"
    for dtype in f32 bf16; do
      echo "--- base $dtype"
      PEFT_WIT_MODELS=$(dirname "$model") "$bin" bench train --device cuda --base-dtype "$dtype" \
        --batch-size 4 --seq-len 256 --rank 16 --steps 10
    done
  fi
  t_bench=$(date +%s)
  echo
  echo "device-check: OK on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
  echo "  parity tests $((t_tests - t_ready)) s, bench $((t_bench - t_tests)) s"
}

case $mode in
  whole)
    gpu_info
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
    [[ $cap =~ ^[0-9]+$ ]] || die "could not read the GPU's compute capability from nvidia-smi (got '$cap')"
    export CUDA_COMPUTE_CAP=$cap
    toolkit
    phase "model"
    scripts/fetch-model.sh
    mapfile -t bins < <(build)
    [ "${#bins[@]}" -eq 3 ] || die "the build failed (above), or gave not the binary and two test binaries: ${bins[*]}"
    t_build=$(date +%s)
    echo "toolkit and build: $((t_build - t_start)) s"
    tests=$(printf '%s\n' "${bins[@]:1}" | sort)  # tiny_reference-* sorts after smollm2_reference-*
    check "${bins[0]}" "$(echo "$tests" | grep /tiny_reference-)" "$(echo "$tests" | grep /smollm2_reference-)"
    ;;
  bundle)
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
    toolkit
    mapfile -t bins < <(build)
    [ "${#bins[@]}" -eq 3 ] || die "the build failed (above), or gave not the binary and two test binaries: ${bins[*]}"
    rm -rf "$dir" && mkdir -p "$dir/bin"
    # The binary keeps its name, a test binary loses cargo's hash; no symbols travel.
    objcopy --strip-all "${bins[0]}" "$dir/bin/peft-wit"
    for b in "${bins[@]:1}"; do
      name=$(basename "$b")
      objcopy --strip-all "$b" "$dir/bin/${name%-*}"
    done
    cp -r ../shared/reference "$dir/reference"
    cp scripts/device-check.sh "$dir/"
    echo "$CUDA_COMPUTE_CAP" >"$dir/compute_cap"
    du -sh "$dir"/bin/* "$dir/reference"
    echo "device-check: bundle in $dir (kernels for compute capability $CUDA_COMPUTE_CAP);"
    echo "  on the GPU machine: $dir/device-check.sh --run $dir (with the model, PEFT_WIT_MODELS)"
    ;;
  run)
    gpu_info
    echo "bundle built for compute capability $(cat "$dir/compute_cap")"
    export PEFT_WIT_REFERENCE_DIR=$dir/reference
    check "$dir/bin/peft-wit" "$dir/bin/tiny_reference" "$dir/bin/smollm2_reference"
    ;;
esac
