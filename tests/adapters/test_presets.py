"""The model builder: real mlx-lm model directories, reproducible byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_lm.tokenizer_utils import load as load_tokenizer

from adapters.mlx_lm.presets import CHAT_TEMPLATE, build_model, directory_digest


def test_same_preset_and_seed_give_identical_files(tmp_path: Path, models_dir: Path) -> None:
    first = build_model("tiny", models_dir=models_dir)
    second = build_model("tiny", models_dir=tmp_path)
    assert directory_digest(first) == directory_digest(second)
    other_seed = build_model("tiny", seed=1, models_dir=tmp_path)
    assert directory_digest(other_seed) != directory_digest(first)


def test_model_directory_is_a_real_mlx_lm_model(models_dir: Path) -> None:
    path = build_model("tiny", models_dir=models_dir)
    assert {p.name for p in path.iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 32000
    tok = load_tokenizer(path)
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    text = "import collections\nprint('héllo wörld')  # real text round-trips\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text and len(ids) < len(text) / 2  # a trained BPE, not bytes
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
