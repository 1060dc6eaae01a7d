"""Clients that go away: their work stops. A non-streamed request, a seed alias or a prefix-cache build
whose client gives up is cancelled (below). A client that disconnects mid-stream: its sequence leaves the
engine within one decode step of the server seeing it go, in every isolation mode, measured by the engine's own counter
(``mlx_gateway_cancel_lag_decode_steps`` on ``/metrics``: the model's decode steps between the cancel
flag being set and the request leaving). Another stream keeps the engine stepping meanwhile, so a
sequence that stayed would be seen to."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import Server, run_server

NO_EOS = {"0": -100, "2": -100}


def stream_body(max_tokens: int) -> dict:
    return {
        "model": "tiny",
        "prompt": "x",
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "logit_bias": NO_EOS,
    }


def lag_buckets(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    pattern = r'mlx_gateway_cancel_lag_decode_steps_bucket\{le="([^"]+)",model="tiny"\} ([0-9.e+]+)'
    return {le: float(n) for le, n in re.findall(pattern, text)}


@pytest.fixture(params=["strict", "balanced", "performance"])
def mode_server(request: pytest.FixtureRequest, models_dir: Path, log_dir: Path) -> Iterator[Server]:
    with run_server(
        ["--model", "tiny", "--isolation-mode", request.param], models_dir=models_dir, log_dir=log_dir
    ) as server:
        yield server


def test_a_disconnected_stream_leaves_within_one_decode_step(mode_server: Server) -> None:
    server = mode_server
    busy_done = threading.Event()

    def busy() -> None:  # a neighbour that streams throughout
        with httpx.stream("POST", f"{server.v1}/completions", json=stream_body(400), timeout=120) as r:
            for _ in r.iter_lines():
                if busy_done.is_set():
                    break

    neighbour = threading.Thread(target=busy)
    neighbour.start()
    try:
        for done in range(3):
            with httpx.stream("POST", f"{server.v1}/completions", json=stream_body(8000), timeout=30) as r:
                seen = 0
                for line in r.iter_lines():
                    seen += line.startswith("data: ")
                    if seen == 5:
                        break  # a few tokens, then hang up
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                buckets = lag_buckets(server)
                if buckets and buckets["+Inf"] >= done + 1:
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"no cancellation counted: {lag_buckets(server)}")
        buckets = lag_buckets(server)  # before the neighbour hangs up too
    finally:
        busy_done.set()
        neighbour.join()
    print(f"cancel lags (cumulative buckets of decode steps): {buckets}")
    assert buckets["+Inf"] == 3, buckets
    assert buckets["1"] == 3, f"a cancelled sequence stayed more than one decode step: {buckets}"
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health["requests"]["cancelled"] >= 3


# ---- clients that give up on a non-streamed request ------------------------------------------------------
# Each request below would take the tiny model tens of seconds (thousands of tokens, or a prefix prefilled in
# small chunks); its client times out after a second. Its work must stop then, not when it would have ended.

LEAVE_AFTER = 1.0  # seconds the client waits for an answer before it hangs up
MAX_TOKENS = 8000  # the tiny model's context is 8192; at a few ms a token this is half a minute and more

LEAVERS_CONFIG = """
[[models]]
name = "tiny"
path = "tiny"
# Small prefill chunks: a long prefix cache takes a hundred engine turns to build, and a client can leave
# during them.
prefill_step_size = 32
"""


@pytest.fixture(scope="module")
def leavers_server(models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = tmp_path_factory.mktemp("leavers") / "gateway.toml"
    config.write_text(LEAVERS_CONFIG)
    cache_dir = tmp_path_factory.mktemp("leavers-caches")
    args = ["--config", str(config), "--cache-dir", str(cache_dir)]
    with run_server(args, models_dir=models_dir, log_dir=log_dir) as server:
        yield server


def metric(server: Server, name: str, labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def engine_counts(server: Server) -> dict[str, float]:
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    return {
        **health["requests"],
        "active": health["active_requests"],
        "steps": metric(server, "mlx_gateway_batch_steps_total", 'model="tiny"'),
        "lag<=1": metric(server, "mlx_gateway_cancel_lag_decode_steps_bucket", 'le="1",model="tiny"'),
    }


def leave(server: Server, path: str, body: dict, request_id: str) -> None:
    """POST ``body`` and hang up after LEAVE_AFTER seconds without an answer."""
    timeout = httpx.Timeout(30, read=LEAVE_AFTER)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{path}", json=body, headers={"x-request-id": request_id}, timeout=timeout)


def assert_left_quietly(server: Server, request_id: str) -> None:
    """One INFO line says the client left; nothing logs an error or a traceback for it."""
    lines = [line for line in server.log_text().splitlines() if request_id in line]
    assert [line for line in lines if "client left" in line], lines
    assert not [line for line in lines if " ERROR " in line or " WARNING " in line], lines
    assert "Traceback" not in server.log_text()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "x", "logit_bias": NO_EOS}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": NO_EOS}),
        ("/v1/generate", {"prompt": "x"}),  # the seed alias (no logit_bias: greedy "x" runs on for thousands)
    ],
    ids=["completions", "chat", "seed-generate"],
)
def test_a_client_that_gives_up_on_a_non_streamed_request_cancels_it(
    leavers_server: Server, path: str, body: dict
) -> None:
    server = leavers_server
    before = engine_counts(server)
    request_id = "leaver" + path.replace("/", "-")
    leave(server, path, {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0, **body}, request_id)
    left = time.monotonic()
    while time.monotonic() - left < 5:
        now = engine_counts(server)
        if now["active"] == 0 and now["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the request went on decoding after its client left: {before} -> {engine_counts(server)}")
    assert now["cancelled"] == before["cancelled"] + 1 and now["completed"] == before["completed"], (before, now)
    assert now["lag<=1"] == before["lag<=1"] + 1, f"it stayed more than one decode step: {before} -> {now}"
    steps = now["steps"] - before["steps"]
    assert 0 < steps < MAX_TOKENS / 4, f"{steps} decode steps for a client that left after {LEAVE_AFTER}s"
    assert metric(server, "mlx_gateway_http_requests_total", f'method="POST",route="{path}",status="499"') == 1
    assert_left_quietly(server, request_id)


def test_a_client_that_gives_up_on_a_cache_build_cancels_it(leavers_server: Server) -> None:
    server = leavers_server
    body = {"name": "left-behind", "model": "tiny", "prompt": [5] * 8100}
    leave(server, "/admin/prefix-caches", body, "leaver-build")
    left = time.monotonic()
    while time.monotonic() - left < 5:
        if "prefix cache build left-behind cancelled" in server.log_text():
            break
        time.sleep(0.05)
    else:
        pytest.fail("the build went on after its client left")
    progress = re.findall(r"prefix cache left-behind: (\d+)/8100 tokens", server.log_text())
    assert progress and int(progress[-1]) < 8100, progress[-1:]
    # Nothing was stored: the name is free, and a new build takes it.
    assert httpx.get(f"{server.url}/admin/prefix-caches/left-behind", timeout=30).status_code == 404
    assert_left_quietly(server, "leaver-build")
    again = httpx.post(
        f"{server.url}/admin/prefix-caches", json={**body, "prompt": [5] * 100, "replace": False}, timeout=30
    )
    assert again.status_code == 201 and again.json()["num_tokens"] == 100, again.text


def test_a_client_that_gives_up_on_a_seed_cache_build_cancels_it(leavers_server: Server) -> None:
    server = leavers_server
    body = {"cache_name": "seed-left-behind", "model": "tiny", "prefix_prompt": "x " * 8000}
    leave(server, "/v1/prefix-cache/create", body, "leaver-seed-build")
    left = time.monotonic()
    while time.monotonic() - left < 5:
        if "prefix cache build seed-left-behind cancelled" in server.log_text():
            break
        time.sleep(0.05)
    else:
        pytest.fail("the build went on after its client left")
    assert httpx.get(f"{server.url}/admin/prefix-caches/seed-left-behind", timeout=30).status_code == 404
    assert_left_quietly(server, "leaver-seed-build")
