#!/usr/bin/env bash
# peft-wit vs PyTorch + PEFT on the same workload and machine, back to back (the ratio is what
# counts: these machines are noisy). Each figure comes from its own process so peak RSS is per
# workload. PYTHON selects the interpreter that has torch, transformers, peft and gguf.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
args=(--batch-size "${BATCH:-4}" --seq-len "${SEQ:-256}" --rank 16 --steps "${STEPS:-5}")
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cargo build --release --quiet
for dtype in f32 bf16 quantized; do
  ./target/release/peft-wit bench train --base-dtype "$dtype" --generate-tokens 0 --json "${args[@]}" \
    2>/dev/null >"$out/peft-wit-$dtype.json"
done
if "$PYTHON" -c "import torch, transformers, peft, gguf" 2>/dev/null; then
  for dtype in float32 bfloat16; do
    "$PYTHON" benches/torch_peft.py --json --dtype "$dtype" "${args[@]}" 2>/dev/null >"$out/torch-$dtype.json"
  done
else
  echo "(PyTorch + PEFT not installed: pip install torch transformers peft gguf to compare)"
fi
python3 - "$out" <<'PY'
import glob, json, os, sys
rows = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(sys.argv[1] + "/*.json"))}
ref = rows.get("torch-float32")
print("| setup | train tokens/s | share of peak | peak RSS MB | × torch f32 speed | × torch f32 RSS |")
print("|---|---|---|---|---|---|")
for name, r in rows.items():
    speed, rss = r["train_tokens_per_s"], r["peak_rss_mb"]
    ratio = lambda a, b: f"{a / b:.2f}" if ref else "-"
    # peft-wit's step against the peak of its dtype, probed on the same threads in the same run.
    share = r.get("train_share_of_peak")
    share = f"{100 * share:.0f}%" if share is not None else "-"
    print(f"| {name} | {speed:.1f} | {share} | {rss:.0f} | {ratio(speed, ref['train_tokens_per_s']) if ref else '-'} "
          f"| {ratio(rss, ref['peak_rss_mb']) if ref else '-'} |")
PY
