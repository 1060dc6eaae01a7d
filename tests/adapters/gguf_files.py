"""Small GGUF files for tests: llama metadata that the converter accepts unless a test changes it."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx


def write_gguf(path: Path, embedding: mx.array | None = None, **meta: object) -> Path:
    base: dict[str, object] = {
        "general.architecture": "llama",
        "llama.attention.head_count": mx.array(2, dtype=mx.uint32),
        "llama.embedding_length": mx.array(8, dtype=mx.uint32),
        "llama.block_count": mx.array(1, dtype=mx.uint32),
        "llama.feed_forward_length": mx.array(16, dtype=mx.uint32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
    }
    base.update(meta)
    weights = {"token_embd.weight": mx.zeros((3, 8)) if embedding is None else embedding}
    mx.save_gguf(str(path), weights, base)  # type: ignore[arg-type]
    return path
