"""The wiring of the guards, read from the app itself: every route that manages prefix caches takes the
access guard, every other ``/v1`` route the tenant guard. A new route cannot slip past unnoticed.
The guards' answers are tested on the real server in ``tests/integration/test_auth_guard.py``."""

from __future__ import annotations

from typing import cast

import pytest
from litestar.handlers import HTTPRouteHandler

from adapters.base import Engine
from gateway.app import create_app
from gateway.config import load_config
from gateway.errors import Forbidden
from gateway.tenancy.auth import Access, provide_access, provide_tenant


def _handlers() -> list[tuple[str, HTTPRouteHandler]]:
    app = create_app(load_config({"model": "tiny"}, environ={}), cast(Engine, object()))  # never started
    return [
        (route.path, handler)
        for route in app.routes
        for handler in route.route_handlers
        if isinstance(handler, HTTPRouteHandler) and "OPTIONS" not in handler.http_methods
    ]


def test_every_cache_route_takes_the_access_guard_and_every_other_v1_route_the_tenant_guard() -> None:
    cache_routes, v1_routes = set(), set()
    for path, handler in _handlers():
        params = handler.parsed_fn_signature.parameters
        deps = {name: provide.dependency for name, provide in handler.resolve_dependencies().items()}
        if "prefix-cache" in path:
            assert "access" in params and deps["access"] is provide_access, path
            cache_routes.add(f"{sorted(handler.http_methods)[0]} {path}")
        elif path.startswith("/v1"):
            assert "tenant" in params and deps["tenant"] is provide_tenant, path
            v1_routes.add(path)
    assert cache_routes == {
        "POST /admin/prefix-caches",
        "GET /admin/prefix-caches",
        "GET /admin/prefix-caches/{name:str}",
        "POST /admin/prefix-caches/{name:str}/warm",
        "DELETE /admin/prefix-caches/{name:str}",
        "POST /v1/prefix-cache/create",
        "GET /v1/prefix-cache/list",
        "DELETE /v1/prefix-cache/{name:str}",
    }
    assert {"/v1/chat/completions", "/v1/completions", "/v1/generate", "/v1/generate-with-prefix"} <= v1_routes


def test_a_tenant_names_only_itself_the_admin_anyone() -> None:
    assert Access("alpha", is_admin=False).tenant_for(None) == "alpha"
    assert Access("alpha", is_admin=False).tenant_for("alpha") == "alpha"
    with pytest.raises(Forbidden):
        Access("alpha", is_admin=False).tenant_for("beta")
    assert Access("default", is_admin=True).tenant_for("beta") == "beta"
