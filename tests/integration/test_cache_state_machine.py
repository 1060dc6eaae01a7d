"""A stateful property test of named prefix caches on the real server: two tenants and the admin (acting
for either) create, replace, use, list, get and delete caches whose names collide across tenants, and try
to reach the other tenant's. A model of what each tenant holds is compared with what the server says
after every step: no tenant ever sees, uses or changes another's cache, and another tenant's cache is the
same 404 as a name that never existed (same status and body)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tests.servers import Server, run_server

KEYS = {"alpha": "key-alpha", "beta": "key-beta", "gamma": "key-gamma"}
ADMIN = "admin-secret"
TENANTS = ("alpha", "beta")
NAMES = ("n0", "n1", "n2")
PROMPTS = ("def f(self): return the value", "import class yield " * 20, "the value of self " * 60)
QUESTION = "and then"

actors = st.sampled_from([("alpha", False), ("beta", False), ("alpha", True), ("beta", True)])
names = st.sampled_from(NAMES)
prompts = st.sampled_from(range(len(PROMPTS)))
tenants = st.sampled_from(TENANTS)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def not_found(name: str) -> dict[str, Any]:
    return {
        "error": {
            "message": f"The prefix cache '{name}' does not exist",
            "type": "invalid_request_error",
            "param": "prefix_cache",
            "code": "prefix_cache_not_found",
        }
    }


class Reference:
    """Each prompt's tokens_sha256 and the greedy answer through a cache of it (tenant gamma's, never
    touched by the machine)."""

    def __init__(self, server: Server) -> None:
        self.sha: list[str] = []
        self.answer: list[str] = []
        for i, prompt in enumerate(PROMPTS):
            body = {"name": f"ref-{i}", "model": "tiny", "prompt": prompt}
            r = httpx.post(f"{server.url}/admin/prefix-caches", json=body, headers=auth(KEYS["gamma"]), timeout=60)
            assert r.status_code == 201, r.text
            self.sha.append(r.json()["tokens_sha256"])
            self.answer.append(use(server, "gamma", f"ref-{i}").json()["choices"][0]["text"])


def use(server: Server, tenant: str, name: str) -> httpx.Response:
    body = {"model": "tiny", "prompt": QUESTION, "max_tokens": 5, "temperature": 0, "prefix_cache": name}
    return httpx.post(f"{server.v1}/completions", json=body, headers=auth(KEYS[tenant]), timeout=60)


class Caches(RuleBasedStateMachine):
    server: Server
    ref: Reference

    def __init__(self) -> None:
        super().__init__()
        # (tenant, name) -> prompt index
        self.model: dict[tuple[str, str], int] = {}
        for tenant in TENANTS:  # each run starts from nothing
            for c in self.listing(tenant):
                r = httpx.delete(f"{self.server.url}/admin/prefix-caches/{c['id']}", headers=auth(KEYS[tenant]))
                assert r.status_code == 200, r.text

    def listing(self, tenant: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.server.url}/admin/prefix-caches", headers=auth(KEYS[tenant]), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    @staticmethod
    def key(tenant: str, admin: bool) -> str:
        return ADMIN if admin else KEYS[tenant]

    @rule(actor=actors, name=names, prompt=prompts, replace=st.booleans())
    def create(self, actor: tuple[str, bool], name: str, prompt: int, replace: bool) -> None:
        tenant, admin = actor
        body: dict[str, Any] = {"name": name, "model": "tiny", "prompt": PROMPTS[prompt], "replace": replace}
        if admin:
            body["tenant"] = tenant
        r = httpx.post(
            f"{self.server.url}/admin/prefix-caches", json=body, headers=auth(self.key(tenant, admin)), timeout=60
        )
        if (tenant, name) in self.model and not replace:
            assert r.status_code == 409 and r.json()["error"]["code"] == "prefix_cache_exists", r.text
            return
        assert r.status_code == 201, r.text
        assert r.json()["id"] == name and r.json()["tokens_sha256"] == self.ref.sha[prompt]
        self.model[(tenant, name)] = prompt

    @rule(actor=actors, name=names)
    def delete(self, actor: tuple[str, bool], name: str) -> None:
        tenant, admin = actor
        query = f"?tenant={tenant}" if admin else ""
        r = httpx.delete(
            f"{self.server.url}/admin/prefix-caches/{name}{query}", headers=auth(self.key(tenant, admin)), timeout=30
        )
        if (tenant, name) in self.model:
            assert r.status_code == 200 and r.json()["deleted"] is True, r.text
            del self.model[(tenant, name)]
        else:
            assert r.status_code == 404 and r.json() == not_found(name), r.text

    @rule(actor=actors, name=names)
    def get(self, actor: tuple[str, bool], name: str) -> None:
        tenant, admin = actor
        query = f"?tenant={tenant}" if admin else ""
        r = httpx.get(
            f"{self.server.url}/admin/prefix-caches/{name}{query}", headers=auth(self.key(tenant, admin)), timeout=30
        )
        if (tenant, name) in self.model:
            assert r.status_code == 200 and r.json()["tokens_sha256"] == self.ref.sha[self.model[(tenant, name)]]
        else:
            assert r.status_code == 404 and r.json() == not_found(name), r.text

    @rule(tenant=tenants, name=names)
    def use(self, tenant: str, name: str) -> None:
        r = use(self.server, tenant, name)
        prompt = self.model.get((tenant, name))
        if prompt is None:
            body = r.json()
            assert r.status_code == 404 and body["error"]["code"] == "prefix_cache_not_found", r.text
            assert body["error"]["message"] == not_found(name)["error"]["message"]
            return
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == self.ref.answer[prompt]
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    @rule(tenant=tenants, name=names, prompt=prompts)
    def reach_for_the_other_tenant(self, tenant: str, name: str, prompt: int) -> None:
        """A tenant's key naming the other tenant is refused and changes nothing."""
        other = next(t for t in TENANTS if t != tenant)
        url = f"{self.server.url}/admin/prefix-caches"
        body = {"name": name, "model": "tiny", "prompt": PROMPTS[prompt], "tenant": other, "replace": True}
        for r in (
            httpx.post(url, json=body, headers=auth(KEYS[tenant]), timeout=30),
            httpx.delete(f"{url}/{name}?tenant={other}", headers=auth(KEYS[tenant]), timeout=30),
            httpx.get(f"{url}/{name}?tenant={other}", headers=auth(KEYS[tenant]), timeout=30),
        ):
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text

    @invariant()
    def each_tenant_sees_exactly_its_own(self) -> None:
        for tenant in TENANTS:
            held = {c["id"]: c["tokens_sha256"] for c in self.listing(tenant)}
            expected = {n: self.ref.sha[p] for (t, n), p in self.model.items() if t == tenant}
            assert held == expected, (tenant, held, expected)


@pytest.fixture(scope="module")
def keyed_server(models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"MLX_GATEWAY_API_KEYS": ",".join(f"{k}:{t}" for t, k in KEYS.items()), "MLX_GATEWAY_ADMIN_KEY": ADMIN}
    cache_dir = tmp_path_factory.mktemp("state-machine-caches")
    with run_server(
        ["--model", "tiny", "--cache-dir", str(cache_dir)], models_dir=models_dir, log_dir=log_dir, env=env
    ) as server:
        yield server


def test_no_tenant_ever_sees_uses_or_changes_another_tenants_cache(keyed_server: Server) -> None:
    Caches.server = keyed_server
    Caches.ref = Reference(keyed_server)
    run_state_machine_as_test(
        Caches,
        settings=settings(
            max_examples=8,
            stateful_step_count=25,
            derandomize=True,  # the same runs in CI every time
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )
