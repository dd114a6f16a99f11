#!/usr/bin/env bash
# Compare `peft-wit eval` with EleutherAI lm-evaluation-harness (lm-eval 0.4.x)
# on MMLU, BBH (bbh_cot_fewshot), GSM8K and IFEval: same model directory,
# same local data, per-example predictions matched by (task, doc_id).
#
# usage: PYTHON=/opt/lmeval-venv/bin/python benches/lm_eval_compare.sh \
#          --model DIR --task-data DIR [--tasks mmlu,bbh,gsm8k,ifeval] [--limit N]
#          [--max-gen-toks N] [--num-fewshot N (mmlu only)] [--out DIR]
#          [--harness-out DIR] [--reuse-harness DIR] [--skip-peft] [--show N]
#
#   --model DIR          Hugging Face model directory (config.json, model.safetensors,
#                        tokenizer files), loaded by both tools
#   --task-data DIR      bbh/ gsm8k/ mmlu/ ifeval/ in the original repositories' layouts
#   --out DIR            where this run's files go (default: a new dir under /tmp)
#   --harness-out DIR    where harness runs are written, one subdir per task group
#                        (default: OUT/harness); keep it to rerun only peft-wit later
#   --reuse-harness DIR  skip running the harness: read DIR/<group>/ (as written by
#                        --harness-out) instead
#   --skip-peft          run only the harness half (and the table, harness columns)
#   PEFT_WIT=path        peft-wit binary (default: target/release/peft-wit)
#   PEFT_WIT_ARGS="..."  extra arguments for `peft-wit eval` (e.g. --batch-size 1)
#   PYTHON=path          python with lm-eval installed (default: python3)
#
# Each task group is run separately by each tool so that the times are per group.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
PYTHON="${PYTHON:-python3}"
PEFT_WIT="${PEFT_WIT:-$repo/target/release/peft-wit}"

model="" data="" tasks="mmlu,bbh,gsm8k,ifeval" limit="" max_gen="" fewshot=""
out="" harness_out="" reuse="" skip_peft=0 show=5
die() { echo "lm_eval_compare: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --task-data) data="$2"; shift 2 ;;
    --tasks) tasks="$2"; shift 2 ;;
    --limit) limit="$2"; shift 2 ;;
    --max-gen-toks) max_gen="$2"; shift 2 ;;
    --num-fewshot) fewshot="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --harness-out) harness_out="$2"; shift 2 ;;
    --reuse-harness) reuse="$2"; shift 2 ;;
    --skip-peft) skip_peft=1; shift ;;
    --show) show="$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ -n "$model" && -d "$model" ]] || die "--model DIR is required (a Hugging Face model directory)"
[[ -n "$data" && -d "$data" ]] || die "--task-data DIR is required"
model="$(cd "$model" && pwd)"
data="$(cd "$data" && pwd)"
out="${out:-$(mktemp -d /tmp/lm_eval_compare.XXXXXX)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
harness_out="${harness_out:-$out/harness}"
IFS=',' read -r -a groups <<<"$tasks"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f\n", b - a }'; }

# run_logged TOOL GROUP DIR SECONDS_FILE: runs the command in the array `cmd` with its command
# line saved to DIR/command.txt, its output to DIR/stdout.txt and DIR/stderr.txt and its wall
# time in seconds to DIR/SECONDS_FILE; if it fails, shows the tail of its stderr and stops.
run_logged() {
  local tool="$1" group="$2" dir="$3" seconds="$4" t0
  printf '%q ' "${cmd[@]}" >"$dir/command.txt"; echo >>"$dir/command.txt"
  echo "== $tool: $group" >&2
  t0=$(now)
  "${cmd[@]}" >"$dir/stdout.txt" 2>"$dir/stderr.txt" || {
    echo "$tool run for $group failed; tail of $dir/stderr.txt:" >&2
    tail -30 "$dir/stderr.txt" >&2
    exit 1
  }
  elapsed "$t0" "$(now)" >"$dir/$seconds"
  echo "   $(cat "$dir/$seconds") s" >&2
}

# ---------------------------------------------------------------- harness half
if [[ -z "$reuse" ]]; then
  "$PYTHON" -c 'import lm_eval' 2>/dev/null ||
    die "PYTHON=$PYTHON has no lm_eval (set PYTHON=/opt/lmeval-venv/bin/python)"
  task_dir="$(mktemp -d /tmp/lm_eval_tasks.XXXXXX)"
  trap 'rm -rf "$task_dir"' EXIT
  "$PYTHON" "$here/lm_eval_compare.py" write-tasks --task-data "$data" --out "$task_dir" \
    --tasks "$tasks" ${fewshot:+--num-fewshot "$fewshot"} >/dev/null
  "$PYTHON" "$here/lm_eval_compare.py" verify --dir "$task_dir"
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  for g in "${groups[@]}"; do
    case "$g" in
      mmlu) t=local_mmlu ;; bbh) t=local_bbh_cot_fewshot ;; gsm8k) t=local_gsm8k ;;
      ifeval) t=local_ifeval ;; *) die "unknown task group $g" ;;
    esac
    hdir="$harness_out/$g"
    rm -rf "$hdir"; mkdir -p "$hdir"
    cmd=("$PYTHON" -m lm_eval run --model hf
      --model_args "pretrained=$model,dtype=float32"
      --device cpu --batch_size 1 --tasks "$t" --include_path "$task_dir"
      --log_samples --output_path "$hdir")
    [[ -n "$limit" ]] && cmd+=(--limit "$limit")
    [[ -n "$max_gen" && "$g" != mmlu ]] && cmd+=(--gen_kwargs "max_gen_toks=$max_gen")
    run_logged harness "$g" "$hdir" harness_seconds.txt
    if [[ "$g" == gsm8k ]]; then
      n=$(awk 'END { print NR }' "$data/gsm8k/test.jsonl")
      [[ -n "$limit" && "$limit" -lt "$n" ]] && n="$limit"
      "$PYTHON" "$here/lm_eval_compare.py" fewshot --task-data "$data" --n "$n" \
        --out "$hdir/gsm8k_fewshot_indices.jsonl" 2>/dev/null
    fi
    sed -n '/^|/p' "$hdir/stdout.txt" >&2 || true
  done
  hroot="$harness_out"
else
  hroot="$reuse"
  [[ -d "$hroot" ]] || die "--reuse-harness: no directory $hroot"
fi

# ---------------------------------------------------------------- peft-wit half
if [[ "$skip_peft" == 0 ]]; then
  if [[ ! -x "$PEFT_WIT" ]]; then
    echo "lm_eval_compare: no peft-wit binary at $PEFT_WIT (build it with cargo build --release," \
      "or set PEFT_WIT=...); showing the harness side only" >&2
    skip_peft=1
  elif ! "$PEFT_WIT" eval --help >/dev/null 2>&1; then
    echo "lm_eval_compare: $PEFT_WIT has no 'eval' subcommand yet; showing the harness side only" >&2
    skip_peft=1
  fi
fi
if [[ "$skip_peft" == 0 ]]; then
  for g in "${groups[@]}"; do
    pdir="$out/peft/$g"
    rm -rf "$pdir"; mkdir -p "$pdir"
    cmd=("$PEFT_WIT" eval --model "$model" --base --tasks "$g" --task-data "$data"
      --json "$pdir/peft_wit.json" --log-samples "$pdir/peft_wit_samples.jsonl")
    [[ -n "$limit" ]] && cmd+=(--limit "$limit")
    [[ -n "$max_gen" && "$g" != mmlu ]] && cmd+=(--max-gen-toks "$max_gen")
    [[ -n "$fewshot" && "$g" == mmlu ]] && cmd+=(--num-fewshot "$fewshot")
    # results in the harness's layout, where this peft-wit has the flag
    "$PEFT_WIT" eval --help 2>/dev/null | grep -- '--output-path' >/dev/null &&
      cmd+=(--output-path "$pdir/harness_layout")
    # shellcheck disable=SC2206
    [[ -n "${PEFT_WIT_ARGS:-}" ]] && cmd+=($PEFT_WIT_ARGS)
    run_logged peft-wit "$g" "$pdir" peft_wit_seconds.txt
  done
fi

# ---------------------------------------------------------------- table
echo
"$PYTHON" "$here/lm_eval_compare.py" compare --tasks "$tasks" --harness-root "$hroot" \
  --peft-root "$out/peft" --show "$show" --json-out "$out/compare.json"
echo "files: $out" >&2
