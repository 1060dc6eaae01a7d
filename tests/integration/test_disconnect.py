"""A client that disconnects mid-stream: its sequence leaves the engine within one decode step of the
server seeing it go, in every isolation mode, measured by the engine's own counter
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
