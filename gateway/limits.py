"""Every size a request may choose, and the server's limit on it, in one place.

A request either fits these or is a 400 that names the field and the limit (issue 19: no request can stall
the server). The schemas (``gateway.schemas``) state the limits a field has on its own, so that decoding
refuses them and the OpenAPI document shows them; planning (``gateway.planning``) checks the ones that need
the model (its context, its vocabulary) or the whole request, with the helpers here.

Where OpenAI documents a limit we follow it, unless we accept more (``stop``: OpenAI takes 4).
Not here: the body's size (``Config.max_body_bytes``, a 413) and its JSON nesting (msgspec's decoder stops
near Python's recursion limit, about a thousand levels; ``gateway.body`` answers that with a 400).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin

from gateway.errors import ContextLengthExceeded, InvalidRequest

__all__ = [
    "MAX_CHARS_PER_TOKEN",
    "MAX_COMPLETION_LOGPROBS",
    "MAX_LOGIT_BIAS",
    "MAX_MESSAGES",
    "MAX_N",
    "MAX_SCHEMA_CHARS",
    "MAX_SCHEMA_DEPTH",
    "MAX_SCHEMA_PROPERTIES",
    "MAX_STOP",
    "MAX_STOP_CHARS",
    "MAX_TOOLS",
    "MAX_TOP_LOGPROBS",
    "SEED_MAX",
    "SEED_MIN",
    "SchemaSize",
    "check_prompt_chars",
    "check_schema",
    "engine_seed",
    "schema_size",
]

# Choices a request makes: `n` (OpenAI's limit), and for /v1/completions prompts x n, so that a batch of
# prompts cannot put more sequences in the engine than one request with the largest `n`.
MAX_N = 128
# OpenAI takes 4 stop sequences; we take more. Each is matched against the text as it grows, held back while
# the text could still become it: the work per token grows with their number and length.
MAX_STOP = 16
MAX_STOP_CHARS = 1024
# OpenAI's limits.
MAX_LOGIT_BIAS = 300
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_TOOLS = 128
# OpenAI's seed is an int64; mlx's keys take 0..2**64-1 (which clients sent before this limit): both are taken.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Messages of one conversation: far more than a context holds (each message takes a few tokens of any
# chat template), and few enough that the template renders them in well under a second.
MAX_MESSAGES = 10_000
# JSON schemas (`response_format`, each tool's `parameters`) are compiled into a grammar by llguidance.
# Its JSON parser stops at 128 levels and its own wrapper takes a few: 124 is the deepest schema it
# compiles (measured). Its compiler also recurses through every `$ref` it follows, on the thread's stack: a
# chain of about 900 references crashed the whole process (an 8 MiB stack), so the depth here follows them.
MAX_SCHEMA_DEPTH = 124
# OpenAI's limit for structured outputs. Compile time grows faster than the count: 5,000 optional
# properties of one object took about 2 s, 10,000 about 8 s (a loaded 2-core machine).
MAX_SCHEMA_PROPERTIES = 5000
# Bounds our walk of a schema (0.5 s for 1.5 MB) and the text handed to the grammar engine, which refuses
# larger grammars itself ("schema too large").
MAX_SCHEMA_CHARS = 1_000_000
# A prompt longer than this many characters per token of the context is refused before it is tokenised
# (the tiny model's tokenizer took a minute for 16 MiB, the default body limit, on a loaded 2-core machine).
# Real text averages 3 to 5 characters a token; only long runs of one character make long tokens (a run of
# 'x' is 16 a token for the tiny model's). A prompt that would fit is refused only past 32 a token on average.
MAX_CHARS_PER_TOKEN = 32


def engine_seed(seed: int) -> int:
    """A ``seed`` (SEED_MIN..SEED_MAX) as the engine's unsigned 64-bit key: the same seed gives the same key,
    and a negative seed the key of its two's complement (-1 that of 2**64 - 1)."""
    return seed % 2**64


def check_prompt_chars(text: str, context_length: int, param: str) -> None:
    """Refuse, without tokenising it, a prompt text too long to fit the context even at
    ``MAX_CHARS_PER_TOKEN`` characters a token (a ``context_length_exceeded`` 400 naming ``param``)."""
    most = context_length * MAX_CHARS_PER_TOKEN
    if len(text) > most:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens. However, your prompt is "
            f"{len(text)} characters long, more than {context_length} tokens can hold (at most "
            f"{MAX_CHARS_PER_TOKEN} characters a token, {most} in all). Please reduce the prompt.",
            param=param,
        )


@dataclass(frozen=True)
class SchemaSize:
    """How large a JSON schema is for the grammar engine: its depth (each object and array a level, each
    ``$ref`` followed to its target) and its object properties."""

    depth: int
    properties: int


class _TooDeep(Exception):
    pass


# A base for resolving `$id` and `$ref` (any absolute URI would do; none is ever fetched).
_BASE = "urn:mlx-gateway:schema"


def _children(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        yield from node.values()
    elif isinstance(node, list):
        yield from node


def _join(base: str, ref: str) -> str:
    # urljoin ignores a base whose scheme it does not know ('urn:'); a fragment alone always stays in the base.
    if ref.startswith("#"):
        return base.partition("#")[0] + ref
    return urljoin(base, ref) if "://" in base else ref


class _Schema:
    """One schema's resources and anchors, as llguidance's resolver finds them, and its size.

    Nothing is skipped as "data" (``enum``, ``const``, ``default``, a property named ``$ref``): a ``$ref``
    anywhere is followed and an ``$id`` anywhere is a resource, so the depth found is never less than the
    grammar engine's.
    """

    def __init__(self, root: Any, limit: int) -> None:
        self.limit = limit
        self.properties = 0
        self.resources: dict[str, list[Any]] = {}
        self.anchors: dict[tuple[str, str], list[Any]] = {}
        self.refs: dict[int, list[str]] = {}  # a node's $ref, resolved against its base
        self._index(root)

    def _index(self, root: Any) -> None:
        """One pass without recursion: the JSON depth (refused past the limit), properties, $id and anchors."""
        self.resources.setdefault(_BASE, []).append(root)
        stack: list[tuple[Any, str, int]] = [(root, _BASE, 1)]
        while stack:
            node, base, level = stack.pop()
            if level > self.limit:
                raise _TooDeep
            if isinstance(node, dict):
                ident = node.get("$id")
                if isinstance(ident, str):
                    uri, _, fragment = _join(base, ident).partition("#")
                    base = uri or base
                    self.resources.setdefault(base, []).append(node)
                    if fragment:  # draft 6/7: "$id": "#name" is an anchor
                        self.anchors.setdefault((base, fragment), []).append(node)
                anchor = node.get("$anchor")
                if isinstance(anchor, str):
                    self.anchors.setdefault((base, anchor), []).append(node)
                ref = node.get("$ref")
                if isinstance(ref, str):
                    self.refs[id(node)] = [_join(base, ref)]
                props = node.get("properties")
                if isinstance(props, dict):
                    self.properties += len(props)
            for child in _children(node):
                if isinstance(child, dict | list):
                    stack.append((child, base, level + 1))

    def _targets(self, ref: str) -> list[Any]:
        uri, _, fragment = ref.partition("#")
        fragment = unquote(fragment)
        roots = self.resources.get(uri, [])
        if not fragment:
            return roots
        if not fragment.startswith("/"):
            return self.anchors.get((uri, fragment), [])
        found = []
        for root in roots:
            node: Any = root
            for token in fragment[1:].split("/"):
                token = token.replace("~1", "/").replace("~0", "~")
                if isinstance(node, dict) and token in node:
                    node = node[token]
                elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                    node = node[int(token)]
                else:
                    break
            else:
                found.append(node)
        return found

    def depth(self, root: Any) -> int:
        """The deepest path from ``root``, following ``$ref`` (a cycle ends a path where it closes)."""
        done: dict[int, int] = {}
        on_path: set[int] = set()

        def visit(node: Any, level: int) -> int:
            if not isinstance(node, dict | list):
                return 0
            if level > self.limit:
                raise _TooDeep
            key = id(node)
            if key in done:
                if level + done[key] - 1 > self.limit:
                    raise _TooDeep
                return done[key]
            if key in on_path:
                return 0
            on_path.add(key)
            deepest = max((visit(child, level + 1) for child in _children(node)), default=0)
            for ref in self.refs.get(key, ()):
                for target in self._targets(ref):
                    deepest = max(deepest, visit(target, level + 1))
            on_path.discard(key)
            done[key] = deepest + 1
            return deepest + 1

        return visit(root, 1)


def schema_size(schema: Any, limit: int = MAX_SCHEMA_DEPTH) -> SchemaSize:
    """A JSON schema's depth and object properties; the depth is ``limit + 1`` once past ``limit`` (the walk
    stops there, so a schema of any depth or any chain of references costs at most ``limit`` levels)."""
    try:
        measured = _Schema(schema, limit)
    except _TooDeep:
        return SchemaSize(limit + 1, 0)
    try:
        depth = measured.depth(schema)
    except _TooDeep:
        depth = limit + 1
    return SchemaSize(depth, measured.properties)


def _too_deep(param: str) -> InvalidRequest:
    return InvalidRequest(
        f"'{param}' nests more than {MAX_SCHEMA_DEPTH} levels deep (each object and array is a level, and each "
        f"$ref continues at its target); at most {MAX_SCHEMA_DEPTH} are supported",
        param=param,
    )


def check_schema(schema: Any, param: str) -> tuple[str, SchemaSize]:
    """Refuse a JSON schema the grammar engine could not compile in bounded time and stack (a 400 naming
    ``param`` and the limit); the JSON text (keys sorted) and size of one that fits."""
    try:
        text = json.dumps(schema, sort_keys=True)
    except RecursionError:  # deeper than Python's own limit: far past ours
        raise _too_deep(param) from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidRequest(
            f"'{param}' is {len(text)} characters of JSON; at most {MAX_SCHEMA_CHARS} are supported", param=param
        )
    size = schema_size(schema)
    if size.depth > MAX_SCHEMA_DEPTH:
        raise _too_deep(param)
    if size.properties > MAX_SCHEMA_PROPERTIES:
        raise InvalidRequest(
            f"'{param}' has {size.properties} object properties; at most {MAX_SCHEMA_PROPERTIES} are supported",
            param=param,
        )
    return text, size
