"""Adapters with random factors, saved as ``mlx_lm.lora`` saves a trained one (``adapter_config.json`` +
``adapters.safetensors``): for benchmarks on random-weight models (their speed and memory do not depend on what
the factors hold) and for tests that compare our per-row adapters with mlx-lm's own LoRA and DoRA layers.

The adapter is made by mlx-lm itself (``linear_to_lora_layers`` on a copy of the model), so its names, shapes
and DoRA magnitudes are exactly what a training run would write."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

__all__ = ["ATTENTION_KEYS", "make_random_adapter"]

ATTENTION_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def make_random_adapter(
    model: Any,
    path: Path,
    *,
    rank: int = 16,
    keys: Sequence[str] = ATTENTION_KEYS,
    kind: str = "lora",
    scale: float = 2.0,
    num_layers: int = -1,
    seed: int = 0,
    magnitude: float = 0.02,
) -> Path:
    """Write an adapter for ``model`` (an mlx-lm model, left untouched) at ``path``; returns ``path``.

    Both factors are random (a trained adapter's ``lora_b`` is non-zero; an untrained one's is zero and would
    change nothing), small enough that the model stays a model: ``magnitude`` bounds their entries.
    """
    model = copy.deepcopy(getattr(model, "wrapped", model))
    layers = len(model.layers) if num_layers < 0 else num_layers
    params = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(keys)}
    linear_to_lora_layers(model, layers, params, use_dora=kind == "dora")
    key = mx.random.key(seed)
    weights: dict[str, mx.array] = {}
    for name, value in tree_flatten(model.parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lora_a", "lora_b"):
            key, sub = mx.random.split(key)
            weights[name] = mx.random.uniform(-magnitude, magnitude, value.shape, key=sub).astype(mx.float32)
        elif leaf == "m" and kind == "dora":
            key, sub = mx.random.split(key)
            weights[name] = (value * (1 + 0.1 * mx.random.normal(value.shape, key=sub))).astype(mx.float32)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)
    config = {"fine_tune_type": kind, "num_layers": layers, "lora_parameters": params}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path
