"""The OpenAPI document at ``/docs/openapi.json``: what every route takes and every response it can give.

Litestar lays out the paths and operations; the schemas of our Structs come from msgspec itself
(``msgspec.json.schema_components``), so the constraints that decode a request (``msgspec.Meta``: ranges,
patterns, lengths, ``forbid_unknown_fields``) are the ones the document states. Litestar's own rendering of
Structs drops some of them (a ``ge=0`` bound, lengths inside unions, ``additionalProperties: false``).
Every error response is documented with the one OpenAI error body, :class:`~gateway.errors.ErrorResponse`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request, Router, get
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.params import PathParameter

from gateway import __version__
from gateway.browsers import DOCS_ASSETS
from gateway.errors import ErrorResponse
from gateway.schemas import admin, openai, responses, seed

__all__ = ["GENERATE", "MANAGE", "READ", "CachePath", "errors", "openapi_config"]

_WHEN = {
    400: "Invalid request: malformed JSON, a field of the wrong type or out of range, or a rule the request breaks",
    401: "Missing or incorrect API key (only when API keys or an admin key are configured)",
    403: "A tenant's key names another tenant or reads every tenant's figures (`forbidden`), or a tenant's "
    "prefix-cache quota refuses a cache (type `insufficient_quota`, code `prefix_cache_count_quota`, "
    "`prefix_cache_disk_quota` or `prefix_cache_memory_quota`)",
    404: "Unknown model (`model_not_found`), prefix cache (`prefix_cache_not_found`) or route",
    409: "A prefix cache of that name exists (`prefix_cache_exists`; send `replace: true`), or a cache to warm is "
    "larger than the whole prefix-cache memory budget (`prefix_cache_over_memory_budget`)",
    413: "The request body is larger than the server's limit (`request_too_large`)",
    429: "Too many requests running or queued (`rate_limit_exceeded`), in the server or for the tenant (type "
    "`requests` or `tokens`: its concurrency, prompt tokens, requests or tokens per minute); `Retry-After` says "
    "when to retry",
    500: "The engine failed while serving the request",
    503: "The model is still loading (Retry-After), failed to load (x-should-retry: false, code model_unavailable), "
    "or the server is draining (Retry-After)",
    507: "The prefix-cache disk is full (`insufficient_storage`): nothing of the new version was kept, a replaced "
    "cache keeps its previous version",
}

# The errors each kind of route can answer with.
GENERATE = (400, 401, 404, 413, 429, 500, 503)
MANAGE = (400, 401, 403, 404, 409, 413, 500, 503, 507)
READ = (400, 401, 403, 404, 500)


# A prefix cache's name in a path: Litestar checks path parameters with its own Parameter, not msgspec.Meta.
CachePath = Annotated[str, PathParameter(pattern=openai.CACHE_NAME_PATTERN, description=openai.CACHE_NAME_RULE)]


def errors(statuses: Iterable[int]) -> dict[int, ResponseSpec]:
    """``responses=`` for a route: each status with the OpenAI error body."""
    return {
        status: ResponseSpec(data_container=ErrorResponse, description=_WHEN[status], generate_examples=False)
        for status in statuses
    }


_STRUCTS: dict[str, type[msgspec.Struct]] = {
    cls.__name__: cls
    for module in (openai, admin, seed, responses)
    for cls in vars(module).values()
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct) and cls.__module__ == module.__name__
} | {"ErrorResponse": ErrorResponse}

# Request bodies whose `model` must name a served model (any other is a 404).
_MODEL_FIELDS = (
    "ChatCompletionRequest",
    "CompletionRequest",
    "ResponsesRequest",
    "CreatePrefixCache",
    "SeedCreate",
    "SeedGenerate",
)


_REF = "#/components/schemas/{name}"


def _sse(*chunks: str) -> dict[str, Any]:
    """One server-sent event of a stream: a chunk, the error event of a failure after the first byte, or the
    closing ``[DONE]`` (an event stream's schema describes each event)."""
    payload = {"anyOf": [{"$ref": _REF.format(name=name)} for name in (*chunks, "ErrorResponse")]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
                ]
            }
        },
        "description": f"With `stream: true`: `data: <{' | '.join(chunks)}>` events, then `data: [DONE]`",
    }


def document(app: Litestar, models: Sequence[str]) -> dict[str, Any]:
    """The OpenAPI document of ``app``, its Struct schemas replaced by msgspec's."""
    doc = app.openapi_schema.to_schema()
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    types = [_STRUCTS[name] for name in schemas if name in _STRUCTS]
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    schemas.update(components)
    for path, chunk in (("/v1/chat/completions", "ChatCompletionChunk"), ("/v1/completions", "CompletionResponse")):
        if path in doc.get("paths", {}):
            content = doc["paths"][path]["post"]["responses"]["200"]["content"]
            content["text/event-stream"] = {"schema": _sse(chunk)}
            if "ChatCompletionChunk" not in schemas:
                schemas.update(msgspec.json.schema_components([openai.ChatCompletionChunk], ref_template=_REF)[1])
    if "/v1/responses" in doc.get("paths", {}):
        # Streamed: the Responses API's typed events (each names its `type`), then `data: [DONE]`.
        events = (
            responses.ResponseEvent,
            responses.ResponseItemEvent,
            responses.ResponseContentPartEvent,
            responses.ResponseTextDeltaEvent,
            responses.ResponseTextDoneEvent,
        )
        schemas.update(msgspec.json.schema_components(events, ref_template=_REF)[1])
        content = doc["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]
        content["text/event-stream"] = {"schema": _sse(*(cls.__name__ for cls in events))}
    build = doc.get("paths", {}).get("/admin/prefix-caches", {}).get("post")
    if build is not None:
        # A streamed build answers 200 with events only: progress, then the cache.
        build["responses"]["200"]["content"] = {
            "text/event-stream": {"schema": _sse("PrefixCacheProgress", "PrefixCacheOut")}
        }
    if "CompletionRequest" in schemas:
        schemas["CompletionRequest"]["properties"]["prompt"] = openai.PROMPT_SCHEMA
    for name in _MODEL_FIELDS:
        if name in schemas:
            field = schemas[name]["properties"]["model"]
            field["enum"] = list(models)
            field["description"] = "One of this server's models (`GET /v1/models`); any other is 404"
    return doc


class _SwaggerPage(SwaggerRenderPlugin):
    """Swagger UI from the package's own files, showing the document that ``/docs/openapi.json`` serves
    (Litestar's page would embed its own rendering of the schemas)."""

    def __init__(self, built: Callable[[Litestar], dict[str, Any]]) -> None:
        super().__init__(
            js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            standalone_preset_js_url=f"{DOCS_ASSETS}/swagger-ui-standalone-preset.js",
            favicon=f"<link rel='icon' type='image/png' href='{DOCS_ASSETS}/favicon-32x32.png'>",
            path="/",
        )
        self._built = built

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, self._built(request.app))


def openapi_config(models: Sequence[str]) -> OpenAPIConfig:
    """Docs at ``/docs`` (Swagger UI, no CDN) and the document at ``/docs/openapi.json``, built once."""
    built: dict[str, Any] = {}

    def build(app: Litestar) -> dict[str, Any]:
        if not built:
            built.update(document(app, models))
        return built

    @get("/openapi.json", include_in_schema=False, sync_to_thread=False)
    def openapi_json(request: Request) -> dict[str, Any]:
        return build(request.app)

    return OpenAPIConfig(
        title="mlx-gateway",
        version=__version__,
        path="/docs",
        render_plugins=[_SwaggerPage(build)],
        openapi_router=Router("/docs", route_handlers=[openapi_json], include_in_schema=False),
    )
