#!/usr/bin/env python3
"""The `peft-wit bench train` workload in PyTorch + PEFT, to measure the ratio on one machine.

Not part of CI. Needs: pip install torch transformers peft gguf (CPU wheels are fine).
    python benches/torch_peft.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --batch-size 4 --seq-len 256
Prints tokens/s (median of the timed steps after one warm-up) and peak RSS, like
`peft-wit bench train --batch-size 4 --seq-len 256 --rank 16`.
"""
import argparse, json, os, resource, statistics, sys, time

import torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model

p = argparse.ArgumentParser()
p.add_argument("--gguf", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--seq-len", type=int, default=256)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
p.add_argument("--json", action="store_true", help="print the result as one JSON object")
args = p.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(0)
dtype = getattr(torch, args.dtype)
model = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(os.path.abspath(args.gguf)), gguf_file=os.path.basename(args.gguf),
    dtype=dtype, attn_implementation="sdpa")
config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
model = get_peft_model(model, config)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
vocab = model.config.vocab_size
tokens = args.batch_size * args.seq_len
times = []
for step in range(1 + args.steps):
    ids = torch.randint(3, vocab, (args.batch_size, args.seq_len))
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    print(f"{'warmup' if step == 0 else 'train'}: {tokens / dt:.1f} tokens/s", file=sys.stderr, flush=True)
    if step > 0:
        times.append(dt)
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if args.json:
    print(json.dumps({"impl": f"torch {torch.__version__} + peft", "dtype": args.dtype,
                      "train_tokens_per_s": tokens / statistics.median(times),
                      "peak_rss_mb": peak_mb, "threads": args.threads}))
    sys.exit(0)
print(f"torch {torch.__version__} + peft, {args.dtype}, batch {args.batch_size}x{args.seq_len}, r{args.rank}, {args.threads} threads:")
print(f"  train step (fwd+bwd+AdamW): {tokens / statistics.median(times):.1f} tokens/s (median of {args.steps})")
print(f"  peak RSS:                   {peak_mb:.0f} MB")
