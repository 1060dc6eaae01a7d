#!/usr/bin/env bash
# Issue 23's measurement on a lent GPU, in one device call after `bash .gpu/a/install.sh stash` (see
# bench/NOTES.md, "Reproducing the GPU rows"): 32 clients on the base model against 32 spread over 4 rank-16
# LoRA adapters (q/k/v/o) and the base model, one server, alternated for 2 rounds, then one phase on adapters
# only; the memory each adapter adds and one decode step per row against grouped, in process; 8B shape.
# Usage: bash bench/gpu/issue23.sh SECONDS   (logs and JSON under $OUT; ~6 minutes with the 8B build)
set -uo pipefail
bash .gpu/b/install.sh install > "$OUT/install.log" 2>&1 || { tail -5 "$OUT/install.log"; exit 1; }
export XDG_CACHE_HOME=/root/xdg PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
start=$(date +%s)
timeout "${1:-480}" python3 -m bench.adapters --device gpu --model llama-8b --clients 32 --closed-duration 20 \
  --closed-warmup 8 --rounds 2 --adapters-only --server-log "$OUT/server.log" \
  --out "$OUT/adapters-gpu-llama-8b.json" > "$OUT/adapters.log" 2>&1
echo "adapters: exit $? after $(( $(date +%s) - start )) s"; grep -v "^\[transformers\]" "$OUT/adapters.log" | tail -30
