"""Grammar libraries for ``response_format``: llguidance against outlines-core, then the cost of the
gateway's own constraints module in a decode loop.

    python -m bench.grammar_libs --device cpu      # small
    python -m bench.grammar_libs --device gpu      # llama-8b

1. Compile time of four schemas, cold (from the schema text) and cached (what a repeated schema costs:
   a copy of the compiled grammar plus its first mask). One-off tokenizer set-up is reported apart.
2. Per-token mask cost inside mlx-lm's ``generate_step``: the library's fill of a preallocated bitmask,
   timed on its own, and the whole step.
3. Every output (greedy, and sampled with two seeds, per schema and library) must parse and validate
   (``jsonschema`` when installed, else parse + required keys).
4. Decode tokens/s of ``adapters.mlx_lm.constraints`` against no constraint and against a processor that
   only reads the last token (the device sync that any per-token grammar needs).

xgrammar is not measured: it requires torch (and triton on Linux x86-64), a multi-gigabyte install.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from adapters.mlx_lm.blas import load_optimised_blas

load_optimised_blas()  # before mlx is imported below

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from adapters.base import OutputConstraint  # noqa: E402
from adapters.grammar import JSON_OPTIONS  # noqa: E402
from adapters.mlx_lm.constraints import MaskingGrammarCompiler  # noqa: E402
from adapters.mlx_lm.detokenizer import byte_decoder  # noqa: E402
from adapters.mlx_lm.models import ModelSpec, load_model  # noqa: E402
from bench.harness import DEFAULT_MODEL, RESULTS, bench_parser, summary, write_result  # noqa: E402

SCHEMAS: dict[str, dict[str, Any]] = {
    # What the openai SDK's parse(response_format=Model) and LangChain send: all required, no extras.
    "flat": {
        "title": "Person",
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "email": {"type": "string"},
            "active": {"type": "boolean"},
            "score": {"type": "number"},
        },
        "required": ["name", "age", "email", "active", "score"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "customer": {"type": "string"},
            "status": {"enum": ["pending", "shipped", "delivered"]},
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
        "required": ["customer", "status", "items"],
        "additionalProperties": False,
    },
    "bounds": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "minLength": 3, "maxLength": 8},
            "count": {"type": "integer", "minimum": 1, "maximum": 100},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
        },
        "required": ["code", "count", "ratio", "tags"],
        "additionalProperties": False,
    },
    "any_object": {"type": "object"},
}
# For tokens/s: a schema whose output is long enough to measure (a random-weight model ends '{}' at once).
THROUGHPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 12,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "maxLength": 6}, "qty": {"type": "integer"}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}

_SHIFTS = mx.arange(32, dtype=mx.uint32)


def closing_bias(tokenizer: Any, vocab: int) -> mx.array:
    """Logit bonuses for tokens made only of JSON's closing punctuation, a malus for whitespace-only ones.

    A random-weight model never ends a string or a number on its own; with this added before the grammar's
    mask it closes whatever the grammar lets it close, so outputs end and can be validated. The grammar
    alone still decides which tokens are allowed.
    """
    bias = np.zeros(vocab, dtype=np.float32)
    for i in range(vocab):
        raw = tokenizer.decode([i])
        text = raw.strip()
        if text.startswith('"') and set(text) <= set('"}],'):  # closes a string before '}' inside one
            bias[i] = 12.0
        elif text and set(text) <= set("}]"):
            bias[i] = 10.0
        elif text == ",":
            bias[i] = 4.0
        elif raw and not text:
            bias[i] = -6.0
    return mx.array(bias)


def apply_bitmask(mask: np.ndarray, logits: mx.array) -> mx.array:
    words = mx.array(mask)
    allowed = ((words[:, None] >> _SHIFTS) & 1).reshape(-1)[: logits.shape[-1]].astype(mx.bool_)
    return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


class Lib:
    """One library behind the same four calls, so both run in the same loop."""

    name = ""

    def compile(self, schema: str) -> Any: ...
    def start(self, compiled: Any) -> Any: ...
    def fill(self, state: Any, mask: np.ndarray) -> None: ...
    def advance(self, state: Any, token: int) -> None: ...


class Llguidance(Lib):
    name = "llguidance"

    def __init__(self, hf: Any, eos: list[int]) -> None:
        import llguidance as llg

        self.llg = llg
        self.tok = llg.LLTokenizer(hf.backend_tokenizer.to_str(), eos_token=eos)
        self.bytes = 4 * ((self.tok.vocab_size + 31) // 32)

    def compile(self, schema: str) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def start(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, state: Any, mask: np.ndarray) -> None:
        state.unsafe_compute_mask_ptr(mask.ctypes.data, self.bytes)

    def advance(self, state: Any, token: int) -> None:
        assert state.consume_token(token), state.get_error()


class OutlinesCore(Lib):
    name = "outlines-core"

    def __init__(self, hf: Any, eos: list[int]) -> None:
        import outlines_core as oc

        self.oc = oc
        table = byte_decoder()
        special = set(hf.added_tokens_decoder)
        pieces: dict[bytes, list[int]] = {}
        for piece, i in hf.get_vocab().items():
            if i not in special:
                pieces.setdefault(bytes(table[ch] for ch in piece), []).append(i)
        self.vocab = oc.Vocabulary(eos[-1], pieces)  # one EOS only: the others stay masked

    def compile(self, schema: str) -> Any:
        return self.oc.Index(self.oc.json_schema.build_regex_from_schema(schema), self.vocab)

    def start(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, state: Any, mask: np.ndarray) -> None:
        state.write_mask_into(mask.ctypes.data, mask.size, 4)

    def advance(self, state: Any, token: int) -> None:
        if not state.is_finished():  # generate_step feeds the EOS back once more; outlines rejects it
            state.advance(token, return_tokens=False)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def compile_rows(lib: Lib, vocab: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    mask = np.zeros((vocab + 31) // 32, dtype=np.uint32)
    for name, schema in SCHEMAS.items():
        text = json.dumps(schema)
        cold, cached = [], []
        compiled = None
        for _ in range(repeats if lib.name == "llguidance" else 1):  # outlines' any_object takes seconds
            compiled, seconds = timed(lambda text=text: lib.compile(text))
            _, first = timed(lambda c=compiled: lib.fill(lib.start(c), mask))
            cold.append(seconds + first)
        for _ in range(repeats):
            _, seconds = timed(lambda c=compiled: lib.fill(lib.start(c), mask))
            cached.append(seconds)
        rows.append({"library": lib.name, "schema": name, "cold_s": summary(cold), "cached_s": summary(cached)})
        print(f"{lib.name} {name}: cold {min(cold) * 1e3:.2f} ms, cached {min(cached) * 1e3:.3f} ms", flush=True)
    return rows


def validate(text: str, schema: dict[str, Any]) -> str | None:
    """None when ``text`` parses and validates against ``schema``, else why not."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"does not parse: {exc}"
    try:
        import jsonschema
    except ImportError:
        missing = [k for k in schema.get("required", []) if k not in value]
        return f"missing {missing}" if missing or not isinstance(value, dict) else None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return exc.message
    return None


def decode(
    model: Any, prompt: mx.array, tokens: int, sampler: Any, processors: list[Any], eos: set[int]
) -> tuple[list[int], float, bool]:
    """Generated ids (up to EOS), decode tokens/s after the first token, and whether EOS ended it."""
    out: list[int] = []
    first = time.perf_counter()
    for token, _ in generate_step(prompt, model, max_tokens=tokens, sampler=sampler, logits_processors=processors):
        if not out:
            first = time.perf_counter()
        if token in eos:
            return out, _rate(out, first), True
        out.append(int(token))
    return out, _rate(out, first), False


def _rate(out: list[int], first: float) -> float:
    return (len(out) - 1) / (time.perf_counter() - first) if len(out) > 1 else 0.0


def library_decode_rows(lib: Lib, loaded: Any, prompt: mx.array, tokens: int) -> list[dict[str, Any]]:
    """Validity of every schema's output, and the per-token fill cost, with the library's raw matcher."""
    eos = loaded.tokenizer.eos_token_ids
    bias = closing_bias(loaded.tokenizer, loaded.vocab_size)
    rows = []
    for name, schema in SCHEMAS.items():
        compiled = lib.compile(json.dumps(schema))
        fills: list[float] = []
        results = []
        for label, temp, seed in (("greedy", 0.0, 0), ("sampled", 1.0, 1), ("sampled", 1.0, 2)):
            mx.random.seed(seed)
            state = lib.start(compiled)
            mask = np.zeros((loaded.vocab_size + 31) // 32, dtype=np.uint32)
            started = [False]

            def process(
                toks: mx.array, logits: mx.array, state: Any = state, mask: Any = mask, s: Any = started, f: Any = fills
            ) -> mx.array:
                logits = logits + bias
                if s[0]:
                    lib.advance(state, int(toks[-1].item()))
                s[0] = True
                t0 = time.perf_counter()
                lib.fill(state, mask)
                f.append(time.perf_counter() - t0)
                return apply_bitmask(mask, logits)

            out, _, ended = decode(loaded.model, prompt, tokens, make_sampler(temp), [process], eos)
            text = loaded.tokenizer.decode(out)
            problem = validate(text, schema) if ended else f"no EOS within {tokens} tokens"
            results.append({"mode": label, "seed": seed, "tokens": len(out), "valid": problem is None})
            if problem:
                print(f"  {lib.name} {name} {label}: INVALID ({problem}): {text[:120]!r}", flush=True)
        rows.append(
            {
                "library": lib.name,
                "schema": name,
                "outputs": results,
                "all_valid": all(r["valid"] for r in results),
                "fill_mask_s": summary(fills),
            }
        )
        print(f"{lib.name} {name}: valid {rows[-1]['all_valid']}, fill median {np.median(fills) * 1e6:.0f} us")
    return rows


def apply_cost(vocab: int, repeats: int = 200) -> dict[str, Any]:
    """MLX time to unpack a bitmask and mask one row of logits, against evaluating the logits alone."""
    mask = np.full((vocab + 31) // 32, 0x0F0F0F0F, dtype=np.uint32)
    logits = mx.random.normal((1, vocab))
    mx.eval(logits)
    plain, masked = [], []
    for _ in range(repeats):
        row = logits + 0
        _, s = timed(lambda row=row: mx.eval(row))
        plain.append(s)
        row = logits + 0
        _, s = timed(lambda row=row: mx.eval(apply_bitmask(mask, row)))
        masked.append(s)
    return {"eval_logits_s": summary(plain), "eval_masked_logits_s": summary(masked)}


def throughput_rows(loaded: Any, prompt: mx.array, tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Greedy decode tokens/s: no constraint, a sync-only processor, and the constraints module."""
    eos = loaded.tokenizer.eos_token_ids
    compiler = MaskingGrammarCompiler(loaded.tokenizer.text.hf, loaded.vocab_size, eos)
    constraint = OutputConstraint("json_schema", json.dumps(THROUGHPUT_SCHEMA))
    compiler.check(constraint)

    def sync_only(toks: mx.array, logits: mx.array) -> mx.array:
        int(toks[-1].item())
        return logits

    variants: dict[str, Callable[[], list[Any]]] = {
        "none": lambda: [],
        "sync only (reads the last token each step)": lambda: [sync_only],
        "constraints module (json_schema)": lambda: [compiler.matcher(constraint).processor()],
    }
    rows = []
    for name, processors in variants.items():
        rates, counts, valid, ended_runs = [], [], True, 0
        constrained = name.startswith("constraints")
        for i in range(repeats + 1):
            out, rate, ended = decode(
                loaded.model, prompt, tokens, make_sampler(0.0), processors(), eos if constrained else set()
            )
            if constrained and ended:  # outputs cut at --tokens cannot be validated
                ended_runs += 1
                valid = valid and validate(loaded.tokenizer.decode(out), THROUGHPUT_SCHEMA) is None
            if i:  # the first run warms up
                rates.append(rate)
                counts.append(len(out))
        rows.append({"variant": name, "decode_tokens_per_s": summary(rates), "tokens": summary(counts)})
        if name.startswith("constraints"):
            rows[-1]["ended_with_eos"] = ended_runs
            rows[-1]["ended_all_valid"] = valid
    base = rows[0]["decode_tokens_per_s"]["median"]
    for row in rows:
        row["ratio_to_none"] = row["decode_tokens_per_s"]["median"] / base
        print(f"{row['variant']}: {row['decode_tokens_per_s']['median']:.1f} tok/s ({row['ratio_to_none']:.3f}x)")
    return rows


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=96, help="max tokens per decode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-outlines", action="store_true")
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    if args.device == "cpu":
        mx.set_default_device(mx.cpu)
    loaded = load_model(ModelSpec(model, model))
    hf = loaded.tokenizer.text.hf
    eos = sorted(loaded.tokenizer.eos_token_ids)
    chat = [{"role": "user", "content": "Reply with a JSON object describing an order."}]
    prompt = mx.array(loaded.tokenizer.encode(loaded.tokenizer.render_chat(chat, add_generation_prompt=True)))

    libs: list[Lib] = []
    setup: dict[str, float] = {}
    lib, setup["llguidance"] = timed(lambda: Llguidance(hf, eos))
    libs.append(lib)
    if not args.skip_outlines:
        lib, setup["outlines-core"] = timed(lambda: OutlinesCore(hf, eos))
        libs.append(lib)
    rows: list[dict[str, Any]] = [{"section": "tokenizer_setup_s", **setup}]
    for lib in libs:
        rows += [{"section": "compile", **r} for r in compile_rows(lib, loaded.vocab_size, args.repeats)]
    for lib in libs:
        rows += [{"section": "decode", **r} for r in library_decode_rows(lib, loaded, prompt, args.tokens)]
    rows.append({"section": "apply_mask", **apply_cost(loaded.vocab_size)})
    rows += [{"section": "throughput", **r} for r in throughput_rows(loaded, prompt, args.tokens, args.repeats)]
    versions = {}
    for dist in ("llguidance", "outlines-core"):
        import importlib.metadata as md

        versions[dist] = md.version(dist) if dist != "outlines-core" or libs[1:] else "-"
    write_result(
        "grammar-libs",
        args.device,
        model,
        rows,
        out=args.out or RESULTS / f"grammar-libs-{args.device}.json",
        notes=(
            f"Library versions {versions}. Cold compile = schema text to a matcher plus its first mask; cached ="
            " a copy of the compiled grammar plus its first mask. Decode: up to "
            f"{args.tokens} tokens; validity by {'jsonschema' if _has_jsonschema() else 'parse + required keys'}."
            " Throughput: greedy, medians of the repeats after one warm-up; 'none' ignores EOS."
        ),
    )


def _has_jsonschema() -> bool:
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
