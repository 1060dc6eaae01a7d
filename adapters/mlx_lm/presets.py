"""Builds the project's own models: real mlx-lm architectures with seeded random weights.

No model can be downloaded on our machines, so tests and the default ``serve`` use models that this
module writes: a ``llama`` config, safetensors weights, and a byte-level BPE tokenizer trained on the
Python standard library's sources, with a ChatML chat template. ``mlx_lm.load`` reads the result like
any downloaded model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters.mlx_lm.model_dirs import building

# Re-exported: where built models are cached (one helper, adapters.setup, knows every default directory).
from adapters.setup import default_models_dir

__all__ = ["PRESETS", "Preset", "build_model", "default_models_dir", "preset_dir"]

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB = 32000
TOKENIZER_CORPUS_CHARS = 8_000_000
# Shards keep each write bounded and give progress on the large shapes.
SHARD_BYTES = 2 * 1024**3

# ChatML (HF renders with trim_blocks: a newline right after a tag is dropped, hence {{ '\\n' }}), with a
# Hermes-style tool section (as Qwen2.5's): tools listed in the system turn, calls as
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>, results in tool turns. mlx-lm
# infers its json_tools parser from these markers.
CHAT_TEMPLATE = (
    "{% macro text(content) %}"
    "{% if content is string %}{{ content }}"
    "{% elif content %}{% for part in content %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages and messages[0]['role'] == 'system' %}{{ text(messages[0]['content']) }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n' }}</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "<|im_start|>{{ message['role'] }}\n{{ text(message['content']) }}"
    "{% if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{% for tool_call in message['tool_calls'] %}"
    "{% if tool_call['function'] is defined %}{% set tool_call = tool_call['function'] %}{% endif %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    '<tool_call>\n{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}'
    "\n</tool_call>"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    """A model shape. ``vocab_size`` None means the tokenizer's own size."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    dtype: str
    vocab_size: int | None = None
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # head_dim 32: the smallest that KV quantisation's group sizes (32/64/128) divide.
        Preset("tiny", 128, 2, 256, 4, 2, 8192, "float32"),
        Preset("small", 512, 8, 1536, 8, 4, 8192, "float32"),
        # Real shapes for GPU benchmarks: Llama-3.2-1B and Llama-3.1-8B (128K-entry vocabulary; the
        # tokenizer's 32K ids are the ones that can be sampled).
        Preset("llama-1b", 2048, 16, 8192, 32, 8, 131072, "bfloat16", 128256, 500000.0, True),
        Preset("llama-8b", 4096, 32, 14336, 32, 8, 131072, "bfloat16", 128256, 500000.0, False),
    )
}


# Bump when the builder's output changes, so that cached builds of older shapes are not reused.
BUILDER_VERSION = 1


def preset_dir(name: str, seed: int = 0, models_dir: Path | None = None) -> Path:
    """A build's directory, named by preset, seed and a digest of everything that shapes the files."""
    recipe = repr((PRESETS[name], BUILDER_VERSION, TOKENIZER_VOCAB, TOKENIZER_CORPUS_CHARS, CHAT_TEMPLATE))
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    return (models_dir or default_models_dir()) / f"{name}-seed{seed}-{digest}"


def _corpus() -> list[str]:
    """Real text every machine has: the standard library's sources, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        text = path.read_text("utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= TOKENIZER_CORPUS_CHARS:
            break
    return texts


def _train_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # type: ignore[assignment]
    tok.decoder = decoders.ByteLevel()  # type: ignore[assignment]
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "model_max_length": 1_000_000,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    return tok.get_vocab_size()


def _save_weights(model: object, out: Path, progress: Callable[[str], None]) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))  # type: ignore[attr-defined]
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for key in sorted(weights):
        if size >= SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = weights[key]
        size += weights[key].nbytes
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.eval(shard)
        mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
        progress(f"wrote {name} ({sum(a.nbytes for a in shard.values()) / 1e6:.0f} MB)")


def build_model(
    name: str,
    seed: int = 0,
    models_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build (once; cached) the preset ``name`` and return its directory.

    The same preset and seed give byte-identical files on the same Python (its sources train the
    tokenizer). The directory appears atomically: a half-built model is never seen.

    Raises:
        KeyError: ``name`` is not a preset.
    """
    preset = PRESETS[name]
    say = progress or (lambda msg: logger.info("build-model %s: %s", name, msg))
    final = preset_dir(name, seed, models_dir)
    if (final / "config.json").exists():
        return final
    with building(final) as tmp:
        import mlx.core as mx
        from mlx_lm.models.llama import Model, ModelArgs

        start = time.perf_counter()
        say("training tokenizer on the standard library's sources")
        tok_vocab = _train_tokenizer(tmp)
        vocab_ids = json.loads((tmp / "tokenizer.json").read_text())["added_tokens"]
        ids = {t["content"]: t["id"] for t in vocab_ids}
        config = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": preset.hidden_size,
            "num_hidden_layers": preset.num_hidden_layers,
            "intermediate_size": preset.intermediate_size,
            "num_attention_heads": preset.num_attention_heads,
            "num_key_value_heads": preset.num_key_value_heads,
            "max_position_embeddings": preset.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": preset.rope_theta,
            "vocab_size": preset.vocab_size or tok_vocab,
            "tie_word_embeddings": preset.tie_word_embeddings,
            "torch_dtype": preset.dtype,
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "mlx_gateway": {"preset": name, "seed": seed, "tokenizer_vocab_size": tok_vocab},
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        say(f"initialising {name} weights (seed {seed}, {preset.dtype})")
        mx.random.seed(seed)
        args = ModelArgs.from_dict(config)
        model = Model(args)
        model.set_dtype(getattr(mx, preset.dtype))
        _save_weights(model, tmp, say)
    say(f"done in {time.perf_counter() - start:.1f}s: {final}")
    return final


def directory_digest(path: Path) -> str:
    """sha256 over a model directory's file names and bytes (for reproducibility checks)."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
