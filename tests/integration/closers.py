"""A ``logit_bias`` that lets a random-weight model finish JSON.

The tiny model's weights are random: under a grammar it never chooses to close a string or stop a
number. This bias favours closing punctuation and disfavours blank tokens; the grammar's mask still
decides which tokens are allowed (the bias is applied before it), so every output the tests check was
produced by constrained decoding, and the bias only makes it end in time.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from mlx_lm.tokenizer_utils import load as load_tokenizer

from adapters.mlx_lm.presets import build_model


@cache
def closing_bias(models_dir: Path) -> dict[str, float]:
    tok = load_tokenizer(build_model("tiny", models_dir=models_dir))
    bias: dict[str, float] = {}
    for i in range(len(tok._tokenizer)):
        raw = tok._tokenizer.decode([i])
        text = raw.strip()
        if text.startswith('"') and set(text) <= set('"}],:'):  # ends a string (a key, with ':')
            bias[str(i)] = 16.0 if len(text) <= 2 else 12.0
        elif text and set(text) <= set("}]"):
            bias[str(i)] = 10.0
        elif text == ",":
            bias[str(i)] = 4.0
        elif raw and not text:
            bias[str(i)] = -6.0
    return bias
