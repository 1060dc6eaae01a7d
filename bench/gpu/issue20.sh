#!/usr/bin/env bash
# Issue 20's measurements on a lent GPU, in one device call after `bash .gpu/a/install.sh stash`
# (see bench/NOTES.md, "Reproducing the GPU rows"): the TTFT breakdown and the concurrency table with the
# engine in its own process, beside mlx_lm.server and mlx's plain decode loop of the same run.
# Usage: bash bench/gpu/issue20.sh SECONDS_FOR_TTFT SECONDS_FOR_CONCURRENCY   (logs and JSON under $OUT)
set -uo pipefail
bash .gpu/b/install.sh install > "$OUT/install.log" 2>&1 || { tail -5 "$OUT/install.log"; exit 1; }
export XDG_CACHE_HOME=/root/xdg PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
start=$(date +%s)
timeout "${1:-260}" python3 -m bench.ttft --device gpu --model llama-8b --breakdown --repeats 5 \
  --engine-layout process --out "$OUT/ttft-gpu-llama-8b-process.json" > "$OUT/ttft.log" 2>&1
echo "ttft: exit $? after $(( $(date +%s) - start )) s"; grep -v "^\[transformers\]" "$OUT/ttft.log" | tail -14
start=$(date +%s)
timeout "${2:-260}" python3 -m bench.concurrency --device gpu --model llama-8b --clients 32,64 \
  --closed-clients 64,128 --closed-duration 15 --ceiling --modes balanced --layouts process --skip-shared \
  --out "$OUT/concurrency-gpu-llama-8b-process.json" > "$OUT/concurrency.log" 2>&1
echo "concurrency: exit $? after $(( $(date +%s) - start )) s"; grep -v "^\[transformers\]" "$OUT/concurrency.log" | tail -30
