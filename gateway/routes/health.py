"""Operational routes: ``GET /health`` and ``GET /`` (what this server is and where things are)."""

from __future__ import annotations

import socket
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec

from gateway import __version__
from gateway.tenancy.auth import is_admin_request
from gateway.tenancy.tenants import tenant_report

__all__ = ["health", "index"]

ENDPOINTS = {
    "GET /v1/models": "list the served models",
    "GET /v1/models/{id}": "one model",
    "POST /v1/chat/completions": "chat completions (OpenAI), streaming with stream=true",
    "POST /v1/completions": "text completions (OpenAI), streaming with stream=true",
    "POST /admin/prefix-caches": "build a named prefix cache (prompt or messages; stream=true for progress)",
    "GET /admin/prefix-caches": "list this tenant's prefix caches",
    "GET /admin/prefix-caches/{name}": "one prefix cache (?verify=true checks its digests)",
    "POST /admin/prefix-caches/{name}/warm": "load a prefix cache into memory now",
    "DELETE /admin/prefix-caches/{name}": "delete a prefix cache",
    "GET /admin/tenants": "every tenant's quotas and use (admin key)",
    "GET /health": "engine, models, memory and prefix-cache statistics",
    "GET /metrics": "Prometheus metrics (the admin key once any key is configured)",
    "GET /docs": "interactive API documentation (OpenAPI schema at /docs/openapi.json)",
    "GET /playground": "a chat page in the browser: models, prefix caches, streaming, TTFT and tokens/s",
}


@get(
    "/health",
    tags=["Operations"],
    responses={
        503: ResponseSpec(
            dict[str, Any], description="No model can serve (loading, failed, engine down), or the server drains"
        )
    },
)
async def health(request: Request, state: State) -> Response[dict[str, Any]]:
    """200 when at least one model can serve: ``ok`` (all ready), ``loading`` (others still loading) or
    ``degraded`` (some failed; each model's ``state``, ``stage`` and ``error`` say which and why). 503 when
    none can: ``loading``, ``unhealthy`` (every model failed, or the engine stopped), or ``draining``."""
    await state.engine.refresh()
    report = state.engine.health()
    states = [m["state"] for m in report["models"].values()]
    ready = "ready" in states
    if state.drain.draining:
        status = "draining"
    elif not report["engine_alive"]:
        status = "unhealthy"
    elif "failed" in states:
        status = "degraded" if ready else ("loading" if "loading" in states else "unhealthy")
    elif "loading" in states:
        status = "loading"
    else:
        status = "ok"
    serving = ready and report["engine_alive"] and status != "draining"
    # Every request runs on its own cache; no automatic reuse across requests exists to turn on.
    config = state.config
    # The hostname tells containers apart (their host is 0.0.0.0); the port tells processes on one machine apart.
    replica = config.replica_id or f"{socket.gethostname()}:{config.port}"
    body = {"status": status, "version": __version__, "replica": replica, "isolation_enabled": True, **report}
    adapters = [m for m in state.engine.models() if m.parent is not None]
    # Counts only: a tenant's adapter's name is the tenant's own (the admin sees them in /admin/adapters).
    body["adapters"] = {"count": len(adapters), "bytes": sum(m.adapter_bytes for m in adapters)}
    if is_admin_request(request, state.config):
        # Every tenant's quotas and use, as GET /admin/tenants lists them: only the admin sees them.
        tenants = await tenant_report(state.config, state.admission, state.engine)
        body["tenants"] = msgspec.to_builtins(tenants.data)
    return Response(body, status_code=200 if serving else 503)


@get("/", tags=["Operations"])
async def index(state: State) -> dict[str, Any]:
    return {
        "name": "mlx-gateway",
        "version": __version__,
        "description": "OpenAI-compatible LLM gateway on mlx / mlx-lm. Point an OpenAI client at /v1.",
        "models": [m.id for m in state.engine.models()],
        "auth": "bearer API key" if state.config.auth_enabled else "off",
        "endpoints": ENDPOINTS,
        "docs": "/docs",
        "playground": "/playground",
    }
