#!/usr/bin/env bash
# peft-wit vs PyTorch + PEFT on the same workload and machine, back to back (the ratio is what
# counts: these machines are noisy). Each figure comes from its own process so peak RSS is per
# workload. ROUNDS (default 3) repeats every setup in interleaved rounds (a, b, c, a, b, c, …) so
# a slow spell of the machine hits all setups alike; the table gives each setup's median over the
# rounds and its range, and each ratio as the median of the per-round ratios. PYTHON selects the
# interpreter that has torch, transformers, peft and gguf.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
ROUNDS="${ROUNDS:-3}"
args=(--batch-size "${BATCH:-4}" --seq-len "${SEQ:-256}" --rank 16 --steps "${STEPS:-5}")
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cargo build --release --quiet
with_torch=0
if "$PYTHON" -c "import torch, transformers, peft, gguf" 2>/dev/null; then
  with_torch=1
else
  echo "(PyTorch + PEFT not installed: pip install torch transformers peft gguf to compare)"
fi
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  for dtype in f32 bf16 quantized; do
    ./target/release/peft-wit bench train --base-dtype "$dtype" --generate-tokens 0 --json "${args[@]}" \
      2>/dev/null >"$out/peft-wit-$dtype.$round.json"
  done
  if [ "$with_torch" = 1 ]; then
    for dtype in float32 bfloat16; do
      "$PYTHON" benches/torch_peft.py --json --dtype "$dtype" "${args[@]}" 2>/dev/null \
        >"$out/torch-$dtype.$round.json"
    done
  fi
done
python3 - "$out" "$ROUNDS" <<'PY'
import glob, json, os, statistics, sys
out, n_rounds = sys.argv[1], int(sys.argv[2])
runs = {}  # setup -> {round: figures}
for path in sorted(glob.glob(out + "/*.json")):
    setup, rnd = os.path.basename(path)[:-5].rsplit(".", 1)
    runs.setdefault(setup, {})[int(rnd)] = json.load(open(path))
med = statistics.median

def speed(setup, rnd):
    return runs[setup][rnd]["train_tokens_per_s"]

def ratio(a, b):
    """Median over the rounds of a's speed against b's in the same round."""
    if a not in runs or b not in runs:
        return "-"
    return f"{med(speed(a, r) / speed(b, r) for r in runs[a] if r in runs[b]):.2f}"

ref = "torch-float32"
print(f"Medians over {n_rounds} interleaved rounds (min–max in brackets).")
print("| setup | train tokens/s | share of peak | eval tokens/s (× train) | peak RSS MB | × torch f32 speed "
      "| × torch f32 RSS | × peft-wit f32 speed |")
print("|---|---|---|---|---|---|---|---|")
for setup, by_round in runs.items():
    speeds = [r["train_tokens_per_s"] for r in by_round.values()]
    rss = med(r["peak_rss_mb"] for r in by_round.values())
    # peft-wit's step against the peak of its dtype, probed on the same threads in the same run.
    shares = [r["train_share_of_peak"] for r in by_round.values() if r.get("train_share_of_peak") is not None]
    share = f"{100 * med(shares):.0f}% ({100 * min(shares):.0f}–{100 * max(shares):.0f})" if shares else "-"
    # Forward-only evaluation at the same shape (peft-wit only), and its multiple of training
    # within each process.
    evals = [r for r in by_round.values() if r.get("eval_tokens_per_s")]
    eval_shares = [r["eval_share_of_peak"] for r in evals if r.get("eval_share_of_peak") is not None]
    evaluation = (f"{med(r['eval_tokens_per_s'] for r in evals):.0f} "
                  f"({med(r['eval_tokens_per_s'] / r['train_tokens_per_s'] for r in evals):.2f}×"
                  + (f", {100 * med(eval_shares):.0f}% of peak" if eval_shares else "") + ")"
                  if evals else "-")
    rss_ratio = f"{rss / med(r['peak_rss_mb'] for r in runs[ref].values()):.2f}" if ref in runs else "-"
    print(f"| {setup} | {med(speeds):.1f} ({min(speeds):.0f}–{max(speeds):.0f}) | {share} | {evaluation} | {rss:.0f} "
          f"| {ratio(setup, ref)} | {rss_ratio} | {ratio(setup, 'peft-wit-f32')} |")
PY
