"""Every way to name a model resolves to files, and the fingerprint follows those files: a stored prefix
cache is never used on weights that changed under the same name (preset, directory, Hugging Face id,
GGUF file)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from adapters.mlx_lm.models import ModelNotFound, ModelSpec, _resolve, model_fingerprint
from adapters.mlx_lm.presets import build_model
from tests.adapters.gguf_files import write_gguf


def fingerprint(source: str, models_dir: Path) -> str:
    return model_fingerprint(Path(_resolve(ModelSpec("m", source, models_dir=str(models_dir)))), "float32")


def _swap_weights(directory: Path) -> None:
    weights = mx.load(str(directory / "model.safetensors"))
    assert isinstance(weights, dict)
    weights = {k: v + 1 if k.endswith("norm.weight") else v for k, v in weights.items()}
    target = directory / "model.safetensors"
    if target.is_symlink():
        target.unlink()  # a Hugging Face snapshot links to its blobs
    mx.save_safetensors(str(target), weights, metadata={"format": "mlx"})


def test_a_directory_and_a_preset(tmp_path: Path, models_dir: Path) -> None:
    tiny = build_model("tiny", models_dir=models_dir)
    copy = tmp_path / "my-model"
    shutil.copytree(tiny, copy)
    assert fingerprint("tiny", models_dir) == fingerprint(str(copy), models_dir)
    before = fingerprint(str(copy), models_dir)
    _swap_weights(copy)
    assert fingerprint(str(copy), models_dir) != before


def test_a_hugging_face_id_follows_its_snapshot(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached snapshot, offline, as a user's machine has it; then the same id with new weights."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # read at call time; the env only at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = hub / "models--someone--tiny-model"
    (repo / "refs").mkdir(parents=True)
    for commit in ("a" * 40, "b" * 40):
        shutil.copytree(build_model("tiny", models_dir=models_dir), repo / "snapshots" / commit)
    _swap_weights(repo / "snapshots" / ("b" * 40))
    (repo / "refs" / "main").write_text("a" * 40)
    first = fingerprint("someone/tiny-model", models_dir)
    assert _resolve(ModelSpec("m", "someone/tiny-model", models_dir=str(models_dir))).endswith("a" * 40)
    (repo / "refs" / "main").write_text("b" * 40)  # the id now points at other weights
    assert fingerprint("someone/tiny-model", models_dir) != first
    with pytest.raises(ModelNotFound, match="'someone/unknown' is not a local directory"):
        _resolve(ModelSpec("m", "someone/unknown", models_dir=str(models_dir)))


def test_a_gguf_file_is_named_by_its_digest(tmp_path: Path) -> None:
    from adapters.mlx_lm.gguf import build_from_gguf

    path = write_gguf(tmp_path / "m.gguf", mx.zeros((3, 8)), **{"tokenizer.ggml.pre": "gpt2"})
    first = build_from_gguf(path, tmp_path / "models")
    write_gguf(path, mx.ones((3, 8)), **{"tokenizer.ggml.pre": "gpt2"})
    second = build_from_gguf(path, tmp_path / "models")
    assert first != second and model_fingerprint(first, "f") != model_fingerprint(second, "f")
