"""The admin router: named prefix caches, behind ``gateway.tenancy.auth.provide_access`` like the seed aliases."""

from __future__ import annotations

from litestar import Request, Router, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp

from gateway import adapter_service, prefix_service
from gateway.config import Config
from gateway.disconnect import unless_client_leaves
from gateway.encoding import encode
from gateway.errors import Forbidden
from gateway.openapi import MANAGE, READ, CachePath, errors
from gateway.schemas.admin import (
    AdapterList,
    AdapterOut,
    CreatePrefixCache,
    DeletedAdapter,
    DeletedPrefixCache,
    PrefixCacheList,
    PrefixCacheOut,
    PrefixCacheProgress,
    RegisterAdapter,
    TenantList,
    WarmedPrefixCache,
)
from gateway.sse import sse_response
from gateway.tenancy.auth import Access, provide_access
from gateway.tenancy.tenants import tenant_report

__all__ = ["admin_router"]


@post(
    "/prefix-caches",
    status_code=201,
    responses={
        201: ResponseSpec(data_container=PrefixCacheOut, description="The cache, built and stored"),
        200: ResponseSpec(
            data_container=PrefixCacheProgress,
            description="With `stream: true`: progress events while the prefix is prefilled, then the cache",
        ),
        **errors(MANAGE),
    },
)
async def create_cache(
    data: JSONBody[CreatePrefixCache], access: NamedDependency[Access], state: State, request: Request
) -> ASGIApp:
    """Build a named prefix cache (prefilled between other requests' steps) and store it. With
    ``stream: true`` the answer is server-sent events: ``prefix_cache.progress`` after each prefilled chunk,
    then the cache, then ``[DONE]``. A client that leaves (closes the connection or the stream) cancels the
    build, and nothing is stored."""
    return await unless_client_leaves(request, _create(state, access.tenant_for(data.tenant), data))


async def _create(state: State, tenant: str, data: CreatePrefixCache) -> ASGIApp:
    if not data.stream:
        built = await prefix_service.create(state.engine, state.config, tenant, data)
        return ASGIResponse(body=encode(built), status_code=201, media_type="application/json")
    config: Config = state.config
    events = await prefix_service.create_streamed(state.engine, config, tenant, data)
    return sse_response(
        events,
        request_id=f"build {data.name}",
        ping_seconds=config.sse_ping_seconds,
        send_timeout=config.sse_send_timeout_seconds,
    )


@get("/prefix-caches", responses=errors([400, 401, 403, 500]))
async def list_caches(
    access: NamedDependency[Access], state: State, tenant: FromQuery[str | None] = None
) -> PrefixCacheList:
    return prefix_service.listing(state.engine, access.tenant_for(tenant))


@get("/prefix-caches/{name:str}", responses=errors([*READ, 503]))
async def get_cache(
    name: CachePath,
    access: NamedDependency[Access],
    state: State,
    tenant: FromQuery[str | None] = None,
    verify: FromQuery[bool] = False,
) -> PrefixCacheOut:
    """One cache; with ``?verify=true`` also the digests of its resident arrays and of its file."""
    return await prefix_service.get(state.engine, access.tenant_for(tenant), name, verify)


@post("/prefix-caches/{name:str}/warm", status_code=200, responses=errors([*READ, 409, 503]))
async def warm_cache(
    name: CachePath, access: NamedDependency[Access], state: State, tenant: FromQuery[str | None] = None
) -> WarmedPrefixCache:
    """Load a stored cache into resident memory now (after a restart, or after it was evicted), so that the
    next request naming it does not read its file. A 409 if it alone is larger than the memory budget."""
    return await prefix_service.warm(state.engine, access.tenant_for(tenant), name)


@delete("/prefix-caches/{name:str}", status_code=200, responses=errors(READ))
async def delete_cache(
    name: CachePath, access: NamedDependency[Access], state: State, tenant: FromQuery[str | None] = None
) -> DeletedPrefixCache:
    return await prefix_service.delete(state.engine, access.tenant_for(tenant), name)


@get("/tenants", responses=errors([401, 403, 500]))
async def list_tenants(access: NamedDependency[Access], state: State) -> TenantList:
    """Every tenant's quotas and its use of them now (the admin key only: it names every tenant)."""
    if not access.is_admin:
        raise Forbidden("Only the admin key can read every tenant's quotas")
    return await tenant_report(state.config, state.admission, state.engine)


@post("/adapters", status_code=201, responses=errors([400, 401, 403, 404, 409, 429, 500, 503]))
async def register_adapter(
    data: JSONBody[RegisterAdapter], access: NamedDependency[Access], state: State
) -> AdapterOut:
    """Serve an ``mlx_lm.lora`` adapter directory (inside the server's adapters directory) as a model of its own
    name on its base model, from now on and after restarts, on every replica sharing the cache directory. A
    tenant's key registers it for that tenant alone (counted against its ``max_adapters`` and
    ``max_adapter_bytes``); the admin key for one tenant (``tenant``) or for every tenant. A full fine-tune, or
    an adapter of another model, is a 400 ``invalid_adapter``."""
    return await adapter_service.register(state, access, data)


@get("/adapters", responses=errors([401, 403, 500]))
async def list_adapters(access: NamedDependency[Access], state: State) -> AdapterList:
    """The adapters the caller manages (the admin key: every adapter)."""
    return adapter_service.listing(state, access)


@delete("/adapters/{name:str}", status_code=200, responses=errors([400, 401, 403, 404, 409, 500]))
async def unregister_adapter(name: FromPath[str], access: NamedDependency[Access], state: State) -> DeletedAdapter:
    """Stop serving a registered adapter: requests running on it finish, new ones get a 404, and the prefix
    caches built under it are deleted with it."""
    return await adapter_service.unregister(state, access, name)


admin_router = Router(
    "/admin",
    route_handlers=[
        create_cache,
        list_caches,
        get_cache,
        warm_cache,
        delete_cache,
        list_tenants,
        register_adapter,
        list_adapters,
        unregister_adapter,
    ],
    dependencies={"access": Provide(provide_access)},
    tags=["Admin"],
)
