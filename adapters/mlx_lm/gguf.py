"""GGUF files (llama.cpp's and Ollama's format) as mlx-lm model directories.

``mx.load`` reads a GGUF file itself: F32/F16 tensors as they are, Q4_0/Q4_1/Q8_0 already in mlx's
affine quantised layout (packed uint32 weights, float16 scales and biases, groups of 32), and other types
its reader (gguflib) knows, K-quants among them, dequantised to float16 (so they load, at twice the
file's size or more). What it leaves to us, and this module does:

- llama.cpp's names -> mlx-lm's llama names, and llama.cpp's converter's row permutation of ``attn_q``
  and ``attn_k`` (for its rotary layout) undone, on weights, scales and biases alike;
- a ``config.json`` from the metadata, with mlx-lm's per-layer quantisation where tensors differ in bits
  (SmolLM2's Q4_1 file keeps its embedding in 8 bits);
- a ``tokenizer.json`` (byte-level BPE from the vocabulary and merges, with the pre-tokenizer the file
  names in ``tokenizer.ggml.pre``, as llama.cpp's ``llama-vocab.cpp`` defines it), control tokens
  marked special, and a ``tokenizer_config.json`` with the chat template, BOS and EOS from the metadata.

The directory is built once, atomically, under the models directory, named by the file's digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np

from adapters.mlx_lm.model_dirs import building

__all__ = ["GGUFError", "SUPPORTED_PRE_TOKENIZERS", "build_from_gguf", "file_digest"]

logger = logging.getLogger(__name__)

# Bump when the conversion's output changes, so that older builds are not reused.
CONVERTER_VERSION = 1

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), as Hugging Face pre-tokenizers. The GPT-2
# expression is ByteLevel's own (use_regex=True).
_GPT2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
SUPPORTED_PRE_TOKENIZERS: dict[str, list[dict[str, Any]]] = {
    # LLAMA_VOCAB_PRE_TYPE_GPT2 / MPT / OLMO: the GPT-2 expression alone.
    "gpt2": [_GPT2],
    "default": [_GPT2],
    "mpt": [_GPT2],
    "olmo": [_GPT2],
    # STARCODER / REFACT / SMOLLM / CODESHELL: each digit on its own, then the GPT-2 expression.
    "smollm": [_DIGITS, _GPT2],
    "starcoder": [_DIGITS, _GPT2],
    "refact": [_DIGITS, _GPT2],
    "codeshell": [_DIGITS, _GPT2],
    # LLAMA3 ("llama-bpe"): its own expression, then bytes.
    "llama-bpe": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3}, "behavior": "Isolated", "invert": False},
        {**_GPT2, "use_regex": False},
    ],
}
SUPPORTED_TYPES = "F32, F16, Q4_0, Q4_1 and Q8_0"

_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


class GGUFError(ValueError):
    """A GGUF file this converter cannot turn into an mlx-lm model; the message says what is supported."""


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def build_from_gguf(path: Path, models_dir: Path, chat_template: str | None = None) -> Path:
    """The mlx-lm directory for the GGUF file at ``path``, converted on first use.

    ``chat_template`` replaces the file's own (a curated model whose template lacks a tool section);
    the directory's name then says so, so that the file served as it is keeps its own template.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"No GGUF file at {path}")
    suffix = "" if chat_template is None else f"-t{hashlib.sha256(chat_template.encode()).hexdigest()[:8]}"
    out = models_dir / f"gguf-{path.stem}-{file_digest(path)[:16]}{suffix}-v{CONVERTER_VERSION}"
    if (out / "config.json").exists():
        return out
    logger.info("converting %s to an mlx-lm directory under %s", path.name, models_dir)
    with building(out) as tmp:
        _convert(path, tmp, chat_template)
    return out


def _meta_int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    value = meta.get(key)
    if value is None:
        if default is None:
            raise GGUFError(f"The GGUF file has no '{key}'")
        return default
    return int(cast(Any, value.item() if isinstance(value, mx.array) else value))


def _meta_float(meta: dict[str, Any], key: str, default: float) -> float:
    value = meta.get(key)
    return default if value is None else float(cast(Any, value.item() if isinstance(value, mx.array) else value))


def _convert(path: Path, out: Path, chat_template: str | None) -> None:
    try:
        loaded = mx.load(str(path), return_metadata=True)
        arrays, meta = cast(tuple[dict[str, mx.array], dict[str, Any]], loaded)
    except Exception as exc:  # a file mlx's reader (gguflib) cannot parse
        raise GGUFError(
            f"mlx cannot read {path.name}: {exc}. Tensor types kept quantised: {SUPPORTED_TYPES}; other types "
            "gguflib knows (K-quants) arrive dequantised to float16"
        ) from exc
    arch = str(meta.get("general.architecture", ""))
    if arch != "llama":
        raise GGUFError(f"GGUF architecture '{arch}' is not supported; supported: llama (Llama, SmolLM, Mistral 7B)")
    heads = _meta_int(meta, "llama.attention.head_count")
    kv_heads = _meta_int(meta, "llama.attention.head_count_kv", heads)
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    weights, quantization = _weights(arrays, heads, kv_heads)
    hidden = _meta_int(meta, "llama.embedding_length")
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": _meta_int(meta, "llama.block_count"),
        "intermediate_size": _meta_int(meta, "llama.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": _meta_int(meta, "llama.rope.dimension_count", hidden // heads),
        "rms_norm_eps": _meta_float(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _meta_float(meta, "llama.rope.freq_base", 10000.0),
        "vocab_size": _meta_int(meta, "llama.vocab_size", len(tokens)),
        "max_position_embeddings": _meta_int(meta, "llama.context_length", 4096),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": _meta_int(meta, "tokenizer.ggml.bos_token_id", 0),
        "eos_token_id": _meta_int(meta, "tokenizer.ggml.eos_token_id", 0),
    }
    if quantization:
        config["quantization"] = quantization
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _tokenizer(meta, out, chat_template)


def _weights(arrays: dict[str, mx.array], heads: int, kv_heads: int) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Renamed tensors with the q/k permutation undone, and mlx-lm's quantisation config."""
    out: dict[str, mx.array] = {}
    layer_bits: dict[str, int] = {}
    for name, array in arrays.items():
        base, _, kind = name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk":
            if parts[2] not in _NAMES:
                raise GGUFError(f"Unexpected tensor '{name}' for a llama model")
            target = f"model.layers.{parts[1]}.{_NAMES[parts[2]]}"
            if parts[2] in ("attn_q", "attn_k"):
                array = _unpermute(array, heads if parts[2] == "attn_q" else kv_heads)
        elif base in _NAMES:
            target = _NAMES[base]
        elif base == "rope_freqs":
            continue  # llama 3.1's rope scaling factors: mlx-lm computes them from the config
        else:
            raise GGUFError(f"Unexpected tensor '{name}' for a llama model")
        if kind == "scales":
            packed = arrays[f"{base}.weight"]
            layer_bits[target] = packed.shape[-1] // array.shape[-1]
        out[f"{target}.{kind}"] = array
    if not layer_bits:
        return out, {}
    common = max(set(layer_bits.values()), key=list(layer_bits.values()).count)
    quantization: dict[str, Any] = {"group_size": 32, "bits": common}
    for target, bits in layer_bits.items():
        if bits != common:
            quantization[target] = {"group_size": 32, "bits": bits}
    return out, quantization


def _unpermute(array: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's ``permute``: rows viewed as (heads, 2, half) were stored as (heads, half, 2)."""
    rows = array.shape[0]
    rest = array.shape[1:]
    return array.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _tokenizer(meta: dict[str, Any], out: Path, chat_template: str | None) -> None:
    model = str(meta.get("tokenizer.ggml.model", ""))
    if model != "gpt2":
        raise GGUFError(
            f"GGUF tokenizer model '{model}' is not supported; supported: gpt2 (byte-level BPE), "
            f"with pre-tokenizers {', '.join(sorted(SUPPORTED_PRE_TOKENIZERS))}"
        )
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise GGUFError(
            f"GGUF pre-tokenizer '{pre}' is not supported; supported: {', '.join(sorted(SUPPORTED_PRE_TOKENIZERS))}"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = np.array(meta.get("tokenizer.ggml.token_type", mx.ones(len(tokens))), dtype=np.int32)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    special = [i for i, t in enumerate(types.tolist()) if t in (3, 4)]  # control and user-defined tokens
    pre_tokenizers = SUPPORTED_PRE_TOKENIZERS[pre]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": tokens[i],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i in special
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizers[0]
        if len(pre_tokenizers) == 1
        else {
            "type": "Sequence",
            "pretokenizers": pre_tokenizers,
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": pre == "llama-bpe",
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [list(m) for m in merges],
        },
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    bos = _meta_int(meta, "tokenizer.ggml.bos_token_id", -1)
    eos = _meta_int(meta, "tokenizer.ggml.eos_token_id", -1)
    pad = _meta_int(meta, "tokenizer.ggml.padding_token_id", -1)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos] if 0 <= bos < len(tokens) else None,
        "eos_token": tokens[eos] if 0 <= eos < len(tokens) else None,
        "pad_token": tokens[pad] if 0 <= pad < len(tokens) else None,
        "unk_token": None,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", mx.array(False)).item()),
        "model_max_length": _meta_int(meta, "llama.context_length", 4096),
        "clean_up_tokenization_spaces": False,
    }
    template = chat_template or meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
