#!/usr/bin/env bash
# The paper's grid, measured on a slice: `peft-wit sweep` over CELLS of its cells (λp ∈ {0, 0.4,
# 1} × λr ∈ {0.2, 1} by default) at STEPS steps, batch 4 × ≤ 256 tokens of Dolly (the first
# 2,896 rows to train, the last 100 held out, as the paper's 100-row evaluation), r16 on 7
# projections, the base as BASE_DTYPE (bf16: the fastest that matches the reference). Runs the
# sweep once per entry of LANES (cells at once, `--max-parallel`), each on a fresh registry, and
# prints the wall time of each and what it extrapolates to for the 35 cells × 200 steps.
# Each cell is evaluated once, at its end (`--eval-every 0`): the trainer's default of every 50
# steps would add three evaluations a cell at 200 steps that a 50-step slice never runs.
#
#   benches/grid.sh                       # lanes 1 then 2, 6 cells × 50 steps
#   LANES="2 1 2 1" benches/grid.sh       # interleaved rounds (these machines are noisy)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA="${DATA:-../shared/data/alpagasus_3k_dolly.jsonl}"
BASE_DTYPE="${BASE_DTYPE:-bf16}"
STEPS="${STEPS:-50}"
LANES="${LANES:-1 2}"
PROMPT="${PROMPT:-0,0.4,1}"
RESPONSE="${RESPONSE:-0.2,1}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
fi
bin="${BIN:-./target/release/peft-wit}"
head -n 2896 "$DATA" >"$out/train.jsonl"
tail -n 100 "$DATA" >"$out/eval.jsonl"
cells=$(( $(tr ',' '\n' <<<"$PROMPT" | wc -l) * $(tr ',' '\n' <<<"$RESPONSE" | wc -l) ))
echo "| cells at once | wall s ($cells cells × $STEPS steps) | of which, s | 35 cells × 200 steps |"
echo "|---|---|---|---|"
round=0
for lanes in $LANES; do
  round=$((round + 1))
  start=$(date +%s.%N)
  "$bin" sweep --base-dtype "$BASE_DTYPE" --data "$out/train.jsonl" --eval-data "$out/eval.jsonl" \
    --batch-size 4 --max-seq-len 256 --rank 16 --max-steps "$STEPS" --eval-every 0 \
    --prompt-weights "$PROMPT" --response-weights "$RESPONSE" --max-parallel "$lanes" \
    --registry "$out/r$round" --quiet >"$out/sweep$round.log" 2>&1 \
    || { cat "$out/sweep$round.log"; exit 1; }
  end=$(date +%s.%N)
  # The same command on the finished registry: loading the base, tokenizing, the table.
  "$bin" sweep --base-dtype "$BASE_DTYPE" --data "$out/train.jsonl" --eval-data "$out/eval.jsonl" \
    --batch-size 4 --max-seq-len 256 --rank 16 --max-steps "$STEPS" --eval-every 0 \
    --prompt-weights "$PROMPT" --response-weights "$RESPONSE" --max-parallel "$lanes" \
    --registry "$out/r$round" --quiet >/dev/null 2>&1
  fixed_end=$(date +%s.%N)
  python3 - "$start" "$end" "$fixed_end" "$cells" "$STEPS" "$lanes" "$out/r$round" <<'PY'
import glob, json, math, os, sys
start, end, fixed_end, cells, steps, lanes = map(float, sys.argv[1:7])
fixed = fixed_end - end
wall = end - start
# T: a cell's training time as it ran (the last step's elapsed_s in its metrics); E: the
# shared step-0 evaluation, once per sweep (until its file was written, less the fixed load);
# R: the rest of a round's wall time (its cells' evaluation and commit). Cells of equal
# length run in rounds of `lanes`; the last round may be short (35 cells on 2 lanes: 18
# rounds, the last of one cell). Only training scales with the steps: 35 cells × 200 steps
# take fixed + E + ⌈35 / lanes⌉ × (T·200/steps + R). Counted as a whole round, the last,
# lone cell runs on every lane's threads (`Lanes`), which trained 1.55× faster than a
# one-thread cell in a 5-cell, 2-lane sweep: the figure is an upper bound.
trains = []
for path in glob.glob(f"{sys.argv[7]}/*/metrics.jsonl"):
    lines = [json.loads(l) for l in open(path)]
    trains.append(max(l["elapsed_s"] for l in lines if "loss" in l))
t = sum(trains) / len(trains)
(step0_file,) = glob.glob(f"{sys.argv[7]}/.sweeps/*/step0-eval.json")
e = max(0.0, os.path.getmtime(step0_file) - start - fixed)
rounds = math.ceil(cells / lanes)
r = (wall - fixed - e) / rounds - t
total = fixed + e + math.ceil(35 / lanes) * (t * 200 / steps + r)
print(f"| {lanes:.0f} | {wall:.0f} | {fixed:.0f} load + {e:.0f} step-0 eval + {rounds} rounds × (train {t:.0f} + rest {r:.0f}) | {total / 3600:.2f} h |")
PY
done
