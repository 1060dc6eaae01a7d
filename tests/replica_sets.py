"""Starting ``mlx-gateway replicas`` (N gateway processes behind HAProxy) for tests, with HAProxy installed
from the distribution's packages when it is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import ROOT, free_port

# HAProxy's log line when a health check changes a server's state in a backend.
_SERVER_STATE = re.compile(r"Server (\S+)/(\S+) is (UP|DOWN)")
BACKENDS = ("by_cache", "least_connections")


def haproxy_executable() -> str:
    """HAProxy (2.6 or newer), installed with apt-get when missing; the test fails (loudly) if it cannot be."""
    found = shutil.which("haproxy")
    if found is None:
        if shutil.which("apt-get") is None:
            pytest.fail("the replica tests need HAProxy (Debian's haproxy package), and there is no apt-get")
        print("haproxy is missing: installing Debian's haproxy package with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        steps = [["apt-get", "update"], ["apt-get", "install", "-y", "haproxy"]]
        results = [subprocess.run(s, env=env, capture_output=True, text=True, timeout=900) for s in steps]
        found = shutil.which("haproxy")
        if found is None:
            pytest.fail(
                "could not install haproxy with apt-get (the replica tests need it):\n"
                + "\n".join(
                    f"{' '.join(s)}: {r.returncode}\n{r.stderr[-2000:]}" for s, r in zip(steps, results, strict=True)
                )
            )
    version = subprocess.run([found, "-v"], capture_output=True, text=True).stdout.split()[2]
    if tuple(int(p) for p in version.split(".")[:2]) < (2, 6):
        pytest.fail(f"HAProxy {version} is too old: the replica tests need 2.6 or newer (balance hash, json_query)")
    return found


@dataclass
class ReplicaSetProcess:
    url: str
    process: subprocess.Popen[bytes]
    run_dir: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def state(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "replicas.json").read_text())

    def replica_urls(self) -> dict[str, str]:
        return {r["id"]: r["url"] for r in self.state()["replicas"]}

    def proxy_states(self) -> dict[tuple[str, str], str]:
        """What HAProxy last logged of each (backend, replica): "UP" or "DOWN"; absent until it logs one.
        Servers start unreachable (a replica takes seconds to load), so each goes DOWN, then UP after its
        ``rise`` good checks: a replica answering /health is not yet one that HAProxy sends requests to."""
        log = self.run_dir / "haproxy.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return {(m[1], m[2]): m[3] for m in _SERVER_STATE.finditer(text)}

    def wait_routed(self, replica_ids: list[str], timeout: float) -> None:
        """Until HAProxy has every one of ``replica_ids`` UP in both backends."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.proxy_states()
            if all(states.get((b, r)) == "UP" for b in BACKENDS for r in replica_ids):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"HAProxy does not route to all of {replica_ids}: {states}\n{self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.run_dir.glob("*.log"))
        )


def wait_healthy(url: str, timeout: float, alive: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"the replica set exited with {alive.returncode} before {url} was healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


@contextmanager
def run_replica_set(
    count: int,
    serve_args: list[str],
    *,
    run_dir: Path,
    models_dir: Path,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
    timeout: float = 240.0,
) -> Iterator[ReplicaSetProcess]:
    """``mlx-gateway replicas -n COUNT -- SERVE_ARGS`` on free ports, every replica healthy before it yields."""
    haproxy = haproxy_executable()
    port = free_port()
    first = free_port()
    while first + count > 65535 or port in range(first, first + count):
        first = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_GATEWAY_")}
    full_env.update({"MLX_GATEWAY_MODELS_DIR": str(models_dir), "PYTHONUNBUFFERED": "1", **(env or {})})
    command = [sys.executable, "-m", "gateway.cli.main", "replicas", "-n", str(count), "--port", str(port)]
    command += ["--first-port", str(first), "--run-dir", str(run_dir), "--haproxy", haproxy, *(extra or [])]
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "supervisor.log").open("wb") as out:
        proc = subprocess.Popen([*command, "--", *serve_args], cwd=ROOT, env=full_env, stdout=out, stderr=out)
    replica_set = ReplicaSetProcess(f"http://127.0.0.1:{port}", proc, run_dir)
    try:
        deadline = time.monotonic() + timeout
        while not (run_dir / "replicas.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replicas did not start ({proc.returncode}):\n{replica_set.logs()}")
            time.sleep(0.1)
        for url in [*replica_set.replica_urls().values(), replica_set.url]:
            try:
                wait_healthy(url, max(deadline - time.monotonic(), 1.0), proc)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}:\n{replica_set.logs()}") from exc
        # The proxy answering /health means one replica is UP there; tests of balancing need them all.
        replica_set.wait_routed(list(replica_set.replica_urls()), max(deadline - time.monotonic(), 5.0))
        yield replica_set
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
