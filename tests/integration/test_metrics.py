"""``GET /metrics`` scraped from the real server before and after real requests (streamed and not, a named
prefix cache hit and a miss, refused and unrouted requests): each metric moves by what was done, and the
engine's figures are the ones ``/health`` reports. Who may scrape, per auth configuration:
tests/integration/test_auth_guard.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_wire import sse_events
from tests.servers import Server, run_server

ADMIN = {"Authorization": "Bearer admin-secret"}
ALPHA = {"Authorization": "Bearer key-alpha"}
SYSTEM = "You review Python code for a small team and answer in short sentences. " * 12
NO_EOS = {"0": -100, "2": -100}  # the tiny model's EOS ids: every request generates exactly max_tokens

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def gateway(models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own (exact counts), with a tenant key and the admin key."""
    env = {"MLX_GATEWAY_API_KEYS": "key-alpha:alpha", "MLX_GATEWAY_ADMIN_KEY": "admin-secret"}
    args = ["--model", "tiny", "--cache-dir", str(tmp_path_factory.mktemp("metrics-caches"))]
    with run_server(args, models_dir=models_dir, log_dir=log_dir, env=env) as server:
        yield server


def scrape(server: Server) -> Samples:
    r = httpx.get(f"{server.url}/metrics", headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def chat(server: Server, body: dict[str, object]) -> httpx.Response:
    full = {"model": "tiny", "max_tokens": 4, "temperature": 0, "logit_bias": NO_EOS, **body}
    return httpx.post(f"{server.v1}/chat/completions", json=full, headers=ALPHA, timeout=60)


def test_metrics_move_with_requests(gateway: Server) -> None:
    before = scrape(gateway)
    caches = []
    for name, source in (
        ("ops-sys", {"messages": [{"role": "system", "content": SYSTEM}]}),
        ("ops-text", {"prompt": "zzz"}),
    ):
        r = httpx.post(
            f"{gateway.url}/admin/prefix-caches",
            json={"name": name, "model": "tiny", **source},
            headers=ALPHA,
            timeout=60,
        )
        assert r.status_code == 201, r.text
        caches.append(r.json())
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Is this fine?"}]
    hit = chat(gateway, {"messages": messages, "prefix_cache": "ops-sys"})
    assert hit.status_code == 200 and "hit=true" in hit.headers["x-prefix-cache"], hit.text
    miss = chat(
        gateway,
        {
            "messages": [{"role": "user", "content": "x"}],
            "prefix_cache": {"name": "ops-text", "on_mismatch": "recompute"},
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert miss.status_code == 200 and "hit=false" in miss.headers["x-prefix-cache"], miss.text
    refused = httpx.post(f"{gateway.v1}/chat/completions", json={"model": "tiny", "messages": messages}, timeout=30)
    assert refused.status_code == 401
    assert httpx.get(f"{gateway.url}/no/such/path", timeout=30).status_code == 404
    after = scrape(gateway)
    usages = [hit.json()["usage"], json.loads(sse_events(miss.text)[-2])["usage"]]

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    chat_route = {"route": "/v1/chat/completions", "method": "POST"}
    assert delta("mlx_gateway_http_requests_total", **chat_route, status="200") == 2
    assert delta("mlx_gateway_http_requests_total", **chat_route, status="401") == 1
    assert delta("mlx_gateway_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert delta("mlx_gateway_http_requests_total", route="/admin/prefix-caches", method="POST", status="201") == 2
    assert delta("mlx_gateway_http_request_duration_seconds_count", **chat_route) == 3
    # The previous scrape is counted once it has ended: by the time of this one.
    assert delta("mlx_gateway_http_requests_total", route="/metrics", method="GET", status="200") == 1

    alpha = {"model": "tiny", "tenant": "alpha"}
    assert delta("mlx_gateway_time_to_first_token_seconds_count", **alpha) == 2
    assert 0 < delta("mlx_gateway_time_to_first_token_seconds_sum", **alpha) < 60
    assert delta("mlx_gateway_inter_token_latency_seconds_count", **alpha) == 2 * 3  # 4 tokens: 3 gaps each
    assert delta("mlx_gateway_prompt_tokens_total", **alpha) == sum(u["prompt_tokens"] for u in usages)
    assert delta("mlx_gateway_completion_tokens_total", **alpha) == 8 == sum(u["completion_tokens"] for u in usages)
    cached = usages[0]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 100 and usages[1]["prompt_tokens_details"]["cached_tokens"] == 0
    assert delta("mlx_gateway_cached_tokens_total", **alpha) == cached
    assert value(after, "mlx_gateway_time_to_first_token_seconds_count", model="tiny", tenant="default") == 0

    assert delta("mlx_gateway_prefix_cache_hits_total", **alpha) == 1
    assert delta("mlx_gateway_prefix_cache_misses_total", **alpha) == 1
    assert delta("mlx_gateway_prefix_cache_loads_total", **alpha) == 0  # built caches stay resident
    assert delta("mlx_gateway_prefix_cache_recomputes_total", **alpha) == 0
    assert value(after, "mlx_gateway_prefix_caches", **alpha) == 2
    assert value(after, "mlx_gateway_prefix_caches_resident", **alpha) == 2
    assert value(after, "mlx_gateway_prefix_cache_bytes", **alpha, where="disk") == sum(c["size_bytes"] for c in caches)
    assert value(after, "mlx_gateway_prefix_cache_bytes", **alpha, where="memory") > 0

    assert delta("mlx_gateway_engine_requests_total", model="tiny", outcome="completed") == 2
    assert delta("mlx_gateway_decode_step_seconds_count", model="tiny", path="batch") >= 6
    assert delta("mlx_gateway_batch_steps_total", model="tiny") >= 6
    assert delta("mlx_gateway_batch_sequences_total", model="tiny") >= 8  # one token per sequence per step
    for idle in ("mlx_gateway_queue_depth", "mlx_gateway_admitted_requests", "mlx_gateway_running_requests"):
        assert value(after, idle) == 0, idle
    assert value(after, "mlx_gateway_engine_up") == 1 and value(after, "mlx_gateway_model_ready", model="tiny") == 1
    assert value(after, "mlx_gateway_memory_bytes", kind="active") > 0


def test_health_reports_the_same_counters(gateway: Server) -> None:
    chat(gateway, {"messages": [{"role": "user", "content": "one more"}]}).raise_for_status()
    metrics = scrape(gateway)
    health = httpx.get(f"{gateway.url}/health", timeout=30).json()
    assert health["requests"] == {
        outcome: total(
            {k: v for k, v in metrics.items() if ("outcome", outcome) in k[1]}, "mlx_gateway_engine_requests_total"
        )
        for outcome in ("completed", "cancelled", "failed")
    }
    assert health["requests"]["completed"] >= 1
    caches = health["prefix_caches"]
    for key, metric in (
        ("hits", "mlx_gateway_prefix_cache_hits_total"),
        ("misses", "mlx_gateway_prefix_cache_misses_total"),
        ("loads", "mlx_gateway_prefix_cache_loads_total"),
        ("recomputes", "mlx_gateway_prefix_cache_recomputes_total"),
        ("count", "mlx_gateway_prefix_caches"),
        ("resident", "mlx_gateway_prefix_caches_resident"),
    ):
        assert caches[key] == total(metrics, metric), key
    assert caches["bytes_on_disk"] == value(
        metrics, "mlx_gateway_prefix_cache_bytes", model="tiny", tenant="alpha", where="disk"
    )
    assert health["batch_steps"]["steps"] == total(metrics, "mlx_gateway_batch_steps_total") > 0
    assert health["batch_steps"]["sequences"] == total(metrics, "mlx_gateway_batch_sequences_total")


def test_metrics_document_and_index(gateway: Server) -> None:
    doc = httpx.get(f"{gateway.url}/docs/openapi.json", timeout=30).json()
    op = doc["paths"]["/metrics"]["get"]
    assert set(op["responses"]) == {"200", "401", "403"}
    assert "text/plain; version=0.0.4" in op["responses"]["200"]["content"]
    assert "GET /metrics" in httpx.get(gateway.url, timeout=30).json()["endpoints"]
