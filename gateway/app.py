"""The Litestar app: routes, the engine in app state, and the one exception handler that turns every error into
an OpenAI-shaped response (what each error answers is declared in ``gateway.errors``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.routes import HTTPRoute

from adapters.base import Engine
from gateway.body import StrictBody, cache_name_error
from gateway.browsers import cors_config, docs_assets_router, playground_router
from gateway.config import Config
from gateway.draining import Drain
from gateway.errors import (
    APIError,
    AuthenticationError,
    ErrorResponse,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServerError,
    api_error,
    logged,
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

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def _respond(exc: APIError) -> Response[ErrorResponse]:
    return Response(exc.body(), status_code=exc.status_code, headers=exc.headers())


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


def _method_not_allowed(request: Request, exc: HTTPException) -> APIError:
    allow = ", ".join(sorted(m.strip() for m in (exc.headers or {}).get("allow", "").split(",") if m.strip()))
    return MethodNotAllowed(f"Method {request.method} not allowed on {request.url.path}", allow=allow)


# Litestar's own HTTP errors (routing, body size, its guards), by status, as ours; the rest: see _http_error.
_HTTP_ERRORS: dict[int, Callable[[Request, HTTPException], APIError]] = {
    400: lambda _, exc: InvalidRequest(exc.detail),
    401: lambda _, exc: AuthenticationError(exc.detail),
    404: lambda request, _: NotFound(f"No route for {request.method} {request.url.path}", code="not_found"),
    405: _method_not_allowed,
    413: lambda _, __: PayloadTooLarge("The request body is too large"),
}


def _http_error(request: Request, exc: HTTPException) -> APIError:
    if isinstance(exc, ValidationException):
        return _validation_error(exc)
    status = exc.status_code
    if status in _HTTP_ERRORS:
        return _HTTP_ERRORS[status](request, exc)
    if status >= 500:
        logger.error("HTTP %d on %s: %s", status, request.url.path, exc.detail)
        return ServerError(exc.detail)
    error = APIError(exc.detail)
    error.status_code, error.type = status, "invalid_request_error"
    return error


def _error(request: Request, exc: Exception) -> Response[ErrorResponse]:
    """The app's one exception handler: ours as they are, the engine's and the store's as ``gateway.errors``
    declares them, Litestar's by status, and anything else as a 500 logged with its traceback."""
    if isinstance(exc, HTTPException):
        return _respond(_http_error(request, exc))
    error = api_error(exc)
    if error is None:
        logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _respond(ServerError("The server had an error while processing your request"))
    if logged(exc):
        logger.error("engine error: %s", exc)
    return _respond(error)


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
        exception_handlers={Exception: _error},
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
