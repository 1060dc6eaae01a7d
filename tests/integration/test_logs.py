"""``MLX_GATEWAY_LOG_FORMAT=json`` on the real server: every line of its stderr is one JSON object; every
line logged while serving a request carries that request's id (the engine thread's lines too), and the id
is the client's ``x-request-id`` when sane, echoed on every response."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Server, run_server

NO_EOS = {"0": -100, "2": -100}
GENERATED = re.compile(r"req_[0-9a-f]{32}")


@pytest.fixture(scope="module")
def json_server(models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--model", "tiny", "--cache-dir", str(tmp_path_factory.mktemp("logs-caches"))]
    with run_server(args, models_dir=models_dir, log_dir=log_dir, env={"MLX_GATEWAY_LOG_FORMAT": "json"}) as srv:
        yield srv


def records(server: Server) -> list[dict[str, Any]]:
    lines = server.log_text().splitlines()
    assert lines
    out = []
    for line in lines:
        record = json.loads(line)  # every line, not only the gateway's: uvicorn's and the engine's too
        assert {"time", "level", "logger", "message"} <= set(record), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), line
        out.append(record)
    return out


def of(server: Server, request_id: str) -> list[dict[str, Any]]:
    return [r for r in records(server) if r.get("request_id") == request_id]


def wait_for(server: Server, request_id: str, logger: str, timeout: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = of(server, request_id)
        if any(r["logger"] == logger for r in lines):
            return lines
        time.sleep(0.1)
    raise AssertionError(f"no {logger} line for {request_id}: {of(server, request_id)}")


def chat(server: Server, headers: dict[str, str] | None = None, **body: object) -> httpx.Response:
    full = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **body}
    return httpx.post(f"{server.v1}/chat/completions", json=full, headers=headers or {}, timeout=60)


def test_a_given_request_id_is_echoed_and_on_its_lines(json_server: Server) -> None:
    r = chat(json_server, {"x-request-id": "client-abc.123:x"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-abc.123:x"
    lines = wait_for(json_server, "client-abc.123:x", "uvicorn.access")
    served = [x for x in lines if x["logger"] == "gateway.routes.openai"]
    assert len(served) == 1 and served[0]["message"].startswith("chat chatcmpl-")
    (access,) = [x for x in lines if x["logger"] == "uvicorn.access"]
    assert access["method"] == "POST" and access["path"] == "/v1/chat/completions" and access["status"] == 200
    # The request's prompt never reaches the log at INFO.
    assert not any("hi" in x["message"].split() for x in lines)


def test_generated_ids_for_streams_errors_and_bad_ids(json_server: Server) -> None:
    stream = chat(json_server, stream=True)
    rid = stream.headers["x-request-id"]
    assert stream.status_code == 200 and GENERATED.fullmatch(rid)
    assert [x["status"] for x in wait_for(json_server, rid, "uvicorn.access") if "status" in x] == [200]
    error = chat(json_server, {"x-request-id": "err-1"}, model="no-such-model")
    assert error.status_code == 404 and error.headers["x-request-id"] == "err-1"
    unrouted = httpx.get(f"{json_server.url}/nowhere", headers={"x-request-id": "err-2"}, timeout=30)
    assert unrouted.status_code == 404 and unrouted.headers["x-request-id"] == "err-2"
    assert wait_for(json_server, "err-2", "uvicorn.access")[-1]["status"] == 404
    for bad in ("has space", "x" * 129, "semi;colon", ""):
        r = httpx.get(f"{json_server.url}/health", headers={"x-request-id": bad}, timeout=30)
        assert GENERATED.fullmatch(r.headers["x-request-id"]), bad
        assert not of(json_server, bad)


def test_the_engine_threads_lines_carry_the_request_id(json_server: Server) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000, "stream": True}
    body["logit_bias"] = NO_EOS
    with httpx.stream(
        "POST", f"{json_server.v1}/chat/completions", json=body, headers={"x-request-id": "cut-short"}, timeout=60
    ) as r:
        assert r.headers["x-request-id"] == "cut-short"
        next(r.iter_lines())  # the stream has begun; leaving the block closes the connection mid-stream
    lines = wait_for(json_server, "cut-short", "adapters.mlx_lm.engine")
    (cancelled,) = [x for x in lines if x["logger"] == "adapters.mlx_lm.engine"]
    assert cancelled["message"] == "request cut-short cancelled" and cancelled["level"] == "INFO"
