"""The process layout: the engine in its own process, HTTP in the server's (adapters/remote.py,
adapters/mlx_lm/host.py).

What a user relies on: the HTTP process never loads mlx; a client that leaves cancels its request in the engine
process; and if the engine process dies (kill -9), every open stream ends with one error event within 2 s,
``/health`` answers 503, the server exits non-zero for its supervisor, and the caches on disk are intact.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import Server, run_server

PROCESS = {"MLX_GATEWAY_ENGINE_LAYOUT": "process"}


@pytest.fixture
def process_server(models_dir: Path, log_dir: Path, tmp_path: Path) -> Iterator[Server]:
    args = ["--model", "tiny", "--cache-dir", str(tmp_path / "caches")]
    with run_server(args, models_dir=models_dir, log_dir=log_dir, env=PROCESS) as srv:
        yield srv


def _engine_pid(server: Server) -> int:
    pid = httpx.get(f"{server.url}/health", timeout=10).json()["engine_pid"]
    assert isinstance(pid, int) and pid != server.process.pid
    return pid


def _mapped_files(pid: int) -> set[str]:
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if len(line.split()) >= 6}


def test_the_http_process_never_loads_mlx_and_the_engine_process_does(process_server: Server) -> None:
    client = openai.OpenAI(base_url=process_server.v1, api_key="x", max_retries=0)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert out.usage is not None and out.usage.completion_tokens == 4
    front = _mapped_files(process_server.process.pid)
    engine = _mapped_files(_engine_pid(process_server))
    assert [f for f in engine if "/mlx/" in f], "the engine process maps mlx's libraries"
    assert not [f for f in front if "/mlx/" in f or "libmlx" in f], "the HTTP process must not load mlx"


def test_a_client_that_leaves_is_cancelled_in_the_engine_process(process_server: Server) -> None:
    def cancelled() -> float:
        for line in httpx.get(f"{process_server.url}/metrics", timeout=10).text.splitlines():
            if line.startswith('mlx_gateway_engine_requests_total{model="tiny",outcome="cancelled"}'):
                return float(line.split()[-1])
        return 0.0

    before = cancelled()
    body = {"model": "tiny", "prompt": "count", "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", f"{process_server.v1}/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                break  # one token, then the client goes away
    deadline = time.monotonic() + 10
    while cancelled() < before + 1:
        assert time.monotonic() < deadline, "the engine never saw the request cancelled"
        time.sleep(0.1)
    health = httpx.get(f"{process_server.url}/health", timeout=10).json()
    assert health["active_requests"] == 0


def kill_9_mid_stream(server: Server, engine: int) -> None:
    """Kill the engine process (``engine``) with SIGKILL while a stream runs: the stream ends with one error event
    within 2 s."""
    body = {"model": "tiny", "prompt": "count", "max_tokens": 4000, "stream": True}
    events: list[str] = []
    with httpx.stream("POST", f"{server.v1}/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[6:])
                if '"text"' in line:
                    break
        os.kill(engine, signal.SIGKILL)
        killed = time.monotonic()
        events += [line[6:] for line in lines if line.startswith("data: ")]
        ended = time.monotonic() - killed
    assert ended < 2.0, f"the stream took {ended:.2f}s to end after the engine died"
    errors = [e for e in events if e.startswith("{") and "error" in json.loads(e)]
    assert len(errors) == 1 and events[-1] == errors[0], events[-3:]
    assert "engine" in json.loads(errors[0])["error"]["message"]


@pytest.mark.timeout(180)
def test_kill_9_of_the_engine_process(models_dir: Path, log_dir: Path, tmp_path: Path) -> None:
    caches = tmp_path / "caches"
    args = ["--model", "tiny", "--cache-dir", str(caches)]
    with run_server(args, models_dir=models_dir, log_dir=log_dir, env=PROCESS) as server:
        built = httpx.post(
            f"{server.url}/admin/prefix-caches",
            json={"model": "tiny", "name": "kept", "prompt": "A system prompt that must survive. " * 20},
            timeout=60,
        )
        assert built.status_code == 201, built.text
        kill_9_mid_stream(server, _engine_pid(server))
        # The server checks its engine once a second and then exits: /health says unhealthy until it is gone.
        try:
            health = httpx.get(f"{server.url}/health", timeout=5)
        except httpx.ConnectError:
            pass  # already closing: the next line still requires it to exit non-zero
        else:
            assert health.status_code == 503 and health.json()["status"] == "unhealthy", health.text
        assert server.process.wait(timeout=30) != 0, "the server must exit non-zero for its supervisor"
        assert "engine process" in server.log_text()
    # A new server on the same folder serves the cache, whose file matches its manifest.
    with run_server(args, models_dir=models_dir, log_dir=log_dir, env=PROCESS) as again:
        got = httpx.get(f"{again.url}/admin/prefix-caches/kept", params={"verify": "true"}, timeout=60)
        assert got.status_code == 200, got.text
        assert got.json()["integrity"]["ok"] is True
