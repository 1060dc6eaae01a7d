"""Graceful shutdown on the real server: SIGTERM or Ctrl-C drains (running streams finish, new requests get
503 from a socket that stays open, ``/health`` says ``draining``), a second signal stops at once, and the
process exits 0 without a traceback or an abort from MLX's threads."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.servers import Server, run_server

BODY = {
    "model": "tiny",
    "prompt": "x",
    "max_tokens": 400,
    "temperature": 0,
    "stream": True,
    "logit_bias": {"0": -100, "2": -100},
}


def _clean_exit(server: Server) -> None:
    assert server.process.wait(30) == 0, server.log_text()
    log = server.log_text()
    assert "Traceback" not in log and "terminate called" not in log, log
    assert "Finished server process" in log


def test_sigterm_drains_running_streams(models_dir: Path, log_dir: Path) -> None:
    with run_server(["--model", "tiny"], models_dir=models_dir, log_dir=log_dir) as server:
        with httpx.stream("POST", f"{server.v1}/completions", json=BODY, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (health := httpx.get(f"{server.url}/health", timeout=5)).json()["status"] != "draining":
                assert time.monotonic() < deadline, health.text
                time.sleep(0.05)
            assert health.status_code == 503
            refused = httpx.post(f"{server.v1}/completions", json={**BODY, "stream": False}, timeout=5)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
            assert refused.json()["error"]["type"] == "server_error"
            data = [first[6:]] + [line[6:] for line in lines if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len([c for c in chunks if c["choices"][0]["finish_reason"] is None]) >= 300
        _clean_exit(server)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "ctrl-c-again", "term"])
def test_a_signal_on_an_idle_server_exits_cleanly(sig: signal.Signals, models_dir: Path, log_dir: Path) -> None:
    """Ctrl-C used to end in a KeyboardInterrupt traceback (exit 130) or an abort (exit 134)."""
    with run_server(["--model", "tiny"], models_dir=models_dir, log_dir=log_dir) as server:
        server.process.send_signal(sig)
        _clean_exit(server)


def test_a_second_signal_stops_at_once(models_dir: Path, log_dir: Path) -> None:
    with run_server(["--model", "tiny"], models_dir=models_dir, log_dir=log_dir) as server:
        with httpx.stream("POST", f"{server.v1}/completions", json={**BODY, "max_tokens": 5000}, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            started = time.monotonic()
            server.process.send_signal(signal.SIGINT)
            with contextlib.suppress(httpx.HTTPError):
                for _ in lines:
                    pass
        _clean_exit(server)
        assert time.monotonic() - started < 15
        assert "stopping now" in server.log_text()


def test_the_end_of_the_grace_period_fails_open_streams_through_the_engine(models_dir: Path, log_dir: Path) -> None:
    """As a second signal does: each open stream gets one error event and ends; uvicorn no longer cancels them
    (which logged a CancelledError traceback per stream)."""
    args = ["--model", "tiny", "--shutdown-timeout", "1"]
    with run_server(args, models_dir=models_dir, log_dir=log_dir) as server:
        with httpx.stream("POST", f"{server.v1}/completions", json={**BODY, "max_tokens": 5000}, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            server.process.send_signal(signal.SIGTERM)
            data = [first[6:]] + [line[6:] for line in lines if line.startswith("data: ")]
        assert data[-1] != "[DONE]"
        error = json.loads(data[-1])["error"]
        assert error == {
            "message": "The engine failed on this request: The server is stopping",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        assert all("error" not in json.loads(d) for d in data[:-1])
        _clean_exit(server)
        log = server.log_text()
        assert "grace period over: 1 requests still in flight are cut" in log
        assert "CancelledError" not in log and "Cancel 1 running task" not in log, log
