"""Small GGUF files for tests: llama metadata that the converter accepts unless a test changes it."""

from __future__ import annotations

import struct
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


def write_q4k_gguf(path: Path) -> Path:
    """A one-tensor GGUF file in Q4_K (type 12: 256 values in a 144-byte block), written byte by byte:
    ``mx.save_gguf`` writes only float tensors."""

    def text(value: str) -> bytes:
        raw = value.encode()
        return struct.pack("<Q", len(raw)) + raw

    kvs = [text("general.architecture") + struct.pack("<I", 8) + text("llama")]
    info = text("token_embd.weight") + struct.pack("<IQIQ", 1, 256, 12, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs) + info
    path.write_bytes(head + b"\0" * ((-len(head)) % 32) + b"\0" * 144)
    return path
