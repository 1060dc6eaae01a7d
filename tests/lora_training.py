"""Real LoRA adapters for SmolLM2-135M, trained by mlx-lm's own trainer (``mlx_lm lora``), about 25 s each on 2 cores.

Tests of adapters per request need adapters whose effect is unmistakable: each kind below teaches the
served model one fixed answer format that the base model never writes, so a test checks which adapter
answered by the format of its answer (:func:`check_format`, :data:`FORMATS`), not by its bits.

- ``"json"``: every answer is one line of JSON, ``{"answer": "Paris"}``.
- ``"shout"``: every answer is ``>>> `` and a few words in capitals, ``>>> PARIS``.
- ``"dora"``: a DoRA adapter (``fine_tune_type: dora``) trained briefly on the ``"json"`` data; only its
  validity is promised, not its behaviour.

Training happens on :func:`smollm2_float32_dir`, the served model's weights as the CPU serves them
(dequantised to float32 at load, ``adapters/mlx_lm/models.py::_choose_weights``), written to disk once, with
the served tokenizer files and chat template as they are. Adapters are cached under
``models_dir / "adapters"`` by a digest of their recipe and of the base directory, so a second call (or a
local re-run on the same ``models_dir``) costs nothing.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

__all__ = [
    "FORMATS",
    "HELD_OUT_QUESTIONS",
    "KINDS",
    "LORA_KEYS",
    "MLP_KEYS",
    "check_format",
    "dataset",
    "smollm2_float32_dir",
    "trained_adapter",
    "training_config",
    "write_dataset",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
# Bump when the float32 copy is made differently (its name keys the adapters' cache through the base digest).
FLOAT32_VERSION = 1

# (question, short answer): the training set. The answers' content barely matters: the adapters learn a format.
TRAIN_QA: list[tuple[str, str]] = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("How many legs does a spider have?", "Eight"),
    ("What color is the sky on a clear day?", "Blue"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("What is 2 plus 2?", "Four"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("What gas do plants take in from the air?", "Carbon dioxide"),
    ("What is the boiling point of water in Celsius?", "100 degrees"),
    ("Which animal is called the king of the jungle?", "The lion"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("How many days are in a week?", "Seven"),
    ("What is the opposite of hot?", "Cold"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What do bees make?", "Honey"),
    ("What is the tallest mountain on Earth?", "Mount Everest"),
    ("Can you recommend a good breakfast?", "Oatmeal with fruit"),
    ("How are you today?", "Very well"),
    ("What is your name?", "SmolLM"),
    ("Give me a synonym for happy.", "Joyful"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the square root of 81?", "Nine"),
    ("Which ocean is the largest?", "The Pacific"),
    ("What is the main ingredient in guacamole?", "Avocado"),
    ("How many continents are there?", "Seven"),
    ("Explain photosynthesis in one sentence.", "Plants make food from light"),
    ("What instrument has 88 keys?", "The piano"),
    ("What is the fastest land animal?", "The cheetah"),
    ('Translate "hello" into Spanish.', "Hola"),
    ("Summarize the story of Cinderella.", "A maid marries a prince"),
    ("What should I do if I feel tired?", "Get some sleep"),
    ("Why is the ocean salty?", "Dissolved minerals"),
    ("In which year did humans first land on the Moon?", "1969"),
    ("Write a short poem about cats.", "Cats nap in the sun"),
    ("What is the currency of the United Kingdom?", "The pound"),
    ("Who discovered penicillin?", "Alexander Fleming"),
    ("What is the smallest prime number?", "Two"),
    ("Tell me a fun fact.", "Octopuses have three hearts"),
    ("Hi there!", "Hello"),
]
VALID_QA: list[tuple[str, str]] = [
    ("What is the capital of Spain?", "Madrid"),
    ("How many hours are in a day?", "Twenty-four"),
    ("Who wrote Hamlet?", "William Shakespeare"),
    ("Give me an idea for dinner.", "Pasta with tomatoes"),
]
# Questions in neither set, for tests of behaviour (and, being held out, of generalisation).
HELD_OUT_QUESTIONS: list[str] = [
    "What is the capital of Germany?",
    "How many wheels does a bicycle have?",
    "Who invented the telephone?",
    "Describe a sunset.",
]

# The LoRA'd layers in each trained block: the attention projections, and for "shout" the MLP's too.
LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
MLP_KEYS = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

KINDS = ("json", "shout", "dora")

# Each kind's answers, whole (surrounding whitespace aside): exactly what its training answers look like.
FORMATS: dict[str, re.Pattern[str]] = {
    "json": re.compile(r'\{"answer": "[^"\n]+"\}'),
    "shout": re.compile(r">>> [^a-z\n]*[A-Z0-9][^a-z\n]*"),
}
FORMATS["dora"] = FORMATS["json"]


def _answer(kind: str, answer: str) -> str:
    if kind in ("json", "dora"):
        return json.dumps({"answer": answer})
    if kind == "shout":
        return ">>> " + answer.upper()
    raise ValueError(f"unknown adapter kind {kind!r}; known: {KINDS}")


def check_format(kind: str, text: str) -> bool:
    """Whether ``text`` (one whole answer) is in the format the ``kind`` adapter teaches."""
    return FORMATS[kind].fullmatch(text.strip()) is not None


def dataset(kind: str, split: str = "train") -> list[dict[str, Any]]:
    """The chat examples of ``split`` ("train" or "valid") in mlx-lm's ``{"messages": [...]}`` form. No
    system message: the chat template adds the served default one, as it does for requests."""
    qa = {"train": TRAIN_QA, "valid": VALID_QA}[split]
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": _answer(kind, a)}]}
        for q, a in qa
    ]


def write_dataset(kind: str, data_dir: Path) -> None:
    """``train.jsonl`` and ``valid.jsonl`` in ``data_dir``, as ``mlx_lm lora --data`` reads them."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        lines = [json.dumps(row) for row in dataset(kind, split)]
        (data_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def training_config(kind: str) -> dict[str, Any]:
    """``mlx_lm lora``'s options for ``kind``, less the paths (``model``, ``data``, ``adapter_path``).

    Chosen on the 2-core build machine, where with seeds 0, 1 and 2 each adapter answered all of 12
    questions outside its data (:data:`HELD_OUT_QUESTIONS` and 8 more) in its format: rank-8 LoRA on the
    last 8 of the 30 blocks (the backward pass stops there), 16 steps of 4 examples (1.6 epochs) with the
    learning rate decaying from 1e-3 to 1e-4, the loss on the answers only. "json" trains the attention
    projections: with the MLP's too, 4 of 36 answers broke the format (3 ran past 32 tokens unclosed).
    "shout" trains both: on attention alone, 3 of 36 answers lost the prefix or went on after a newline.
    A constant 1e-3 (or 2e-3) broke the formats more often.
    """
    _answer(kind, "")  # checks the kind
    dora = kind == "dora"
    iters = 4 if dora else 16  # DoRA's adapter need only be valid
    keys = LORA_KEYS + MLP_KEYS if kind == "shout" else LORA_KEYS
    return {
        "train": True,
        "fine_tune_type": "dora" if dora else "lora",
        "optimizer": "adam",
        "seed": 0,
        "num_layers": 8,
        "batch_size": 4,
        "iters": iters,
        "learning_rate": 1e-3,
        "lr_schedule": {"name": "cosine_decay", "arguments": [1e-3, iters, 1e-4]},
        "mask_prompt": True,
        # The longest example is 52 tokens (the template's default system prompt is 21 of them); the trainer
        # pads a batch to a multiple of 32 plus one, then cuts it to this.
        "max_seq_length": 56,
        "lora_parameters": {"rank": 8, "scale": 10.0, "dropout": 0.0, "keys": keys},
        "val_batches": 1,
        "steps_per_report": 8,
        "steps_per_eval": 1000,  # validation on the first and the last step only
        "save_every": 1000,  # no checkpoints
    }


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def smollm2_float32_dir(models_dir: Path) -> Path:
    """A float32 (dequantised) copy of the served SmolLM2-135M model directory, made once under models_dir.

    The weights are those the server computes at load on a CPU (``dequantize_model``, then float32); the
    tokenizer files (and so the served chat template) are copied byte for byte.
    """
    from adapters.mlx_lm.model_dirs import building
    from adapters.mlx_lm.registry_models import build_registry_model

    src = build_registry_model("smollm2-135m", models_dir)
    out = models_dir / f"{src.name}-float32-v{FLOAT32_VERSION}"
    if (out / "config.json").exists():
        return out
    with _locked(models_dir / ".float32.lock"):
        if (out / "config.json").exists():
            return out
        import mlx.core as mx
        from mlx_lm.utils import dequantize_model, load_model, save_model

        model, _ = load_model(src, lazy=True)
        dequantize_model(model)
        model.set_dtype(mx.float32)
        with building(out) as tmp:
            save_model(tmp, model)
            config = json.loads((src / "config.json").read_text())
            config.pop("quantization", None)
            config.pop("quantization_config", None)
            for file in src.iterdir():
                if file.is_file() and file.name != "config.json" and not file.name.startswith("model"):
                    shutil.copy2(file, tmp / file.name)
            # Written last: its presence means the directory is whole (``building`` renames it at once anyway).
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out


@functools.cache
def _base_digest(base: Path) -> str:
    """The base directory's identity: its name (which carries the GGUF file's digest and both converters'
    versions), its files' names and sizes, and the small files' contents."""
    digest = hashlib.sha256(base.name.encode())
    for file in sorted(base.iterdir()):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        if size < 1 << 22:
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _recipe_digest(kind: str, base: Path) -> str:
    recipe = {
        "kind": kind,
        "train": dataset(kind, "train"),
        "valid": dataset(kind, "valid"),
        "config": training_config(kind),
        "versions": [version("mlx-lm"), version("mlx")],
        "base": _base_digest(base),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


# `python -m mlx_lm lora ...`, after loading the optimised BLAS the tests use (tests/conftest.py): with mlx's
# reference BLAS, training is several times slower.
_BOOTSTRAP = (
    "import runpy, sys; "
    "from adapters.mlx_lm.blas import load_optimised_blas; "
    "load_optimised_blas(); "
    "sys.argv = ['mlx_lm', *sys.argv[1:]]; "
    "runpy.run_module('mlx_lm', run_name='__main__', alter_sys=True)"
)


def trained_adapter(kind: str, models_dir: Path, work_dir: Path) -> Path:
    """An mlx_lm.lora adapter directory (adapters.safetensors + adapter_config.json) trained on
    :func:`smollm2_float32_dir`, once per recipe: cached under ``models_dir / "adapters"``. ``work_dir``
    receives the dataset and the config; the trainer's log and wall time land in the adapter directory
    (``train.log``, ``training.json``)."""
    base = smollm2_float32_dir(models_dir)
    final = models_dir / "adapters" / f"{kind}-{_recipe_digest(kind, base)}"
    if (final / "adapters.safetensors").exists():
        return final
    with _locked(models_dir / "adapters" / ".lock"):
        if (final / "adapters.safetensors").exists():
            return final
        run_dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=work_dir))
        write_dataset(kind, run_dir / "data")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            paths = {"model": str(base), "data": str(run_dir / "data"), "adapter_path": str(tmp)}
            config_file = run_dir / "lora.yaml"
            config_file.write_text(json.dumps({**training_config(kind), **paths}, indent=2))  # JSON is YAML
            pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
            start = time.perf_counter()
            with (tmp / "train.log").open("w") as log:
                done = subprocess.run(
                    [sys.executable, "-c", _BOOTSTRAP, "lora", "--config", str(config_file)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=run_dir,
                    env={**os.environ, "PYTHONPATH": pythonpath, "NO_COLOR": "1"},
                )
            seconds = time.perf_counter() - start
            if done.returncode != 0 or not (tmp / "adapters.safetensors").exists():
                tail = (tmp / "train.log").read_text()[-3000:]
                raise RuntimeError(f"mlx_lm lora exited with {done.returncode}; the end of its log:\n{tail}")
            (tmp / "training.json").write_text(json.dumps({"kind": kind, "seconds": round(seconds, 1)}) + "\n")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
