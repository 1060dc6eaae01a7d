"""Several API servers (``--api-servers 2``): front-end processes on one port feeding one engine process
(gateway/processes/api_servers.py, gateway/processes/front_process.py, gateway/tenancy/coordinator.py).

What a user relies on: requests are answered by every front end and stream as with one; the server's and the
tenants' limits are counted once, whichever front end a request reaches; ``/metrics`` totals every front end's
requests, whichever answers the scrape; SIGTERM and SIGINT drain and exit 0; the engine or a front end dying
makes the server exit non-zero; and no process is left behind after any of these (nor after the supervising
process itself is killed).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_engine_process import kill_9_mid_stream
from tests.integration.test_wire import assert_error, sse_events
from tests.servers import Server, run_server

TWO = {"MLX_GATEWAY_API_SERVERS": "2", "MLX_GATEWAY_ENGINE_LAYOUT": "process"}
ADMIN = {"authorization": "Bearer admin-secret"}
ALPHA = {"authorization": "Bearer key-alpha"}
NO_EOS = {"0": -100, "2": -100}  # the tiny model's EOS ids: every request generates exactly max_tokens
LONG = {"model": "tiny", "prompt": "x", "max_tokens": 3000, "temperature": 0, "logit_bias": NO_EOS}
SHORT = {"model": "tiny", "prompt": "x", "max_tokens": 2}
RPM = 3
CONFIG = f"""
admin_key = "admin-secret"
api_keys = {{ "key-alpha" = "alpha", "key-beta" = "beta" }}
[[models]]
name = "tiny"
path = "tiny"
[tenants.alpha]
requests_per_minute = {RPM}
"""


# ---- which process is which -------------------------------------------------------------------------


def answered_by(server: Server, request_id: str, timeout: float = 5.0) -> int:
    """The API server (1..N) that logged request ``request_id`` (each front end's lines name it and its pid)."""
    pattern = re.compile(rf"\(api server (\d+), pid \d+\) \[{re.escape(request_id)}\]")
    deadline = time.monotonic() + timeout
    while True:
        found = pattern.search(server.log_text())
        if found:
            return int(found.group(1))
        assert time.monotonic() < deadline, f"no API server logged {request_id}"
        time.sleep(0.05)


def wait_every_front_ready(server: Server, fronts: int = 2, timeout: float = 60.0) -> None:
    """Until each front end answered /health 200 (each loads its tokenizer once the engine's model is ready)."""
    ready: set[int] = set()
    deadline = time.monotonic() + timeout
    for k in range(10_000):
        rid = f"ready-{k}"
        r = httpx.get(f"{server.url}/health", headers={"x-request-id": rid}, timeout=10)
        if r.status_code == 200:
            ready.add(answered_by(server, rid))
        if len(ready) == fronts:
            return
        assert time.monotonic() < deadline, f"API servers ready: {sorted(ready)}"
        time.sleep(0.05)


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # after the command's name, which may hold spaces


def family(pid: int) -> set[int]:
    """``pid`` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(children.get(p, []))
    return out


def living(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie has ended: only its parent's wait is missing)."""
    return {p for p in pids if (fields := _stat(p)) is not None and fields[0] != "Z"}


def assert_all_gone(pids: set[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while living(pids):
        assert time.monotonic() < deadline, f"processes left behind: {sorted(living(pids))}"
        time.sleep(0.1)


def _pids(server: Server) -> tuple[int, set[int]]:
    """The engine process's pid, and every process of the server (supervisor, front ends, engine)."""
    engine = httpx.get(f"{server.url}/health", timeout=10).json()["engine_pid"]
    everyone = family(server.process.pid)
    assert engine in everyone and len(everyone) == 4, everyone  # supervisor, 2 front ends, engine
    return engine, everyone


def scrape(
    server: Server, headers: dict[str, str] | None = None
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = httpx.get(f"{server.url}/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family_ in text_string_to_metric_families(r.text)
        for s in family_.samples
    }


# ---- one shared server: spreading, streams, tenants' rates, metrics ---------------------------------


@pytest.fixture(scope="module")
def two(models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = tmp_path_factory.mktemp("api-servers") / "gateway.toml"
    config.write_text(CONFIG)
    args = ["--config", str(config), "--cache-dir", str(tmp_path_factory.mktemp("api-servers-caches"))]
    with run_server(args, models_dir=models_dir, log_dir=log_dir, env=TWO) as server:
        wait_every_front_ready(server)
        yield server


def _stream(server: Server, rid: str, max_tokens: int = 8) -> list[str]:
    body = {
        "model": "tiny",
        "prompt": "hello",
        "max_tokens": max_tokens,
        "logit_bias": NO_EOS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"authorization": "Bearer key-beta", "x-request-id": rid}
    r = httpx.post(f"{server.v1}/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return sse_events(r.text)


def test_requests_are_answered_by_both_api_servers_and_stream(two: Server) -> None:
    seen: dict[int, int] = {}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for round_ in range(5):  # concurrent streams on fresh connections: the kernel hands them to both
            rids = [f"spread-{round_}-{i}" for i in range(8)]
            for events in pool.map(lambda rid: _stream(two, rid), rids):
                assert events[-1] == "[DONE]"
                chunks = [json.loads(e) for e in events[:-1]]
                assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
                assert chunks[-1]["usage"]["completion_tokens"] == 8
            for rid in rids:
                front = answered_by(two, rid)
                seen[front] = seen.get(front, 0) + 1
            if len(seen) == 2:
                break
    assert set(seen) == {1, 2}, seen
    # Neither front end loads mlx; the engine process does.
    _, everyone = _pids(two)
    for pid in everyone - {two.process.pid}:
        maps = Path(f"/proc/{pid}/maps").read_text()
        is_engine = pid == httpx.get(f"{two.url}/health").json()["engine_pid"]
        assert ("libmlx" in maps or "/mlx/" in maps) == is_engine, pid


def test_a_tenants_requests_per_minute_are_counted_once(two: Server) -> None:
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}

    def send(i: int) -> httpx.Response:
        headers = {**ALPHA, "x-request-id": f"rpm-{i}"}
        return httpx.post(f"{two.v1}/completions", json=body, headers=headers, timeout=60)

    # Sent together on fresh connections, so that both front ends take some (one after another, the front end
    # that waited longest tends to take them all): the tenant's window is one, whoever answers.
    with concurrent.futures.ThreadPoolExecutor(2 * RPM) as senders:
        answers = list(senders.map(send, range(2 * RPM)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * RPM + [429] * RPM, codes
    assert {answered_by(two, f"rpm-{i}") for i in range(2 * RPM)} == {1, 2}
    refused = [r for r in answers if r.status_code == 429]
    err = assert_error(refused[-1], 429, "requests", "rate_limit_exceeded")
    assert "requests per minute" in err["message"]
    # Sent together, each answer's header reads the window as its neighbours left it: never above what it was.
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in answers if r.status_code == 200]
    assert all(0 <= left < RPM for left in remaining), remaining
    assert all(int(r.headers["x-ratelimit-remaining-requests"]) == 0 for r in refused)
    tenants = {t["id"]: t for t in httpx.get(f"{two.url}/admin/tenants", headers=ADMIN).json()["data"]}
    assert tenants["alpha"]["use"]["requests_last_minute"] == RPM


def test_metrics_total_every_api_server_whichever_answers(two: Server) -> None:
    route = frozenset({("route", "/v1/chat/completions"), ("method", "POST"), ("status", "200")})
    before = scrape(two, ADMIN).get(("mlx_gateway_http_requests_total", route), 0.0)
    n = 12
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logit_bias": NO_EOS}

    def send(i: int) -> None:
        headers = {"authorization": "Bearer key-beta", "x-request-id": f"count-{i}"}
        r = httpx.post(f"{two.v1}/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text

    with concurrent.futures.ThreadPoolExecutor(n) as senders:  # together: both front ends take some
        list(senders.map(send, range(n)))
    assert {answered_by(two, f"count-{i}") for i in range(n)} == {1, 2}
    scrapers: set[int] = set()
    for k in range(40):  # until both front ends answered a scrape, each with the same totals
        rid = f"scrape-{k}"
        samples = scrape(two, {**ADMIN, "x-request-id": rid})
        scrapers.add(answered_by(two, rid))
        assert samples[("mlx_gateway_http_requests_total", route)] == before + n
        duration = frozenset({("route", "/v1/chat/completions"), ("method", "POST")})
        assert samples[("mlx_gateway_http_request_duration_seconds_count", duration)] >= before + n
        beta = frozenset({("model", "tiny"), ("tenant", "beta")})
        assert samples[("mlx_gateway_completion_tokens_total", beta)] >= 3 * n
        assert samples[("mlx_gateway_engine_up", frozenset())] == 1
        assert samples[("mlx_gateway_admitted_requests", frozenset())] == 0  # the coordinator's count
        if scrapers == {1, 2}:
            break
    assert scrapers == {1, 2}


def test_a_cache_built_or_deleted_through_one_api_server_is_seen_at_once_by_both(two: Server) -> None:
    beta = {"authorization": "Bearer key-beta"}
    for round_ in range(3):
        name = f"shared-{round_}"
        body = {"model": "tiny", "name": name, "prompt": "You answer tersely. " * 20}
        built = httpx.post(f"{two.url}/admin/prefix-caches", json=body, headers=beta, timeout=60)
        assert built.status_code == 201, built.text
        use = {"model": "tiny", "prompt": " Go.", "max_tokens": 2, "prefix_cache": name}

        def hit(rid: str, use: dict[str, object] = use) -> int:
            r = httpx.post(f"{two.v1}/completions", json=use, headers={**beta, "x-request-id": rid}, timeout=60)
            assert r.status_code == 200 and "hit=true" in r.headers["x-prefix-cache"], r.text
            return answered_by(two, rid)

        def miss(rid: str, use: dict[str, object] = use) -> int:
            r = httpx.post(f"{two.v1}/completions", json=use, headers={**beta, "x-request-id": rid}, timeout=60)
            assert_error(r, 404, "invalid_request_error", "prefix_cache_not_found", "prefix_cache")
            return answered_by(two, rid)

        # Sent together on fresh connections, so that both front ends plan with it (one after another, the front
        # end that waited longest tends to take them all).
        with concurrent.futures.ThreadPoolExecutor(6) as senders:
            fronts = set(senders.map(hit, [f"use-{name}-{i}" for i in range(6)]))
            gone = httpx.delete(f"{two.url}/admin/prefix-caches/{name}", headers=beta, timeout=60)
            assert gone.status_code == 200, gone.text
            fronts |= set(senders.map(miss, [f"gone-{name}-{i}" for i in range(6)]))
        if fronts == {1, 2}:
            break
    assert fronts == {1, 2}


# ---- the server's limits: counted once -----------------------------------------------------------


def test_max_running_and_max_queued_are_counted_once(models_dir: Path, log_dir: Path) -> None:
    env = {
        **TWO,
        "MLX_GATEWAY_MAX_RUNNING": "1",
        "MLX_GATEWAY_MAX_QUEUED": "1",
        "MLX_GATEWAY_QUEUE_TIMEOUT_SECONDS": "60",
    }
    with run_server(["--model", "tiny"], models_dir=models_dir, log_dir=log_dir, env=env) as server:
        wait_every_front_ready(server)
        with (
            concurrent.futures.ThreadPoolExecutor(1) as pool,
            httpx.stream("POST", f"{server.v1}/completions", json={**LONG, "stream": True}, timeout=60) as running,
        ):
            lines = running.iter_lines()
            next(line for line in lines if '"text"' in line)  # it holds the one running place
            queued = pool.submit(httpx.post, f"{server.v1}/completions", json=SHORT, timeout=120)
            deadline = time.monotonic() + 10
            while scrape(server)[("mlx_gateway_queue_depth", frozenset())] != 1:  # it holds the one queue place
                assert time.monotonic() < deadline
                time.sleep(0.05)

            def over(rid: str) -> int:
                r = httpx.post(f"{server.v1}/completions", json=SHORT, headers={"x-request-id": rid}, timeout=30)
                err = assert_error(r, 429, "rate_limit_error", "rate_limit_exceeded")
                assert "at capacity (1 running, 1 queued)" in err["message"]
                return answered_by(server, rid)

            # Fresh connections sent together, so that the kernel hands them to both front ends (one after another,
            # the front end that waited longest tends to take them all): every one is over the server's capacity.
            fronts: set[int] = set()
            with concurrent.futures.ThreadPoolExecutor(8) as senders:
                for round_ in range(5):
                    fronts |= set(senders.map(over, [f"over-{round_}-{i}" for i in range(8)]))
                    if fronts == {1, 2}:
                        break
            assert fronts == {1, 2}
            samples = scrape(server)
            assert samples[("mlx_gateway_admitted_requests", frozenset())] == 1
        # The long stream's client left: its place goes to the queued request.
        assert queued.result().status_code == 200


# ---- lifetime: draining, deaths, no process left ------------------------------------------------


@pytest.fixture
def fresh(models_dir: Path, log_dir: Path) -> Iterator[Server]:
    """A server of its own (this test ends it), both front ends ready."""
    with run_server(["--model", "tiny"], models_dir=models_dir, log_dir=log_dir, env=TWO) as server:
        wait_every_front_ready(server)
        yield server


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_every_api_server_and_exits_0_leaving_no_process(sig: signal.Signals, fresh: Server) -> None:
    _, everyone = _pids(fresh)
    body = {**LONG, "max_tokens": 600, "stream": True}  # a few seconds: it runs on while the server drains
    with httpx.stream("POST", f"{fresh.v1}/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(line for line in lines if '"text"' in line)
        fresh.process.send_signal(sig)
        time.sleep(0.5)
        refused = httpx.post(f"{fresh.v1}/completions", json=SHORT, timeout=10)  # whichever answers drains
        assert_error(refused, 503, "server_error", "service_unavailable")
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
    assert fresh.process.wait(timeout=60) == 0, fresh.log_text()[-3000:]
    assert_all_gone(everyone)
    assert "every API server drains" in fresh.log_text()


@pytest.mark.timeout(180)
def test_kill_9_of_the_engine_ends_streams_and_the_server_with_no_process_left(fresh: Server) -> None:
    engine, everyone = _pids(fresh)
    kill_9_mid_stream(fresh, engine)
    assert fresh.process.wait(timeout=60) != 0, "the server must exit non-zero for its supervisor"
    assert_all_gone(everyone)
    assert f"the engine process {engine} ended" in fresh.log_text()


def test_kill_9_of_an_api_server_stops_the_server_with_no_process_left(fresh: Server) -> None:
    engine, everyone = _pids(fresh)
    front = min(everyone - {fresh.process.pid, engine})
    os.kill(front, signal.SIGKILL)
    assert fresh.process.wait(timeout=60) != 0
    assert_all_gone(everyone)
    assert f"(pid {front}) ended with status -9" in fresh.log_text()


def test_kill_9_of_the_supervising_process_leaves_no_process(fresh: Server) -> None:
    _, everyone = _pids(fresh)
    fresh.process.kill()
    fresh.process.wait(timeout=10)
    assert_all_gone(everyone)
