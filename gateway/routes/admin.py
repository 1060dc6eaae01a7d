"""The admin router: named prefix caches, behind ``gateway.auth.provide_access`` like the seed aliases."""

from __future__ import annotations

from litestar import Router, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromQuery, JSONBody

from gateway import prefix_service
from gateway.auth import Access, provide_access
from gateway.openapi import MANAGE, READ, CachePath, errors
from gateway.schemas.admin import CreatePrefixCache, DeletedPrefixCache, PrefixCacheList, PrefixCacheOut

__all__ = ["admin_router"]


@post("/prefix-caches", status_code=201, responses=errors(MANAGE))
async def create_cache(
    data: JSONBody[CreatePrefixCache], access: NamedDependency[Access], state: State
) -> PrefixCacheOut:
    """Build a named prefix cache (prefilled between other requests' steps) and store it."""
    return await prefix_service.create(state.engine, state.config, access.tenant_for(data.tenant), data)


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


@delete("/prefix-caches/{name:str}", status_code=200, responses=errors(READ))
async def delete_cache(
    name: CachePath, access: NamedDependency[Access], state: State, tenant: FromQuery[str | None] = None
) -> DeletedPrefixCache:
    return await prefix_service.delete(state.engine, access.tenant_for(tenant), name)


admin_router = Router(
    "/admin",
    route_handlers=[create_cache, list_caches, get_cache, delete_cache],
    dependencies={"access": Provide(provide_access)},
    tags=["Admin"],
)
