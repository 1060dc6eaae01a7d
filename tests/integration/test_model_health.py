"""Health that tells the truth, on the real server: a model that fails to load is not served, requests for
it say why and that retrying will not help (the openai SDK does not retry), and ``/health`` is 200 only
while some model can serve."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.servers import Server, run_server


def _config(tmp_path: Path, *models: tuple[str, str]) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text("".join(f'[[models]]\nname = "{name}"\npath = "{source}"\n\n' for name, source in models))
    return path


def _settled(server: Server, timeout: float = 120) -> httpx.Response:
    """``/health`` once no model is loading any more."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{server.url}/health", timeout=5)
        if all(m["state"] != "loading" for m in r.json()["models"].values()):
            return r
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)


def _posts(server: Server, path: str) -> int:
    return server.log_text().count(f'"POST {path} HTTP/1.1"')


def test_a_failed_model_is_not_served_and_says_why(tmp_path: Path, models_dir: Path, log_dir: Path) -> None:
    config = _config(tmp_path, ("tiny", "tiny"), ("broken", str(tmp_path / "no-such-model")))
    with run_server(["--config", str(config)], models_dir=models_dir, log_dir=log_dir) as server:
        health = _settled(server)
        assert health.status_code == 200
        body: dict[str, Any] = health.json()
        assert body["status"] == "degraded"
        assert body["models"]["tiny"]["state"] == "ready"
        assert body["models"]["broken"]["state"] == "failed"
        assert "No model directory" in body["models"]["broken"]["error"]
        log = server.log_text()
        report = f"model broken failed to load: ModelNotFound: No model directory at {tmp_path / 'no-such-model'}\n"
        assert f"ERROR adapters.mlx_lm.engine: {report}" in log
        assert "Traceback" not in log, log  # the operator's mistake, not a bug: one line

        assert [m["id"] for m in httpx.get(f"{server.v1}/models").json()["data"]] == ["tiny"]
        one = httpx.get(f"{server.v1}/models/broken")
        assert one.status_code == 503 and one.headers["x-should-retry"] == "false"
        assert httpx.get(f"{server.v1}/models/nothing").status_code == 404

        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=2)
        before = _posts(server, "/v1/chat/completions")
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
        error = caught.value
        assert error.status_code == 503
        assert error.response.headers["x-should-retry"] == "false"
        assert error.code == "model_unavailable"
        assert "failed to load" in error.message and "retrying will not help" in error.message
        assert "No model directory" in error.message
        assert _posts(server, "/v1/chat/completions") == before + 1  # the SDK did not retry

        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.choices[0].finish_reason in ("length", "stop")


def test_health_is_503_when_no_model_can_serve(tmp_path: Path, models_dir: Path, log_dir: Path) -> None:
    config = _config(tmp_path, ("broken", str(tmp_path / "no-such-model")))
    with run_server(["--config", str(config)], models_dir=models_dir, log_dir=log_dir, wait_ready=False) as server:
        health = _settled(server)
        assert health.status_code == 503
        assert health.json()["status"] == "unhealthy"
        assert httpx.get(f"{server.v1}/models").json()["data"] == []
        r = httpx.post(f"{server.v1}/completions", json={"model": "broken", "prompt": "x", "max_tokens": 1}, timeout=10)
        assert r.status_code == 503 and r.headers["x-should-retry"] == "false"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_loading_is_logged_stage_by_stage(models_dir: Path, log_dir: Path) -> None:
    with run_server(["--model", "tiny"], models_dir=models_dir, log_dir=log_dir) as server:
        log = server.log_text()
    for stage in ("model tiny: resolving tiny", "model tiny: reading the model", "model tiny: weights 0%"):
        assert stage in log, log
    assert "model tiny: ready after" in log
