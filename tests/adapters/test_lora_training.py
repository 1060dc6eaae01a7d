"""tests/lora_training.py: the float32 copy is the served model, and each adapter trained there by mlx-lm's
own trainer answers held-out questions in its format, which the base model never writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import generate
from mlx_lm import load as mlx_lm_load
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.utils import dequantize_model, load_model

from adapters.mlx_lm.registry_models import build_registry_model
from tests.lora_training import (
    HELD_OUT_QUESTIONS,
    KINDS,
    check_format,
    dataset,
    smollm2_float32_dir,
    trained_adapter,
    training_config,
)

MAX_TOKENS = 32
BEHAVIOURS = ("json", "shout")


@pytest.fixture(scope="module")
def float32_dir(models_dir: Path) -> Path:
    return smollm2_float32_dir(models_dir)


@pytest.fixture(scope="module")
def adapter_dirs(float32_dir: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("lora-training")
    dirs = {}
    for kind in (*BEHAVIOURS, "dora"):
        start = time.perf_counter()
        dirs[kind] = trained_adapter(kind, models_dir, work)
        print(f"{kind}: {time.perf_counter() - start:.1f} s")
    return dirs


def load(model_dir: Path, adapter: Path | None = None) -> tuple[Any, Any]:
    """Plain mlx-lm's model (with the adapter applied) and tokenizer."""
    loaded = mlx_lm_load(str(model_dir), adapter_path=None if adapter is None else str(adapter))
    return cast(tuple[Any, Any], loaded)


def answers(model_dir: Path, adapter: Path | None = None) -> list[str]:
    model, tokenizer = load(model_dir, adapter)
    out = []
    for question in HELD_OUT_QUESTIONS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        out.append(generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS))  # greedy: no sampler given
    print(adapter.name if adapter else "base", out)
    return out


def test_float32_dir_holds_the_served_weights(float32_dir: Path, models_dir: Path) -> None:
    """The weights the server computes on a CPU (dequantised, then float32), bit for bit, and the served
    tokenizer files (so the served chat template) as they are."""
    served = build_registry_model("smollm2-135m", models_dir)
    model, _ = load_model(served, lazy=True)
    dequantize_model(model)
    model.set_dtype(mx.float32)
    copy, config = load_model(float32_dir, lazy=True)
    ours = dict(tree_flatten(copy.parameters()))
    theirs = dict(tree_flatten(model.parameters()))
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert isinstance(value, mx.array)
        assert ours[name].dtype == mx.float32
        assert mx.array_equal(ours[name], value).item(), name
    assert "quantization" not in config
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (float32_dir / name).read_bytes() == (served / name).read_bytes()


def test_examples_fit_the_training_length(float32_dir: Path) -> None:
    """No example is cut (the trainer would cut the answer, the only part with a loss)."""
    _, tokenizer = load(float32_dir)
    for kind in KINDS:
        longest = max(len(tokenizer.apply_chat_template(row["messages"])) for row in dataset(kind))
        assert longest <= training_config(kind)["max_seq_length"]


def test_adapters_answer_in_their_own_format(float32_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    for text in answers(float32_dir):
        assert not any(check_format(kind, text) for kind in BEHAVIOURS), text
    for kind in BEHAVIOURS:
        for text in answers(float32_dir, adapter_dirs[kind]):
            assert check_format(kind, text), (kind, text)
            assert not any(check_format(other, text) for other in BEHAVIOURS if other != kind), (kind, text)


def test_dora_adapter_is_a_dora_adapter(float32_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    adapter = adapter_dirs["dora"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dora"
    model, _ = load(float32_dir, adapter)
    assert any(isinstance(m, DoRALinear) for _, m in model.named_modules())
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    base, tokenizer = load(float32_dir)
    prompt = mx.array(tokenizer.apply_chat_template([{"role": "user", "content": HELD_OUT_QUESTIONS[0]}]))[None]
    assert not mx.allclose(model(prompt), base(prompt), atol=1e-3).item()  # its trained weights apply


def test_adapters_are_cached(models_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    for kind, path in adapter_dirs.items():
        start = time.perf_counter()
        assert trained_adapter(kind, models_dir, tmp_path) == path
        assert time.perf_counter() - start < 1.0
        assert {"adapters.safetensors", "adapter_config.json"} <= {p.name for p in path.iterdir()}
    assert len({p.name for p in adapter_dirs.values()}) == len(adapter_dirs)
