"""One guard for every route that manages prefix caches (the admin routes and the seed aliases), under
each auth configuration, on the real server: who gets in, the exact refusal, and that a refused request
changed nothing stored. The generate routes stay on the tenant guard, like the OpenAI routes. ``/metrics`` is
open with no key configured, then needs the admin key."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import Server, run_server

ADMIN_KEY = "admin-secret"
CONFIGS: dict[str, dict[str, str]] = {
    "none": {},
    "admin": {"MLX_GATEWAY_ADMIN_KEY": ADMIN_KEY},
    "tenants": {"MLX_GATEWAY_API_KEYS": "key-alpha:alpha,key-beta:beta"},
    "tenants+admin": {"MLX_GATEWAY_API_KEYS": "key-alpha:alpha,key-beta:beta", "MLX_GATEWAY_ADMIN_KEY": ADMIN_KEY},
}
CREDENTIALS: dict[str, dict[str, str]] = {
    "none": {},
    "wrong": {"Authorization": "Bearer nope"},
    "tenant": {"Authorization": "Bearer key-alpha"},
    "admin": {"Authorization": f"Bearer {ADMIN_KEY}"},
}
BETA = {"Authorization": "Bearer key-beta"}
PREFIX = "You answer questions about the auth tests, briefly and politely."


@dataclass
class Gateway:
    config: str
    server: Server
    cache_dir: Path

    @property
    def tenants(self) -> bool:
        return "tenants" in self.config

    @property
    def admin(self) -> bool:
        return "admin" in self.config

    def acts_for(self, credential: str) -> str | None:
        """The tenant whose caches ``credential`` manages here, or None when it is refused."""
        if not self.tenants and not self.admin:
            return "default"  # auth off: every request is the trusted operator, whatever it sends
        if credential == "tenant" and self.tenants:
            return "alpha"
        if credential == "admin" and self.admin:
            return "default"
        return None

    def root(self) -> str:
        """A credential this configuration accepts, to build the caches a test acts on."""
        return "admin" if self.admin else "tenant" if self.tenants else "none"

    def refusal(self, credential: str) -> dict[str, Any]:
        if credential == "none":
            needed = "an API key" if self.tenants else "the admin key"
            message = f"Managing prefix caches needs {needed}: send 'Authorization: Bearer <key>'"
        else:
            message = "Incorrect API key provided"
        return {"error": {"message": message, "type": "authentication_error", "param": None, "code": "invalid_api_key"}}

    def stored(self) -> tuple[dict[str, tuple[int, int]], dict[str, list[str]]]:
        """Everything stored: the files on disk, and each tenant's cache list as the API reports it."""
        files = {
            str(p.relative_to(self.cache_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(self.cache_dir.rglob("*"))
            if p.is_file()
        }
        views: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
        if self.admin:
            views = {t: (CREDENTIALS["admin"], {"tenant": t}) for t in ("default", "alpha", "beta")}
        elif self.tenants:
            views = {"alpha": (CREDENTIALS["tenant"], {}), "beta": (BETA, {})}
        else:
            views = {"default": ({}, {})}
        lists = {}
        for tenant, (headers, params) in views.items():
            r = httpx.get(f"{self.server.url}/admin/prefix-caches", headers=headers, params=params, timeout=30)
            assert r.status_code == 200, r.text
            lists[tenant] = [c["id"] for c in r.json()["data"]]
        return files, lists

    def build(self, name: str, credential: str) -> None:
        body = {"name": name, "model": "tiny", "prompt": PREFIX, "replace": True}
        r = httpx.post(f"{self.server.url}/admin/prefix-caches", json=body, headers=CREDENTIALS[credential], timeout=60)
        assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def gateways(
    models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Gateway]]:
    """Each configuration's server, started once for the module on first use (a start costs seconds)."""
    started: dict[str, Gateway] = {}
    with ExitStack() as stack:

        def start(config: str) -> Gateway:
            if config not in started:
                cache_dir = tmp_path_factory.mktemp(f"auth-{config.replace('+', '-')}")
                args = ["--model", "tiny", "--cache-dir", str(cache_dir)]
                server = stack.enter_context(
                    run_server(args, models_dir=models_dir, log_dir=log_dir, env=CONFIGS[config])
                )
                started[config] = Gateway(config, server, cache_dir)
            return started[config]

        yield start


@pytest.fixture(params=list(CONFIGS))
def gateway(request: pytest.FixtureRequest, gateways: Callable[[str], Gateway]) -> Gateway:
    return gateways(request.param)


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # "{name}" is the cache's name
    kind: str  # create, list, get, warm, delete

    def call(self, gw: Gateway, name: str, headers: dict[str, str]) -> httpx.Response:
        body: dict[str, Any] | None = None
        if self.kind == "create":
            body = (
                {"name": name, "model": "tiny", "prompt": PREFIX}
                if self.path.startswith("/admin")
                else {"model": "tiny", "cache_name": name, "prefix_prompt": PREFIX}
            )
        url = gw.server.url + self.path.format(name=name)
        return httpx.request(self.method, url, json=body, headers=headers, timeout=60)


ROUTES = {
    "admin-create": Route("POST", "/admin/prefix-caches", "create"),
    "admin-list": Route("GET", "/admin/prefix-caches", "list"),
    "admin-get": Route("GET", "/admin/prefix-caches/{name}", "get"),
    "admin-warm": Route("POST", "/admin/prefix-caches/{name}/warm", "warm"),
    "admin-delete": Route("DELETE", "/admin/prefix-caches/{name}", "delete"),
    "seed-create": Route("POST", "/v1/prefix-cache/create", "create"),
    "seed-list": Route("GET", "/v1/prefix-cache/list", "list"),
    "seed-delete": Route("DELETE", "/v1/prefix-cache/{name}", "delete"),
}


@pytest.mark.parametrize("credential", list(CREDENTIALS))
@pytest.mark.parametrize("route", list(ROUTES))
def test_cache_route(gateway: Gateway, route: str, credential: str) -> None:
    spec = ROUTES[route]
    name = f"{route}-{credential}"
    tenant = gateway.acts_for(credential)
    if spec.kind != "create":  # something to list, read or delete, in the tenant the credential acts for
        gateway.build(name, credential if tenant is not None else gateway.root())
    before = gateway.stored()

    r = spec.call(gateway, name, CREDENTIALS[credential])

    if tenant is None:
        assert r.status_code == 401, r.text
        assert r.json() == gateway.refusal(credential)
        assert gateway.stored() == before  # nothing built, nothing deleted
        return
    files, lists = gateway.stored()
    if spec.kind == "create":
        assert r.status_code == 201, r.text
        assert r.json()["id"] == name and r.json()["object"] == "prefix_cache" and r.json()["status"] == "ready"
        assert name in lists[tenant] and name not in before[1][tenant]
    elif spec.kind == "list":
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "list" and [c["id"] for c in r.json()["data"]] == before[1][tenant]
        assert (files, lists) == before
    elif spec.kind == "get":
        assert r.status_code == 200, r.text
        assert r.json()["id"] == name and r.json()["object"] == "prefix_cache"
        assert (files, lists) == before
    elif spec.kind == "warm":
        assert r.status_code == 200, r.text
        assert r.json()["id"] == name and r.json()["object"] == "prefix_cache.warmed"
        assert (files, lists) == before
    else:
        assert r.status_code == 200, r.text
        assert r.json() == {"id": name, "object": "prefix_cache.deleted", "deleted": True}
        assert name in before[1][tenant] and name not in lists[tenant]


GENERATE = {
    "generate": ("/v1/generate", {}),
    # A cache that was never built: getting past the guard is a 404, and no stored cache records a hit.
    "generate-with-prefix": ("/v1/generate-with-prefix", {"cache_name": "never-built"}),
}


@pytest.mark.parametrize("credential", list(CREDENTIALS))
@pytest.mark.parametrize("route", list(GENERATE))
def test_generate_routes_use_the_tenant_guard(gateway: Gateway, route: str, credential: str) -> None:
    path, extra = GENERATE[route]
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2, "temperature": 0, **extra}
    r = httpx.post(gateway.server.url + path, json=body, headers=CREDENTIALS[credential], timeout=60)
    if gateway.tenants and credential != "tenant":  # the admin key is not an inference key
        assert r.status_code == 401, r.text
        missing = "Missing API key: send 'Authorization: Bearer <key>'"
        message = missing if credential == "none" else "Incorrect API key provided"
        error = {"message": message, "type": "authentication_error", "param": None, "code": "invalid_api_key"}
        assert r.json() == {"error": error}
    elif route == "generate":  # auth off, or an admin key alone: inference stays open
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny" and r.json()["usage"]["completion_tokens"] >= 1
    else:
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "prefix_cache_not_found"


def test_admin_key_acts_for_any_tenant_a_tenant_key_for_its_own(gateways: Callable[[str], Gateway]) -> None:
    gw = gateways("tenants+admin")
    url = f"{gw.server.url}/admin/prefix-caches"
    body = {"name": "for-alpha", "model": "tiny", "prompt": PREFIX, "tenant": "alpha"}
    assert httpx.post(url, json=body, headers=CREDENTIALS["admin"], timeout=60).status_code == 201
    assert httpx.get(f"{url}/for-alpha", headers=CREDENTIALS["tenant"], timeout=30).status_code == 200
    before = gw.stored()
    forbidden = {
        "error": {
            "message": "A tenant's key can only manage that tenant's prefix caches",
            "type": "permission_error",
            "param": None,
            "code": "forbidden",
        }
    }
    refused = [
        httpx.get(url, headers=BETA, params={"tenant": "alpha"}, timeout=30),
        httpx.delete(f"{url}/for-alpha", headers=BETA, params={"tenant": "alpha"}, timeout=30),
        httpx.post(url, json={**body, "name": "by-beta"}, headers=BETA, timeout=60),
    ]
    for r in refused:
        assert r.status_code == 403 and r.json() == forbidden, r.text
    # Without ?tenant=, beta's key names beta's caches: alpha's is as absent as a name never built.
    missing = httpx.delete(f"{url}/for-alpha", headers=BETA, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "prefix_cache_not_found"
    assert gw.stored() == before


@pytest.mark.parametrize("path", ["/admin/prefix-caches", "/v1/prefix-cache/list", "/v1/models"])
def test_a_key_that_is_not_ascii_is_refused_not_a_crash(gateways: Callable[[str], Gateway], path: str) -> None:
    gw = gateways("tenants+admin")
    headers = {"Authorization": "Bearer clé-admin".encode("latin-1")}
    r = httpx.get(gw.server.url + path, headers=headers, timeout=30)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["message"] == "Incorrect API key provided"


@pytest.mark.parametrize("credential", list(CREDENTIALS))
def test_metrics_need_the_admin_key_once_any_key_is_configured(gateway: Gateway, credential: str) -> None:
    r = httpx.get(f"{gateway.server.url}/metrics", headers=CREDENTIALS[credential], timeout=30)
    if not gateway.tenants and not gateway.admin or credential == "admin" and gateway.admin:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        families = {f.name for f in text_string_to_metric_families(r.text)}
        assert {"mlx_gateway_http_requests", "mlx_gateway_queue_depth", "mlx_gateway_engine_requests"} <= families
        return
    known = {"tenant": gateway.tenants, "admin": gateway.admin}.get(credential, False)
    if credential == "none":
        status, message = 401, "Reading /metrics needs the admin key: send 'Authorization: Bearer <key>'"
    elif not known:
        status, message = 401, "Incorrect API key provided"
    elif gateway.admin:
        status, message = (
            403,
            "A tenant's key cannot read /metrics (it holds every tenant's figures); use the admin key",
        )
    else:
        status, message = 403, "Reading /metrics needs the admin key, and this server has none (set admin_key)"
    assert r.status_code == status, r.text
    kind, code = ("authentication_error", "invalid_api_key") if status == 401 else ("permission_error", "forbidden")
    assert r.json() == {"error": {"message": message, "type": kind, "param": None, "code": code}}
    assert "x-request-id" in r.headers
