"""KV arrays of a prefix: trimmed to the prefix's length, saved and loaded with mlx-lm's own
functions, handed out as per-request views, and hashed for integrity checks.

Only called on the engine thread (it touches MLX arrays); it holds no state of its own.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache, load_prompt_cache, save_prompt_cache

from prefix_caches.errors import PrefixCacheUnusable

__all__ = ["arrays_sha256", "cache_nbytes", "exact", "load_kv", "quantize", "save_kv", "view"]


def _slice(x: Any, n: int) -> Any:
    if isinstance(x, tuple | list):
        return tuple(a[..., :n, :] for a in x)
    return x[..., :n, :]


def view(cache: list[Any], n: int, dequantize: bool = False) -> list[Any]:
    """A request's own cache over the first ``n`` tokens of ``cache``.

    The slices are new arrays: generation writes into them (or reallocates), never into the stored
    ones, so the stored cache cannot change and no request sees another's tokens. With ``dequantize``,
    quantised layers come back as plain KV: stored small, computed in full precision (mlx's GPU backend
    has no quantized matmul for multi-token queries, and plain KV can join a batch).
    """
    out: list[Any] = []
    for c in cache:
        if isinstance(c, QuantizedKVCache) and dequantize:
            k = KVCache()
            k.keys, k.values = (
                mx.dequantize(*_slice(part, n), group_size=c.group_size, bits=c.bits) for part in (c.keys, c.values)
            )
            k.offset = n
            out.append(k)
        elif isinstance(c, QuantizedKVCache):
            q = QuantizedKVCache(group_size=c.group_size, bits=c.bits)
            q.keys, q.values, q.offset = _slice(c.keys, n), _slice(c.values, n), n
            out.append(q)
        elif type(c) is KVCache:
            k = KVCache()
            k.keys, k.values, k.offset = _slice(c.keys, n), _slice(c.values, n), n
            out.append(k)
        else:
            raise PrefixCacheUnusable(f"prefix caches do not support {type(c).__name__} layers")
    return out


def exact(cache: list[Any]) -> list[Any]:
    """The cache cut to its offset: mlx-lm's buffers hold padding and stale data past it."""
    for c in cache:
        if type(c) not in (KVCache, QuantizedKVCache):
            raise PrefixCacheUnusable(
                f"prefix caches need plain KV caches; this model uses {type(c).__name__} (e.g. a rotating "
                "cache from max_kv_size, or a recurrent layer)"
            )
    offsets = {c.offset for c in cache}
    if len(offsets) != 1:
        raise PrefixCacheUnusable(f"inconsistent cache offsets {sorted(offsets)}")
    result = view(cache, offsets.pop())
    mx.eval([_arrays(c) for c in result])
    return result


def quantize(cache: list[Any], bits: int, group_size: int) -> list[Any]:
    out = [c.to_quantized(group_size=group_size, bits=bits) if isinstance(c, KVCache) else c for c in cache]
    mx.eval([_arrays(c) for c in out])
    return out


def _arrays(c: Any) -> list[mx.array]:
    arrays: list[mx.array] = []
    for part in (c.keys, c.values):
        arrays.extend(part if isinstance(part, tuple | list) else [part])
    return arrays


def cache_nbytes(cache: list[Any]) -> int:
    return sum(a.nbytes for c in cache for a in _arrays(c))


def arrays_sha256(cache: list[Any]) -> str:
    """A digest of every KV array's bytes, in layer order (what isolation tests compare)."""
    import numpy as np

    digest = hashlib.sha256()
    for c in cache:
        for a in _arrays(c):
            digest.update(str((a.shape, a.dtype)).encode())
            digest.update(np.asarray(a.view(mx.uint8)).tobytes())
    return digest.hexdigest()


def save_kv(path: Path, cache: list[Any], metadata: dict[str, str]) -> None:
    """Write with mlx-lm's format to ``path`` (which must end in .safetensors); not atomic by itself."""
    save_prompt_cache(str(path), cache, metadata)


def load_kv(path: Path) -> tuple[list[Any], dict[str, str]]:
    try:
        cache, metadata = load_prompt_cache(str(path), return_metadata=True)
        mx.eval([_arrays(c) for c in cache])
    except Exception as exc:  # truncated or garbled files surface as many exception types
        raise PrefixCacheUnusable(f"cannot read {path.name}: {type(exc).__name__}: {exc}") from exc
    return cache, metadata
