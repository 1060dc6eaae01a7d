"""``GET /metrics``: Prometheus' text format, guarded by :func:`gateway.tenancy.auth.check_metrics_access`."""

from __future__ import annotations

from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec

from gateway.errors import ErrorResponse
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.tenancy.auth import check_metrics_access

__all__ = ["metrics"]

_REFUSED = {
    401: "No token, or one that is no key of this server (only when API keys or an admin key are configured)",
    403: "A tenant's key, or API keys configured without an admin key: only the admin key reads /metrics",
}


@get(
    "/metrics",
    tags=["Operations"],
    media_type=CONTENT_TYPE,
    responses={
        200: ResponseSpec(str, description="Prometheus text exposition format", media_type=CONTENT_TYPE),
        **{
            status: ResponseSpec(ErrorResponse, description=text, generate_examples=False)
            for status, text in _REFUSED.items()
        },
    },
)
async def metrics(request: Request, state: State) -> Response[bytes]:
    """Every metric of this server (docs/operations.md). Open while no key is configured; then the admin key
    as a bearer token."""
    check_metrics_access(request, state.config)
    registry: Metrics = state.metrics
    await state.engine.refresh()
    await state.admission.refresh()
    return Response(registry.exposition(), media_type=CONTENT_TYPE)
