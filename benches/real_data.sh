#!/usr/bin/env bash
# Real data against the fixed shape, in one run: `peft-wit bench train` on workload W
# (random ids, batch 4 × 256, no dropout) and then `peft-wit train` on the first ROWS rows of
# Dolly (batch 4, ≤ 256 tokens, length-grouped, the default LoRA dropout 0.05, no evaluation).
# The ratio is what counts: these machines are noisy. Both runs: f32 base (BASE_DTYPE to
# change), r16 on 7 projections, 2 threads unless RAYON_NUM_THREADS says otherwise.
#
#   benches/real_data.sh                 # 400 rows, a whole epoch (~93 steps)
#   ROWS=100 STEPS=20 benches/real_data.sh
#   BIN=/path/to/other/peft-wit benches/real_data.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROWS="${ROWS:-400}"
DATA="${DATA:-../shared/data/alpagasus_3k_dolly.jsonl}"
BASE_DTYPE="${BASE_DTYPE:-f32}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# BIN: another build to measure (e.g. an older commit's), else this checkout's release build.
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
fi
bin="${BIN:-./target/release/peft-wit}"
"$bin" bench train --base-dtype "$BASE_DTYPE" --batch-size 4 --seq-len 256 --rank 16 \
  --steps "${BENCH_STEPS:-5}" --generate-tokens 0 --json 2>/dev/null >"$out/w.json"
head -n "$ROWS" "$DATA" >"$out/rows.jsonl"
steps=()
[ -n "${STEPS:-}" ] && steps=(--max-steps "$STEPS")
"$bin" train --base-dtype "$BASE_DTYPE" --data "$out/rows.jsonl" --batch-size 4 \
  --max-seq-len 256 --rank 16 --eval-fraction 0 --loss wit --prompt-weight 0.5 \
  --response-weight 1 --registry "$out/registry" --name real-data "${steps[@]}" \
  2>"$out/train.log"
python3 - "$out" <<'PY'
import json, re, sys
out = sys.argv[1]
w = json.load(open(f"{out}/w.json"))
# Training lines only (an evaluation line has no "loss").
lines = [l for l in map(json.loads, open(f"{out}/registry/real-data/metrics.jsonl")) if "loss" in l]
first, last = lines[0], lines[-1]  # the first step is the warm-up, as in the bench
rate = (last["tokens_seen"] - first["tokens_seen"]) / (last["elapsed_s"] - first["elapsed_s"])
log = open(f"{out}/train.log").read()
padding = re.search(r"padding ([0-9.]+%)", log)
steps = last["step"] - first["step"]
tokens = last["tokens_seen"] - first["tokens_seen"]
print("| run | train tokens/s | tokens a step | × W |")
print("|---|---|---|---|")
print(f"| W: batch 4 × 256, random ids | {w['train_tokens_per_s']:.1f} | 1024 | 1.00 |")
print(f"| Dolly: {steps} steps, padding {padding.group(1) if padding else '?'} | {rate:.1f} "
      f"| {tokens / steps:.0f} | {rate / w['train_tokens_per_s']:.2f} |")
PY
