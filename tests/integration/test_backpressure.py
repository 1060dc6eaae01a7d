"""Backpressure on the real server: past its limits a request gets 429 with Retry-After, in OpenAI's
error shape; places are given back when streams end or clients leave."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_wire import assert_error
from tests.servers import Server, run_server

LONG = {"model": "tiny", "prompt": "x", "max_tokens": 3000, "temperature": 0, "logit_bias": {"0": -100, "2": -100}}
SHORT = {"model": "tiny", "prompt": "x", "max_tokens": 2}


@pytest.fixture()
def tight(models_dir: Path, log_dir: Path) -> Iterator[Server]:
    env = {"MLX_GATEWAY_MAX_RUNNING": "1", "MLX_GATEWAY_MAX_QUEUED": "1", "MLX_GATEWAY_QUEUE_TIMEOUT_SECONDS": "0.5"}
    with run_server(["--model", "tiny"], models_dir=models_dir, log_dir=log_dir, env=env) as s:
        yield s


def test_over_capacity_is_429_with_retry_after(tight: Server) -> None:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        running = pool.submit(httpx.post, f"{tight.v1}/completions", json=LONG, timeout=120)
        time.sleep(0.3)  # it holds the one running place
        queued = pool.submit(httpx.post, f"{tight.v1}/completions", json=SHORT, timeout=120)
        time.sleep(0.1)  # it holds the one queue place
        over = httpx.post(f"{tight.v1}/completions", json=SHORT, timeout=30)
        assert_error(over, 429, "rate_limit_error", "rate_limit_exceeded")
        assert int(over.headers["retry-after"]) >= 1 and "x-should-retry" not in over.headers
        waited = queued.result()  # the queue timeout (0.5 s) passes long before the long request ends
        assert_error(waited, 429, "rate_limit_error", "rate_limit_exceeded")
        assert "Waited" in waited.json()["error"]["message"]
        assert running.result().status_code == 200
    assert httpx.post(f"{tight.v1}/completions", json=SHORT, timeout=30).status_code == 200


def test_places_come_back_after_streams_and_disconnects(tight: Server) -> None:
    for _ in range(3):  # a finished stream gives its place back
        r = httpx.post(f"{tight.v1}/completions", json={**SHORT, "stream": True}, timeout=30)
        assert r.status_code == 200 and r.text.rstrip().endswith("[DONE]")
    with httpx.stream("POST", f"{tight.v1}/completions", json={**LONG, "stream": True}, timeout=30) as r:
        next(r.iter_lines())  # then hang up mid-stream
    deadline = time.monotonic() + 10
    while (r2 := httpx.post(f"{tight.v1}/completions", json=SHORT, timeout=30)).status_code != 200:
        assert time.monotonic() < deadline, r2.text
        time.sleep(0.1)
