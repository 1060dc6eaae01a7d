"""Health that tells the truth, on the real server: a model that fails to load is not served, requests for
it say why and that retrying will not help (the openai SDK does not retry), ``/health`` is 200 only
while some model can serve, and a server with no model left to serve exits."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.servers import ROOT, Server, free_port, run_server


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


def test_the_server_exits_when_no_model_can_serve(tmp_path: Path, models_dir: Path) -> None:
    """Nothing to serve: each model's failure is one line, the last line says why the server stops, and the
    command ends with status 1 (it used to serve 503s for ever after a traceback for each model)."""
    missing, empty = tmp_path / "no-such-model", tmp_path / "empty"
    empty.mkdir()
    config = _config(tmp_path, ("broken", str(missing)), ("hollow", str(empty)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_GATEWAY_")}
    env["MLX_GATEWAY_MODELS_DIR"] = str(models_dir)
    args = ["serve", "--config", str(config), "--port", str(free_port()), "--cache-dir", str(tmp_path / "caches")]
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line.split(" ", 2)[2] for line in done.stderr.splitlines() if " ERROR " in line]
    assert errors == [
        f"ERROR adapters.mlx_lm.engine: model broken failed to load: ModelNotFound: No model directory at {missing}",
        f"ERROR adapters.mlx_lm.engine: model hollow failed to load: ModelNotFound: {empty} is not a model "
        "directory: it has no config.json",
        f"ERROR gateway: nothing to serve: every model failed to load (broken: ModelNotFound: No model directory at "
        f"{missing}; hollow: ModelNotFound: {empty} is not a model directory: it has no config.json)",
    ]
    assert done.stderr.splitlines()[-1].endswith(errors[-1])


def test_loading_is_logged_stage_by_stage(models_dir: Path, log_dir: Path) -> None:
    with run_server(["--model", "tiny"], models_dir=models_dir, log_dir=log_dir) as server:
        log = server.log_text()
    for stage in ("model tiny: resolving tiny", "model tiny: reading the model", "model tiny: weights 0%"):
        assert stage in log, log
    assert "model tiny: ready after" in log
