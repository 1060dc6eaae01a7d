"""A ``logit_bias`` that lets a random-weight model finish JSON.

The tiny model's weights are random: under a grammar it never chooses to close a string or stop a
number. This bias favours closing punctuation and disfavours blank tokens; the grammar's mask still
decides which tokens are allowed (the bias is applied before it), so every output the tests check was
produced by constrained decoding, and the bias only makes it end in time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

from mlx_lm.tokenizer_utils import load as load_tokenizer

from adapters.mlx_lm.presets import build_model


def closing_bias_ids(decode: Callable[[list[int]], str], vocab: int) -> dict[int, float]:
    """Token id -> bias, for any tokenizer's ``decode``."""
    bias: dict[int, float] = {}
    for i in range(vocab):
        raw = decode([i])
        text = raw.strip()
        if text.startswith('"') and set(text) <= set('"}],:'):  # ends a string (a key, with ':')
            bias[i] = 16.0 if len(text) <= 2 else 12.0
        elif text and set(text) <= set("}]"):
            bias[i] = 10.0
        elif text == ",":
            bias[i] = 4.0
        elif raw and not text:
            bias[i] = -6.0
    return bias


@cache
def closing_bias(models_dir: Path) -> dict[str, float]:
    """The tiny model's closing bias in OpenAI's ``logit_bias`` form."""
    tok = load_tokenizer(build_model("tiny", models_dir=models_dir))
    # mlx-lm's wrapper forwards decode() and len() to its Hugging Face tokenizer.
    return {str(i): b for i, b in closing_bias_ids(tok.decode, len(tok)).items()}
