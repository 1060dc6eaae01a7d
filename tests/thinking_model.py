"""A thinking model for tests: the tiny preset with Qwen3's think markers and a template that opens the block.

The tiny model's tokenizer gains ``<think>`` and ``</think>`` as added (not special) tokens, ids 32000 and
32001, so that mlx-lm's ``TokenizerWrapper.has_thinking`` finds them as it does in Qwen3's vocabulary; the
embedding (tied to the output layer) gains a row for each, and the chat template's generation prompt ends
with ``<think>\\n`` as Qwen3's does. The ``</think>`` row is zero: its logit is 0 at every step, so a
request's ``logit_bias`` alone decides how likely the model is to close the block (the tiny model's
log-sum-exp of logits stays near 10.9: a bias of 9 closes it with probability about 0.13 a step).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from adapters.mlx_lm.model_dirs import building
from adapters.mlx_lm.presets import build_model

__all__ = ["THINK_END_ID", "THINK_START_ID", "build_thinking_model"]

THINK_START_ID = 32000
THINK_END_ID = 32001
_GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def build_thinking_model(models_dir: Path) -> Path:
    """Build (once per ``models_dir``) the thinking model beside the tiny one; return its directory."""
    import mlx.core as mx

    tiny = build_model("tiny", models_dir=models_dir)
    final = models_dir / f"thinking-{tiny.name}"
    if (final / "config.json").exists():
        return final
    with building(final) as out:
        for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            shutil.copy(tiny / name, out / name)
        tokenizer = json.loads((out / "tokenizer.json").read_text())
        for token_id, content in ((THINK_START_ID, "<think>"), (THINK_END_ID, "</think>")):
            tokenizer["added_tokens"].append(
                {
                    "id": token_id,
                    "content": content,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": False,
                }
            )
        (out / "tokenizer.json").write_text(json.dumps(tokenizer))
        settings = json.loads((out / "tokenizer_config.json").read_text())
        template = settings["chat_template"]
        assert template.endswith(_GENERATION_PROMPT), "the tiny preset's template changed"
        settings["chat_template"] = template.replace(
            _GENERATION_PROMPT, "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
        )
        (out / "tokenizer_config.json").write_text(json.dumps(settings))
        config = json.loads((out / "config.json").read_text())
        config["vocab_size"] = THINK_END_ID + 1
        config["mlx_gateway"]["tokenizer_vocab_size"] = THINK_END_ID + 1
        (out / "config.json").write_text(json.dumps(config))
        weights = mx.load(str(tiny / "model.safetensors"))
        assert isinstance(weights, dict)
        embed = weights["model.embed_tokens.weight"]
        width = embed.shape[1]
        start_row = mx.random.normal((1, width), key=mx.random.key(7)) / width**0.5  # the others' scale
        weights["model.embed_tokens.weight"] = mx.concatenate([embed, start_row, mx.zeros((1, width))])
        mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    return final
