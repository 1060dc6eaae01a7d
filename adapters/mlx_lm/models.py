"""Loading a configured model through mlx-lm's normal path, and its tokenizer (planning's part of it is
:class:`adapters.tokenizer.TextTokenizer`, which a process without mlx can load from :meth:`MlxTokenizer.facts`)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import time
from collections.abc import Generator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import msgspec
from mlx.utils import tree_flatten
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper
from mlx_lm.utils import dequantize_model, load

from adapters.base import OutputConstraint, ToolCalling
from adapters.mlx_lm.constraints import MaskingGrammarCompiler
from adapters.mlx_lm.detokenizer import ByteLevelDetokenizer, byte_decoder, exact_detokenizer
from adapters.mlx_lm.gguf import GGUFError, build_from_gguf
from adapters.mlx_lm.lora import AdapterBank
from adapters.mlx_lm.presets import PRESETS, build_model, default_models_dir
from adapters.mlx_lm.registry_models import REGISTRY_MODELS, build_registry_model
from adapters.setup import ModelSpec
from adapters.tokenizer import TextTokenizer, TokenizerFacts
from adapters.upstream import hf_tokenizer, snapshot_download

__all__ = ["SOURCE_ERRORS", "LoadedModel", "MlxTokenizer", "ModelNotFound", "ModelSpec", "load_model", "load_steps"]

logger = logging.getLogger(__name__)


class MlxTokenizer:
    """A model's tokenizer: planning's view (a :class:`TextTokenizer` on the same Hugging Face tokenizer),
    plus what the engine needs: streaming detokenizers, token text for logprobs, grammars that mask logits."""

    def __init__(
        self,
        wrapper: TokenizerWrapper,
        vocab_size: int,
        *,
        path: str | Path | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        """Wrap mlx-lm's tokenizer.

        Args:
            wrapper: mlx-lm's TokenizerWrapper, as ``mlx_lm.load`` gives it.
            vocab_size: the vocabulary size planning sees (at most the model's logits' width).
            path: the directory it was loaded from (default: the one the Hugging Face tokenizer names).
            trust_remote_code: how it was loaded, so that the front end loads it the same way.
        """
        self.wrapper = wrapper
        self._hf: Any = hf_tokenizer(wrapper)
        parser = wrapper.tool_parser
        facts = TokenizerFacts(
            path=str(path if path is not None else self._hf.name_or_path),
            vocab_size=vocab_size,
            eos_token_ids=tuple(sorted(wrapper.eos_token_ids)),
            # mlx-lm names a format by its parser's module (mlx_lm.tool_parsers.json_tools).
            tool_call_format=None if parser is None else str(parser.__module__).rsplit(".", 1)[-1],
            tool_call_start=wrapper.tool_call_start,
            tool_call_end=wrapper.tool_call_end,
            trust_remote_code=trust_remote_code,
        )
        self.text = TextTokenizer(self._hf, facts, compiler=MaskingGrammarCompiler)
        self._id_to_piece: list[str | None] = self._hf.convert_ids_to_tokens(list(range(len(self._hf))))
        self._detokenizer = exact_detokenizer(wrapper, self._id_to_piece)
        self._byte_level = isinstance(self._detokenizer, ByteLevelDetokenizer)

    def facts(self) -> TokenizerFacts:
        """What a process without mlx needs to tokenise as this model does (:meth:`TextTokenizer.load`)."""
        return self.text.facts

    @property
    def grammars(self) -> MaskingGrammarCompiler:
        """The model's grammar compiler, shared with planning's checks, built on first use."""
        grammars = self.text.grammars
        assert isinstance(grammars, MaskingGrammarCompiler)  # the compiler class given to TextTokenizer
        return grammars

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer whose text is exactly the tokens' decoding.

        mlx-lm's own drops the first leading space, which loses text for completions (``x =`` + `` 5``):
        see :mod:`adapters.mlx_lm.detokenizer`.
        """
        detok = copy.copy(self._detokenizer)
        detok.reset()
        return detok

    # PromptTokenizer, for planning in the engine's process: the TextTokenizer's.

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def tool_call_format(self) -> str | None:
        return self.text.tool_call_format

    def encode(self, text: str) -> list[int]:
        return self.text.encode(text)

    def encode_after(self, prefix_text: str, prefix_tokens: Sequence[int], text: str) -> list[int]:
        return self.text.encode_after(prefix_text, prefix_tokens, text)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.text.decode(tokens)

    def render_chat(
        self, messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool, tools: object = None
    ) -> str:
        return self.text.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def check_constraint(self, constraint: OutputConstraint) -> None:
        self.text.check_constraint(constraint)

    def tool_call_constraint(self, tools: ToolCalling) -> OutputConstraint:
        return self.text.tool_call_constraint(tools)

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.text.facts.eos_token_ids)

    def token_text(self, token: int) -> tuple[str, tuple[int, ...]]:
        """A single token's text and its exact bytes (for logprobs)."""
        return _token_text(self, token)


def _token_text(tok: MlxTokenizer, token: int) -> tuple[str, tuple[int, ...]]:
    piece = tok._id_to_piece[token] if tok._byte_level and token < len(tok._id_to_piece) else None
    if piece is not None:
        table = byte_decoder()
        if all(ch in table for ch in piece):
            raw = bytes(table[ch] for ch in piece)
            return raw.decode("utf-8", errors="replace"), tuple(raw)
    text = tok._hf.decode([token])
    return text, tuple(text.encode())


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: MlxTokenizer
    path: Path
    context_length: int
    vocab_size: int
    dtype: str
    created: int
    fingerprint: str
    tokenizer_fingerprint: str = ""
    chat_template_fingerprint: str = ""
    head_dim: int = 0
    weights: str = ""  # the weight format chosen for this backend, and why
    kv_bytes_per_token: int = 0  # one position of one sequence, every layer's keys and values
    kv_budget: int = 0  # bytes of KV that running sequences may hold at once (max_running_kv_bytes)
    # Adapters (adapters.mlx_lm.lora): the base model's bank, shared by the views of its adapters; a view's
    # index in it (0: the base model), its base model's name and its adapter's files digest.
    bank: AdapterBank | None = None
    adapter: int = 0
    parent: str | None = None
    adapter_digest: str = ""

    @property
    def base_name(self) -> str:
        """The base model's name: an adapter's requests share its batch, KV budget and prefill rate."""
        return self.parent or self.spec.name

    def rows(self, adapters: Sequence[int]) -> AbstractContextManager[None]:
        """Build the forward passes inside it with row ``i`` on adapter ``adapters[i]`` (0: the base model)."""
        return self.bank.selected(adapters) if self.bank is not None else nullcontext()

    def make_cache(self) -> list[Any]:
        return make_prompt_cache(self.model, max_kv_size=self.spec.max_kv_size)

    @cached_property
    def batchable(self) -> bool:
        """Whether every layer's cache is plain KV (the batch's slots hold nothing else)."""
        return all(type(c) is KVCache for c in self.make_cache())

    def forward(self, tokens: list[int], cache: list[Any], quantize: bool = True) -> mx.array:
        """One pass over ``tokens`` into ``cache``; the last position's logits. ``quantize``: the spec's KV
        quantisation applies (a prefix-cache build keeps full precision and quantises at the end)."""
        with self.rows([self.adapter]):
            logits = self.model(mx.array(tokens)[None], cache=cache)[0, -1, :]
        spec = self.spec
        if quantize:
            maybe_quantize_kv_cache(cache, spec.quantized_kv_start, spec.kv_group_size, spec.kv_bits)
        return logits


class ModelNotFound(ValueError):
    """A model name that is neither a preset, a registry model, a GGUF file, a directory nor a usable id."""


# A configured source that cannot give a model (missing, not a model, an unusable GGUF file): the operator's to
# fix, not a bug, so the engine reports it in one line, without a traceback.
SOURCE_ERRORS: tuple[type[Exception], ...] = (ModelNotFound, GGUFError)


def _resolve(spec: ModelSpec) -> str:
    models_dir = Path(spec.models_dir) if spec.models_dir else default_models_dir()
    if spec.source in PRESETS:
        return str(build_model(spec.source, spec.seed, models_dir))
    if spec.source in REGISTRY_MODELS:
        return str(build_registry_model(spec.source, models_dir))
    local = Path(spec.source).expanduser()
    if spec.source.lower().endswith(".gguf"):
        return str(build_from_gguf(local, models_dir))
    looks_like_path = spec.source.startswith(("/", ".", "~")) or local.exists() or spec.source.count("/") > 1
    if looks_like_path and not local.is_dir():
        raise ModelNotFound(f"No model directory at {local}")
    if local.is_dir():
        if not (local / "config.json").is_file():  # mlx-lm reads it first; say so rather than its FileNotFoundError
            raise ModelNotFound(f"{local} is not a model directory: it has no config.json")
        return str(local)
    # A Hugging Face id: resolved to its snapshot directory here (mlx-lm's own download, with its file
    # patterns), so that the model's fingerprint covers the snapshot's files: a stored prefix cache is
    # never used on weights that changed under the same id.
    try:
        return str(snapshot_download(spec.source))
    except Exception as exc:  # offline, unknown repo, gated ...: say which, not a repo-id validation error
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if "/" not in spec.source:  # a mistyped preset more likely than an id without an owner
            names = ", ".join([*PRESETS, *REGISTRY_MODELS])
            raise ModelNotFound(
                f"'{spec.source}' is not a preset ({names}), a local directory, or a Hugging Face id whose "
                f"snapshot is cached or fetchable: {why}"
            ) from exc
        raise ModelNotFound(
            f"'{spec.source}' is not a local directory, and its Hugging Face snapshot is neither cached nor "
            f"fetchable: {why}"
        ) from exc


# On CUDA a quantised model is dequantised to bfloat16 only when that copy takes at most this share of the
# device's memory (an 8B model: 16 GB of a 141 GB H200).
DEQUANTISE_MEMORY_SHARE = 0.5


def _decode_step_ms(model: Any, batch: int, steps: int = 4) -> float:
    """One batched decode step of ``model`` on a fresh cache (after two warm-up steps), in ms."""
    cache = make_prompt_cache(model)
    x = mx.zeros((batch, 1), dtype=mx.int32)
    for _ in range(2):
        mx.eval(model(x, cache=cache))
    start = time.perf_counter()
    for _ in range(steps):
        mx.eval(model(x, cache=cache))
    return (time.perf_counter() - start) / steps * 1000


def _choose_weights(model: Any, on_cpu: bool, batch: int) -> tuple[Any, str]:
    """Put quantised weights in the form this backend runs fastest; the model, and which form and why.

    Linux CPU: float32 (MKL does the matmuls; mlx's quantised CPU kernels decoded SmolLM2-135M at 7.6
    tok/s against 21.6 in float32 on our 2-core build machine). CUDA: mlx 0.32.4's quantised matmul is
    fine for one sequence but collapses in a batch (an 8B model on an H200: 207 ms a step at batch 64
    against 12.8 in bf16), so when a bfloat16 copy fits a share of the device's memory both forms are
    timed on a batched decode step at start-up and the faster one is kept. Metal: kept quantised
    (Apple's kernels are fast).
    """
    quantized = any(isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules())
    if on_cpu:
        if quantized:
            dequantize_model(model)
        model.set_dtype(mx.float32)
        return model, (
            "float32, dequantised at load: on a CPU, mlx's quantised kernels are about 3x slower than float32 with MKL"
            if quantized
            else "float32: bfloat16/float16 matmul has no BLAS path on mlx's CPU backend"
        )
    if not quantized:
        return model, "as the checkpoint stores it"
    if mx.metal.is_available():
        return model, "quantised, as the checkpoint stores it (Metal's quantised kernels are fast)"
    params = sum(v.size for _, v in tree_flatten(model.parameters()) if isinstance(v, mx.array))
    bf16_bytes = 2 * params  # an upper bound: packed weights count their uint32 words, not their values
    info = mx.device_info()
    memory = int(info.get("memory_size") or info.get("total_memory") or 0)  # Metal's key, CUDA's key
    if memory and bf16_bytes > DEQUANTISE_MEMORY_SHARE * memory:
        return model, (
            f"quantised: a bfloat16 copy (~{bf16_bytes / 1e9:.0f} GB) would exceed "
            f"{DEQUANTISE_MEMORY_SHARE:.0%} of the device's {memory / 1e9:.0f} GB"
        )
    quantised_ms = _decode_step_ms(model, batch)
    candidate = dequantize_model(copy.deepcopy(model))
    candidate.set_dtype(mx.bfloat16)
    mx.eval(candidate.parameters())
    bf16_ms = _decode_step_ms(candidate, batch)
    timing = f"a batch-{batch} decode step took {quantised_ms:.1f} ms quantised, {bf16_ms:.1f} ms in bfloat16"
    if bf16_ms < quantised_ms:
        return candidate, f"bfloat16, dequantised at load: {timing}"
    return model, f"quantised: {timing}"


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load ``spec`` on the calling (engine) thread, all stages at once (see :func:`load_steps`)."""
    steps = load_steps(spec)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


# Weights are evaluated in groups of about this many bytes, each one stage of loading: the engine serves the
# models that are ready between two groups.
WEIGHT_GROUP_BYTES = 512 * 1024**2


def load_steps(spec: ModelSpec) -> Generator[str, None, LoadedModel]:
    """Load ``spec`` on the calling (engine) thread, one stage per ``next()``; each stage yields what it
    is about to do and the generator returns the loaded model. On CPU, floating weights become float32
    (bfloat16/float16 matmul has no BLAS path on mlx's CPU backend: about 4 GFLOP/s against ~180).

    The engine advances one stage between two turns of serving, so a model that is ready serves while the
    next one loads: the longest wait is one stage (fetching or converting a model, one group of weights,
    the weight-format timing on CUDA).
    """
    start = time.perf_counter()
    yield f"resolving {spec.source}"
    path = _resolve(spec)
    yield f"reading the model at {path}"
    model, wrapper, config = load(  # type: ignore[misc]
        path,
        tokenizer_config={"trust_remote_code": spec.trust_remote_code},
        return_config=True,
        lazy=True,
    )
    on_cpu = mx.default_device() == mx.cpu
    weights = ""
    if on_cpu:  # the conversion stays lazy: each group below computes its float32 weights once
        model, weights = _choose_weights(model, on_cpu, spec.max_running)
    arrays: list[mx.array] = [v for _, v in tree_flatten(model.parameters()) if isinstance(v, mx.array)]
    groups = _weight_groups(arrays)
    total = sum(a.nbytes for a in arrays)
    done = 0
    for group in groups:
        yield f"weights {done / total:.0%} ({done / 1e9:.2f} of {total / 1e9:.2f} GB)" if total else "weights"
        mx.eval(group)
        done += sum(a.nbytes for a in group)
    if not on_cpu:
        yield "choosing the weight format"
        model, weights = _choose_weights(model, on_cpu, spec.max_running)
    if spec.prefill_step_size is None:
        spec = dataclasses.replace(spec, prefill_step_size=512 if on_cpu else 2048)
    arrays = [v for _, v in tree_flatten(model.parameters()) if isinstance(v, mx.array)]
    dtype = str(arrays[0].dtype).replace("mlx.core.", "") if arrays else "unknown"
    mx.eval(model.parameters())
    yield "reading the tokenizer"
    vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 0)
    hf_vocab = len(wrapper)  # the wrapper's len() is its Hugging Face tokenizer's
    vocab = vocab or hf_vocab
    ctx = spec.context_length or int(
        config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings") or 4096
    )
    tokenizer = MlxTokenizer(wrapper, min(vocab, hf_vocab), path=path, trust_remote_code=spec.trust_remote_code)
    if hf_vocab < vocab:
        # Padded vocabularies (Llama-3 shapes with a smaller tokenizer, Qwen...): ids past the tokenizer
        # can never be decoded, so the logits stop there. Sampling then needs no per-sequence mask.
        model = _SampleableLogits(model, hf_vocab)
        vocab = hf_vocab
    local = Path(path)
    created = int(local.stat().st_mtime) if local.exists() else int(time.time())
    logger.info(
        "loaded model %s from %s in %.2fs (dtype %s, context %d, device %s); weights: %s",
        spec.name,
        path,
        time.perf_counter() - start,
        dtype,
        ctx,
        mx.default_device(),
        weights,
    )
    hf = hf_tokenizer(wrapper)
    vocab_digest = hashlib.sha256(msgspec.json.encode(sorted(hf.get_vocab().items())))
    template = getattr(hf, "chat_template", None) or ""
    args = getattr(model, "args", None)
    heads = getattr(args, "num_attention_heads", 0) or 0
    head_dim = getattr(args, "head_dim", None) or (getattr(args, "hidden_size", 0) // heads if heads else 0)
    per_token = kv_bytes_per_token(model)
    loaded = LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        path=local,
        context_length=ctx,
        vocab_size=vocab,
        dtype=dtype,
        created=created,
        fingerprint=model_fingerprint(local, dtype),
        tokenizer_fingerprint=vocab_digest.hexdigest(),
        chat_template_fingerprint=hashlib.sha256(str(template).encode()).hexdigest(),
        head_dim=int(head_dim),
        weights=weights,
        kv_bytes_per_token=per_token,
        kv_budget=spec.max_running_kv_bytes or default_kv_budget(),
        bank=AdapterBank(model),
    )
    _ = loaded.batchable  # made here, on the engine thread: it builds a cache (MLX work)
    return loaded


# The share of mlx's memory limit (about the device's memory; on a CPU, the host's) that running sequences'
# KV may take by default: the weights, prefill activations and resident prefix caches need the rest.
KV_BUDGET_SHARE = 0.5


def default_kv_budget() -> int:
    """The default ``max_running_kv_bytes``: :data:`KV_BUDGET_SHARE` of what mlx may allocate here."""
    return int(KV_BUDGET_SHARE * mx.get_memory_limit())


def kv_bytes_per_token(model: Any) -> int:
    """Bytes one position of one sequence takes in every layer's cache, measured on a one-token pass (any
    architecture, any KV dtype); 0 where the caches are not plain KV."""
    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    total = 0
    for c in cache:
        keys, values = getattr(c, "keys", None), getattr(c, "values", None)
        if not isinstance(keys, mx.array) or not isinstance(values, mx.array):
            return 0
        total += keys[..., :1, :].nbytes + values[..., :1, :].nbytes
    return total


def _weight_groups(arrays: list[mx.array]) -> list[list[mx.array]]:
    """``arrays`` in order, cut into groups of about :data:`WEIGHT_GROUP_BYTES`."""
    groups: list[list[mx.array]] = [[]]
    size = 0
    for array in arrays:
        if groups[-1] and size + array.nbytes > WEIGHT_GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(array)
        size += array.nbytes
    return groups if groups[0] else []


class _SampleableLogits:
    """The model with its logits cut to the ids the tokenizer can decode; everything else delegates."""

    def __init__(self, model: Any, n: int) -> None:
        self.wrapped = model  # the mlx-lm model (adapters wrap its layers: adapters.mlx_lm.lora)
        self._n = n

    def __call__(self, inputs: mx.array, cache: Any = None, **kwargs: Any) -> mx.array:
        return self.wrapped(inputs, cache=cache, **kwargs)[..., : self._n]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def model_fingerprint(path: Path, dtype: str) -> str:
    """A cheap but telling digest of a model: its config and tokenizer files in full, and for each
    weight file its size plus its first and last MiB (the safetensors header names every tensor)."""
    digest = hashlib.sha256(dtype.encode())
    if not path.is_dir():
        return digest.hexdigest()
    for file in sorted(path.iterdir()):
        if file.suffix == ".json" or file.name.startswith("tokenizer"):
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
        elif file.suffix == ".safetensors":
            size = file.stat().st_size
            with file.open("rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(0, size - (1 << 20)))
                tail = fh.read(1 << 20)
            digest.update(f"{file.name}:{size}".encode() + head + tail)
    return digest.hexdigest()
