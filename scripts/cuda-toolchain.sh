#!/usr/bin/env bash
# A CUDA 13.0 toolchain (nvcc, headers, cudart/cublas/curand/nvrtc) from PyPI's NVIDIA wheels,
# enough to compile the `cuda` feature on a machine without a CUDA install (no GPU needed for
# `cargo check`). See NOTES-cuda.md in the shared notes for how these pins were chosen:
# cudarc 0.19.10 accepts CUDA 11.4–13.4 only, and the CUDA 12 nvcc wheel has no bin/nvcc.
#
#   scripts/cuda-toolchain.sh DIR
#
# Builds DIR/nvidia/cu13/{bin,include,lib,nvvm} from the wheels (downloaded into DIR/wheels),
# writes DIR/env.sh (the exports; `source` it) and prints it. Idempotent: when DIR holds a
# complete tree of these pins it only prints the exports. A failed download or unpack exits
# non-zero and leaves no completion stamp, so the next run starts over.
#
# No wheel ships the driver library libcuda: `cargo check` does not link and needs none; a build
# that links (scripts/device-check.sh, on a machine with the NVIDIA driver) links the driver's own.
# env.sh keeps a CUDA_COMPUTE_CAP already set (nvcc's target for candle's kernels), else 90 (Hopper).
set -euo pipefail

die() { echo "cuda-toolchain: error: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DIR"
dir=$1

# The pins (no cudnn: the `cudnn` feature is not checked).
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# One builder at a time per DIR (two CI jobs sharing a cache wait for each other).
if command -v flock >/dev/null; then
  exec 9>"$dir/.lock"
  flock 9
fi
root=$dir/nvidia/cu13
stamp=$dir/.complete
want="${wheels[*]}"

write_env() {
  {
    echo "# written by scripts/cuda-toolchain.sh; source this file"
    echo "export CUDA_ROOT='$root'"
    echo "export CUDA_PATH='$root'"
    echo "export CUDA_HOME='$root'"
    echo "export PATH='$root/bin':\"\$PATH\""
    echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
    echo "export LD_LIBRARY_PATH='$root/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    # Link time only: the loader never reads LIBRARY_PATH, so a real driver wins at run time.
    echo "export LIBRARY_PATH='$root/lib/stubs'\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
  } >"$dir/env.sh.tmp"
  mv "$dir/env.sh.tmp" "$dir/env.sh"
}

# No wheel ships the driver's libcuda, yet candle links it (`-lcuda`, cudarc's dynamic-linking):
# a stub with the driver's soname and every cu* entry point of cuda.h (after its _v2 renames),
# each returning CUDA_ERROR_UNKNOWN, lets a cuda build link here; a GPU machine's driver
# replaces it at run time.
make_driver_stub() {
  local stubs=$root/lib/stubs
  [ -f "$stubs/libcuda.so" ] && return 0
  if ! command -v cc >/dev/null; then
    # `cargo check` needs no stub; only linking a cuda build here does.
    echo "cuda-toolchain: warning: no C compiler (cc), so no libcuda link stub: cuda builds can be checked here, not linked" >&2
    return 0
  fi
  mkdir -p "$stubs"
  cc -E -P -I "$root/include" "$root/include/cuda.h" \
    | grep -oE '\bcu[A-Za-z0-9_]+[[:space:]]*\(' | tr -d ' (' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' >"$stubs/libcuda_stub.c"
  [ -s "$stubs/libcuda_stub.c" ] || die "found no cu* functions in $root/include/cuda.h"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda_stub.c" \
    || die "could not build the libcuda link stub"
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  make_driver_stub
  write_env
  cat "$dir/env.sh"
  exit 0
fi

rm -f "$stamp"
command -v unzip >/dev/null || die "unzip is missing"
python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip is missing"

echo "cuda-toolchain: downloading ${#wheels[@]} wheels into $dir/wheels" >&2
mkdir -p "$dir/wheels"
# Linux x86_64 wheels whatever the local Python; pip keeps wheels already present.
if ! python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --python-version 3.11 --dest "$dir/wheels" "${wheels[@]}" >&2; then
  die "pip download of the CUDA wheels failed (is PyPI reachable?): ${wheels[*]}"
fi

echo "cuda-toolchain: unpacking into $root" >&2
for w in "${wheels[@]}"; do
  name=${w%%==*}
  version=${w##*==}
  file=$(ls "$dir/wheels/${name//-/_}-$version-"*.whl 2>/dev/null | head -n 1)
  [ -n "$file" ] || die "no wheel for $w in $dir/wheels after the download"
  unzip -q -o "$file" 'nvidia/*' -d "$dir" || die "could not unpack $file"
done
for d in bin include lib nvvm; do
  [ -d "$root/$d" ] || die "$root/$d is missing after unpacking (did the wheels' layout change?)"
done
[ -x "$root/bin/nvcc" ] || chmod +x "$root"/bin/* "$root"/nvvm/bin/* 2>/dev/null || true
[ -x "$root/bin/nvcc" ] || die "$root/bin/nvcc is missing or not executable"

# Fix-ups: the lib64 name build scripts look for, and the unversioned names the linker wants.
[ -e "$root/lib64" ] || ln -s lib "$root/lib64"
for l in cublas cublasLt cudart curand nvrtc; do
  target=$(cd "$root/lib" && ls "lib$l.so."* 2>/dev/null | sort -V | head -n 1)
  [ -n "$target" ] || die "no lib$l.so.* in $root/lib"
  ln -sfn "$target" "$root/lib/lib$l.so"
done

"$root/bin/nvcc" --version >/dev/null || die "$root/bin/nvcc does not run"
make_driver_stub
write_env
echo "$want" >"$stamp"
cat "$dir/env.sh"
