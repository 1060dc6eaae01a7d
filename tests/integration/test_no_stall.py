"""No valid request stalls the server (issue 19): ``n`` above ``max_running`` completes in parts, a
request sent after it is answered as usual, the engine does no steps while it has nothing to do, and a
request whose KV could never fit the budget is a 400 naming it while one that fits waits its turn."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import Server, run_server


@pytest.fixture(scope="module")
def small_batch(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny model with a batch of 8 (as n = 40 against the default 32, in fewer steps)."""
    log_dir = tmp_path_factory.mktemp("no-stall")
    with run_server(["--model", "tiny", "--max-running", "8"], models_dir=models_dir, log_dir=log_dir) as server:
        yield server


def _steps(server: Server) -> int:
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    return int(health["batch_steps"]["steps"])


@pytest.mark.parametrize("n", [40, 128])
def test_n_above_max_running_completes_and_the_next_request_is_answered(small_batch: Server, n: int) -> None:
    started = time.monotonic()
    r = httpx.post(
        f"{small_batch.v1}/completions",
        json={"model": "tiny", "prompt": "Hello", "n": n, "max_tokens": 2, "temperature": 0.7},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(c["index"] for c in body["choices"]) == list(range(n))
    assert body["usage"]["completion_tokens"] <= 2 * n
    assert time.monotonic() - started < 30
    after = httpx.post(
        f"{small_batch.v1}/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        timeout=30,
    )
    assert after.status_code == 200, after.text
    # Idle: no request in the engine and no steps taken (the engine once spun ~180,000 empty steps a second).
    deadline = time.monotonic() + 10
    while httpx.get(f"{small_batch.url}/health", timeout=10).json()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    before = _steps(small_batch)
    time.sleep(2)
    assert _steps(small_batch) == before


def test_a_request_that_could_never_fit_the_kv_budget_is_a_400(models_dir: Path, log_dir: Path) -> None:
    """The tiny model takes 1 KiB of KV a token, in steps of 256 positions: a 600 KiB budget fits one
    sequence of up to 512 positions, not two, and not one of 1,000."""
    with run_server(
        ["--model", "tiny", "--max-running-kv-bytes", "600KiB"], models_dir=models_dir, log_dir=log_dir
    ) as server:
        too_long = httpx.post(
            f"{server.v1}/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 1000}, timeout=30
        )
        assert too_long.status_code == 400, too_long.text
        error = too_long.json()["error"]
        assert error["param"] == "max_tokens" and error["code"] == "kv_budget_exceeded"
        assert "max_running_kv_bytes" in error["message"]
        # n = 4 of 300 tokens each fits only one at a time: the choices take turns, and all complete.
        fits = httpx.post(
            f"{server.v1}/completions",
            json={"model": "tiny", "prompt": "Hello", "max_tokens": 300, "n": 4, "logit_bias": {"0": -100, "2": -100}},
            timeout=60,
        )
        assert fits.status_code == 200, fits.text
        assert [c["finish_reason"] for c in fits.json()["choices"]] == ["length"] * 4
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        assert health["batch_steps"]["steps"] >= 4 * 300  # one sequence a step: they took turns
