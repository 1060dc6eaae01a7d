"""The admin router: named prefix caches. Guarded by the admin key when one is configured."""

from __future__ import annotations

import hmac

from litestar import Request, Router, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody

from gateway import prefix_service
from gateway.config import Config
from gateway.errors import APIError, AuthenticationError
from gateway.routes.openai import bearer_token
from gateway.schemas.admin import CreatePrefixCache, DeletedPrefixCache, PrefixCacheList, PrefixCacheOut

__all__ = ["admin_router"]


class Forbidden(APIError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


async def provide_access(request: Request, state: State) -> tuple[str, bool]:
    """(tenant, is_admin). The admin key may act for any tenant; a tenant key only for its own."""
    config: Config = state.config
    token = bearer_token(request)
    if config.admin_key and token and hmac.compare_digest(token, config.admin_key):
        return config.default_tenant, True
    if config.admin_key and not config.auth_enabled:
        raise AuthenticationError("This endpoint needs the admin key: send 'Authorization: Bearer <admin key>'")
    if config.auth_enabled:
        if token is None or token not in config.api_keys:
            raise AuthenticationError("Missing or incorrect API key")
        return config.api_keys[token], False
    return config.default_tenant, True  # auth off: one trusted operator


def _tenant(access: tuple[str, bool], requested: str | None) -> str:
    tenant, is_admin = access
    if requested is None or requested == tenant:
        return tenant
    if not is_admin:
        raise Forbidden("A tenant's key can only manage that tenant's prefix caches")
    return requested


@post("/prefix-caches", status_code=201)
async def create_cache(
    data: JSONBody[CreatePrefixCache], access: NamedDependency[tuple[str, bool]], state: State
) -> PrefixCacheOut:
    """Build a named prefix cache (prefilled between other requests' steps) and store it."""
    return await prefix_service.create(state.engine, state.config, _tenant(access, data.tenant), data)


@get("/prefix-caches")
async def list_caches(
    access: NamedDependency[tuple[str, bool]], state: State, tenant: FromQuery[str | None] = None
) -> PrefixCacheList:
    return prefix_service.listing(state.engine, _tenant(access, tenant))


@get("/prefix-caches/{name:str}")
async def get_cache(
    name: FromPath[str],
    access: NamedDependency[tuple[str, bool]],
    state: State,
    tenant: FromQuery[str | None] = None,
    verify: FromQuery[bool] = False,
) -> PrefixCacheOut:
    """One cache; with ``?verify=true`` also the digests of its resident arrays and of its file."""
    return await prefix_service.get(state.engine, _tenant(access, tenant), name, verify)


@delete("/prefix-caches/{name:str}", status_code=200)
async def delete_cache(
    name: FromPath[str], access: NamedDependency[tuple[str, bool]], state: State, tenant: FromQuery[str | None] = None
) -> DeletedPrefixCache:
    return await prefix_service.delete(state.engine, _tenant(access, tenant), name)


admin_router = Router(
    "/admin",
    route_handlers=[create_cache, list_caches, get_cache, delete_cache],
    dependencies={"access": Provide(provide_access)},
    tags=["Admin"],
)
