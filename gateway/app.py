"""The Litestar app: routes, the engine in app state, and the one table that turns errors into
OpenAI-shaped responses."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.routes import HTTPRoute

from adapters.base import Engine, EngineError, EngineNotReady, ModelUnavailable, UnknownModel
from gateway.body import StrictBody, cache_name_error
from gateway.browsers import cors_config, docs_assets_router, playground_router
from gateway.config import Config
from gateway.draining import Drain
from gateway.errors import (
    APIError,
    AuthenticationError,
    Conflict,
    ErrorResponse,
    InvalidRequest,
    MethodNotAllowed,
    ModelUnavailableError,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    ServerError,
    ServiceUnavailable,
)
from gateway.metrics import Metrics
from gateway.openapi import openapi_config
from gateway.request_context import RequestContext
from gateway.routes.admin import admin_router
from gateway.routes.health import health, index
from gateway.routes.metrics import metrics
from gateway.routes.openai import openai_router
from gateway.routes.responses import responses_router
from gateway.routes.seed import seed_router
from gateway.tenancy.admission import Admission, Places
from gateway.tenancy.rate_limits import RateLimitHeaders
from prefix_caches import (
    InvalidCacheName,
    InvalidKVSettings,
    PrefixCacheError,
    PrefixCacheExists,
    PrefixCacheNotFound,
    PrefixCacheQuotaExceeded,
)

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def _respond(exc: APIError) -> Response[ErrorResponse]:
    return Response(exc.body(), status_code=exc.status_code, headers=exc.headers())


def _api_error(_: Request, exc: APIError) -> Response[ErrorResponse]:
    return _respond(exc)


_MISSING = re.compile(r"missing required field `([^`]+)`")


def _validation_error(exc: ValidationException) -> InvalidRequest:
    """A 400 for Litestar's validation of path and query parameters (bodies: gateway.body)."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    details = [e for e in extra if isinstance(e, dict)]
    if not details:
        return InvalidRequest(str(exc.detail))
    texts, params = [], []
    for d in details:
        key, message = d.get("key"), str(d.get("message"))
        missing = _MISSING.search(message)
        if key in (None, "data") and missing:  # msgspec names the missing field only in the message
            key = missing.group(1)
            message = "this field is required"
        if key and (named := cache_name_error(key, message)):
            return named
        texts.append(f"Invalid value for '{key}': {message}" if key else message)
        params.append(key)
    return InvalidRequest("; ".join(texts), param=params[0])


def _http_error(request: Request, exc: HTTPException) -> Response[ErrorResponse]:
    status = exc.status_code
    if isinstance(exc, ValidationException):
        return _respond(_validation_error(exc))
    if status == 400:
        return _respond(InvalidRequest(exc.detail))
    if status == 401:
        return _respond(AuthenticationError(exc.detail))
    if status == 404:
        return _respond(NotFound(f"No route for {request.method} {request.url.path}", code="not_found"))
    if status == 405:
        allow = ", ".join(sorted(m.strip() for m in (exc.headers or {}).get("allow", "").split(",") if m.strip()))
        return _respond(MethodNotAllowed(f"Method {request.method} not allowed on {request.url.path}", allow=allow))
    if status == 413:
        return _respond(PayloadTooLarge("The request body is too large"))
    if status >= 500:
        logger.error("HTTP %d on %s: %s", status, request.url.path, exc.detail)
        return _respond(ServerError(exc.detail))
    error = APIError(exc.detail)
    error.status_code, error.type = status, "invalid_request_error"
    return _respond(error)


def _engine_error(_: Request, exc: EngineError) -> Response[ErrorResponse]:
    if isinstance(exc, UnknownModel):
        return _respond(NotFound(str(exc), param="model", code="model_not_found"))
    if isinstance(exc, EngineNotReady):
        return _respond(ServiceUnavailable(str(exc), param="model", code="model_loading"))
    if isinstance(exc, ModelUnavailable):
        return _respond(ModelUnavailableError(str(exc), param="model"))
    logger.error("engine error: %s", exc)
    return _respond(ServerError(str(exc)))


def _prefix_error(_: Request, exc: PrefixCacheError) -> Response[ErrorResponse]:
    if isinstance(exc, PrefixCacheNotFound):
        return _respond(NotFound(str(exc), param="prefix_cache", code="prefix_cache_not_found"))
    if isinstance(exc, PrefixCacheExists):
        return _respond(Conflict(str(exc), param="name", code="prefix_cache_exists"))
    if isinstance(exc, PrefixCacheQuotaExceeded):
        return _respond(QuotaExceeded(str(exc), code=exc.quota))
    if isinstance(exc, InvalidKVSettings):
        return _respond(InvalidRequest(str(exc), param="kv_group_size", code="invalid_kv_settings"))
    if isinstance(exc, InvalidCacheName):
        return _respond(InvalidRequest(str(exc), param="name", code="invalid_prefix_cache_name"))
    return _respond(InvalidRequest(str(exc), param="prefix_cache", code="prefix_cache_unusable"))


def _unexpected(request: Request, exc: Exception) -> Response[ErrorResponse]:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _respond(ServerError("The server had an error while processing your request"))


def _answer_options(request: Request) -> Response[None] | None:
    """``OPTIONS`` with every method of the path. Litestar 2's own OPTIONS handler lists only the methods of
    the first handler registered on a path (litestar-org/litestar#4169, fixed in 3.0); the app's routes know
    them all."""
    if request.method != "OPTIONS":
        return None
    template = request.scope.get("path_template")
    for route in request.app.routes:
        if isinstance(route, HTTPRoute) and route.path_format == template:
            return Response(None, status_code=204, headers={"allow": ", ".join(sorted(route.methods))})
    return None


def create_app(
    config: Config, engine: Engine, places: Places | None = None, metrics_dir: Path | None = None
) -> Litestar:
    """The app serving ``engine``. The engine starts with the app and stops with it.

    Args:
        places: admission shared with other front ends (``--api-servers``); None: this process's own.
        metrics_dir: where every front end's HTTP-side metrics are kept together (prometheus_client's
            multiprocess mode); None: this app's own registry.
    """
    drain = Drain()
    admission = places or Admission.of(config)
    registry = Metrics(engine, admission, metrics_dir)
    app = Litestar(
        route_handlers=[
            openai_router,
            responses_router,
            seed_router,
            admin_router,
            health,
            index,
            metrics,
            playground_router(),
            docs_assets_router(),
        ],
        state=State({"config": config, "engine": engine, "drain": drain, "admission": admission, "metrics": registry}),
        on_startup=[lambda: engine.start()],
        on_shutdown=[lambda: engine.stop()],
        exception_handlers={
            APIError: _api_error,
            EngineError: _engine_error,
            PrefixCacheError: _prefix_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        request_max_body_size=config.max_body_bytes,
        # Bodies decode strictly into their Structs (Litestar's default conversion is lax: "5" -> 5).
        dto=StrictBody,
        return_dto=None,
        before_request=_answer_options,
        middleware=[drain.middleware],
        cors_config=cors_config(config.cors_allowed_origins),
        openapi_config=openapi_config([m.name for m in config.models]),
        debug=False,
        # Logging is configured once by the CLI; Litestar must not install its own handlers.
        logging_config=None,
    )
    # Outside routing (as Litestar wraps its own CORS middleware), so 404s and 405s get an id and are counted.
    app.asgi_handler = RequestContext(
        RateLimitHeaders(app.asgi_handler, admission.rate_headers), registry.request_finished
    )
    return app
