"""Starting the real server (``python -m gateway.cli.main serve``) on a free loopback port, for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def run_server(
    args: list[str],
    *,
    models_dir: Path,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 180.0,
) -> Iterator[Server]:
    port = free_port()
    log = log_dir / f"server-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_GATEWAY_")}
    full_env.update({"MLX_GATEWAY_MODELS_DIR": str(models_dir), "PYTHONUNBUFFERED": "1"})
    if os.environ.get("TEST_ENGINE_LAYOUT"):  # the whole suite on one engine layout (process or thread)
        full_env["MLX_GATEWAY_ENGINE_LAYOUT"] = os.environ["TEST_ENGINE_LAYOUT"]
    full_env.update(env or {})
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            # As in a terminal: Ctrl-C raises KeyboardInterrupt (a background shell job would ignore SIGINT).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_text()}")
            try:
                r = httpx.get(f"{server.url}/health", timeout=2)
                if not wait_ready or r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout}s:\n{server.log_text()}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
