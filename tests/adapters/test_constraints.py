"""Grammar-constrained decoding on the real tiny model (random weights): outputs parse and validate."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from adapters.base import OutputConstraint  # noqa: E402
from adapters.grammar import InvalidConstraint  # noqa: E402
from adapters.mlx_lm.constraints import MaskingGrammarCompiler  # noqa: E402
from adapters.mlx_lm.models import LoadedModel, ModelSpec, load_model  # noqa: E402
from tests.closers import closing_bias_ids  # noqa: E402

FLAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "active", "score"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "status": {"enum": ["pending", "shipped"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["status", "items"],
    "additionalProperties": False,
}
BOUNDS = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "minLength": 3, "maxLength": 6},
        "count": {"type": "integer", "minimum": 1, "maximum": 100},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["code", "count", "ratio"],
    "additionalProperties": False,
}
SCHEMAS = {"json_object": {"type": "object"}, "flat": FLAT, "nested": NESTED, "bounds": BOUNDS}
TOOL_ARGS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOL_CALL = {
    "type": "object",
    "properties": {"name": {"const": "get_weather"}, "arguments": TOOL_ARGS},
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
TOOL_GRAMMAR = f'start: "<tool_call>" call "</tool_call>"\ncall: %json{json.dumps(TOOL_CALL)}\n'


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> LoadedModel:
    return load_model(ModelSpec("tiny", "tiny", models_dir=str(models_dir)))


@pytest.fixture(scope="module")
def compiler(loaded: LoadedModel) -> MaskingGrammarCompiler:
    tokenizer = loaded.tokenizer
    return MaskingGrammarCompiler(tokenizer.text.hf, loaded.vocab_size, tokenizer.eos_token_ids)


@pytest.fixture(scope="module")
def closing_bias(loaded: LoadedModel) -> mx.array:
    """Random weights never end a string or a number (tests/closers.py); the grammar still decides."""
    bias = np.zeros(loaded.vocab_size, dtype=np.float32)
    for i, b in closing_bias_ids(loaded.tokenizer.decode, loaded.vocab_size).items():
        bias[i] = b
    return mx.array(bias)


def generate(
    loaded: LoadedModel, processors: list[Any], temperature: float, seed: int, max_tokens: int = 160
) -> tuple[str, bool]:
    """The text up to EOS, and whether EOS ended it."""
    mx.random.seed(seed)
    prompt = mx.array(loaded.tokenizer.encode("<|im_start|>user\nJSON please<|im_end|>\n<|im_start|>assistant\n"))
    out: list[int] = []
    eos = loaded.tokenizer.eos_token_ids
    sampler = make_sampler(temperature)
    for token, _ in generate_step(
        prompt, loaded.model, max_tokens=max_tokens, sampler=sampler, logits_processors=processors
    ):
        if token in eos:
            return loaded.tokenizer.decode(out), True
        out.append(int(token))
    return loaded.tokenizer.decode(out), False


def check_schema(value: Any, schema: dict[str, Any]) -> None:
    """The subset of JSON Schema these tests use (jsonschema is not a dependency)."""
    if "const" in schema:
        assert value == schema["const"]
    if "enum" in schema:
        assert value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict)
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= value.keys()
        if schema.get("additionalProperties") is False:
            assert value.keys() <= props.keys()
        for key, sub in props.items():
            if key in value:
                check_schema(value[key], sub)
    elif kind == "array":
        assert isinstance(value, list)
        for item in value:
            check_schema(item, schema.get("items", {}))
    elif kind == "string":
        assert isinstance(value, str)
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10**9)
    elif kind in ("integer", "number"):
        assert isinstance(value, int if kind == "integer" else int | float) and not isinstance(value, bool)
        assert "minimum" not in schema or value >= schema["minimum"]
        assert "maximum" not in schema or value <= schema["maximum"]
    elif kind == "boolean":
        assert isinstance(value, bool)


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize(("temperature", "seed"), [(0.0, 0), (1.0, 1), (1.0, 2)])
def test_json_schema_outputs_validate(
    loaded: LoadedModel,
    compiler: MaskingGrammarCompiler,
    closing_bias: mx.array,
    name: str,
    temperature: float,
    seed: int,
) -> None:
    schema = SCHEMAS[name]
    matcher = compiler.matcher(OutputConstraint("json_schema", json.dumps(schema)))
    text, ended = generate(loaded, [lambda _, x: x + closing_bias, matcher.processor()], temperature, seed)
    assert ended, f"no EOS: {text!r}"
    check_schema(json.loads(text), schema)
    assert matcher.done and matcher.error is None


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, 0), (1.0, 1), (1.0, 2)])
def test_tool_call_grammar(
    loaded: LoadedModel, compiler: MaskingGrammarCompiler, closing_bias: mx.array, temperature: float, seed: int
) -> None:
    matcher = compiler.matcher(OutputConstraint("lark", TOOL_GRAMMAR))
    text, ended = generate(loaded, [lambda _, x: x + closing_bias, matcher.processor()], temperature, seed)
    assert ended, f"no EOS: {text!r}"
    assert text.startswith("<tool_call>") and text.endswith("</tool_call>")
    check_schema(json.loads(text.removeprefix("<tool_call>").removesuffix("</tool_call>")), TOOL_CALL)


def test_greedy_without_help_stays_inside_the_grammar(loaded: LoadedModel, compiler: MaskingGrammarCompiler) -> None:
    """No bias: the random model need not finish, but every token it wrote was allowed."""
    matcher = compiler.matcher(OutputConstraint("json_schema", json.dumps(FLAT)))
    text, _ = generate(loaded, [matcher.processor()], 0.0, 0, max_tokens=24)
    assert text.startswith('{"name":') or text.lstrip().startswith("{")
    assert matcher.error is None


def test_sequential_apply_advance_and_only_eos_when_complete(
    loaded: LoadedModel, compiler: MaskingGrammarCompiler
) -> None:
    matcher = compiler.matcher(OutputConstraint("json_schema", '{"type": "object"}'))
    vocab = loaded.vocab_size
    for token in loaded.tokenizer.encode('{"a": 1}'):
        logits = matcher.apply(mx.zeros((vocab,)))
        assert logits[token].item() == 0.0
        matcher.advance(token)
    assert matcher.done
    allowed = np.nonzero(np.isfinite(np.array(matcher.apply(mx.zeros((1, vocab))))))[1]
    assert set(allowed.tolist()) == loaded.tokenizer.eos_token_ids


def test_mask_covers_padded_logits(loaded: LoadedModel, compiler: MaskingGrammarCompiler) -> None:
    """Logits wider than the tokenizer (a padded vocabulary): the extra ids are never allowed."""
    matcher = compiler.matcher(OutputConstraint("json_schema", '{"type": "object"}'))
    width = loaded.vocab_size + 100
    masked = np.array(matcher.apply(mx.zeros((1, width))))
    assert masked.shape == (1, width)
    assert np.all(np.isneginf(masked[0, loaded.vocab_size :]))
    assert np.isfinite(masked[0, loaded.tokenizer.encode("{")[0]])


@pytest.mark.parametrize(
    ("kind", "source", "words"),
    [
        ("json_schema", '{"type": "nope"}', "Invalid type: nope"),
        ("json_schema", '{"$ref": "#/$defs/missing"}', "does not exist"),
        ("json_schema", '{"type": "object",', "not valid JSON"),
        ("json_schema", "[1, 2]", "must be a JSON object"),
        ("lark", 'start: "a" (', "Invalid grammar"),
        ("lark", "start: %json{ nope }", "Invalid grammar"),
        ("lark", "start: undefined_rule", "Invalid grammar"),
    ],
)
def test_invalid_constraints_raise(compiler: MaskingGrammarCompiler, kind: Any, source: str, words: str) -> None:
    for _ in range(2):  # the failure is cached too, and still raised
        with pytest.raises(InvalidConstraint, match=words):
            compiler.check(OutputConstraint(kind, source))


def test_compile_cache_returns_the_cached_grammar(compiler: MaskingGrammarCompiler, loaded: LoadedModel) -> None:
    constraint = OutputConstraint("json_schema", json.dumps(NESTED))
    first = compiler.compile(constraint)
    assert compiler.compile(OutputConstraint("json_schema", json.dumps(NESTED))) is first
    a, b = compiler.matcher(constraint), compiler.matcher(constraint)
    a.advance(loaded.tokenizer.encode("{")[0])
    assert a._matcher is not b._matcher and not b.done  # one state per sequence


def test_check_from_many_threads(compiler: MaskingGrammarCompiler) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            compiler.check(OutputConstraint("json_schema", json.dumps({**FLAT, "title": f"T{i % 4}"})))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
