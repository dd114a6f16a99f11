#!/usr/bin/env bash
# peft-wit vs PyTorch + PEFT on the same workload and machine (the ratio is what counts: these
# machines are noisy). Each figure comes from its own process so peak RSS is per workload.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
args=(--batch-size "${BATCH:-4}" --seq-len "${SEQ:-256}" --rank 16 --steps "${STEPS:-5}")
cargo build --release --quiet
for dtype in f32 quantized bf16; do
  ./target/release/peft-wit bench train --base-dtype "$dtype" "${args[@]}" 2>/dev/null
done
if python3 -c "import torch, transformers, peft, gguf" 2>/dev/null; then
  python3 benches/torch_peft.py "${args[@]}"
else
  echo "(PyTorch + PEFT not installed: pip install torch transformers peft gguf to compare)"
fi
