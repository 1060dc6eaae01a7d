#!/usr/bin/env bash
# Issue 21's measurement on a lent GPU, in one device call after `bash .gpu/a/install.sh stash` (see
# bench/NOTES.md, "Reproducing the GPU rows"): a 10-turn conversation through previous_response_id against the
# same conversation resent to /v1/chat/completions and to mlx_lm.server, on the 8B shape.
# Usage: bash bench/gpu/issue21.sh SECONDS   (logs and JSON under $OUT)
set -uo pipefail
bash .gpu/b/install.sh install > "$OUT/install.log" 2>&1 || { tail -5 "$OUT/install.log"; exit 1; }
export XDG_CACHE_HOME=/root/xdg PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
start=$(date +%s)
timeout "${1:-540}" python3 -m bench.conversation --device gpu --model llama-8b --peer --repeats 3 \
  --out "$OUT/conversation-gpu-llama-8b.json" > "$OUT/conversation.log" 2>&1
echo "conversation: exit $? after $(( $(date +%s) - start )) s"; grep -v "^\[transformers\]" "$OUT/conversation.log" | tail -12
