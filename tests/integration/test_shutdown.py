"""Graceful shutdown on the real server: SIGTERM lets a running stream finish and refuses new work."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx

from tests.servers import run_server

BODY = {
    "model": "tiny",
    "prompt": "x",
    "max_tokens": 400,
    "temperature": 0,
    "stream": True,
    "logit_bias": {"0": -100, "2": -100},
}


def test_sigterm_finishes_running_streams(models_dir: Path, log_dir: Path) -> None:
    with run_server(["--model", "tiny"], models_dir=models_dir, log_dir=log_dir) as server:
        with httpx.stream("POST", f"{server.v1}/completions", json=BODY, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            server.process.send_signal(signal.SIGTERM)
            try:  # a new request now is refused: no connection, or 503
                refused = httpx.post(f"{server.v1}/completions", json={**BODY, "stream": False}, timeout=5)
                assert refused.status_code == 503
            except httpx.TransportError:
                pass
            data = [first[6:]] + [line[6:] for line in lines if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len([c for c in chunks if c["choices"][0]["finish_reason"] is None]) >= 300
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert server.process.wait(30) in (0, -signal.SIGTERM)
        assert "Finished server process" in server.log_text()
