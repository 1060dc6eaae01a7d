"""``mlx-gateway replicas``: N gateway processes on loopback ports behind HAProxy, on one machine.

The replicas share one prefix-cache directory (the same ``--cache-dir``) and agree through it only; HAProxy
routes a cache's requests to one replica (see :mod:`gateway.replicas.haproxy_config`). This process supervises:
a replica that exits is started again (HAProxy takes it back once its /health answers 200); SIGTERM or
SIGINT drains every replica (their streams finish), then stops HAProxy. ``replicas.json`` in the run
folder says which process is which.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from gateway.replicas.haproxy_config import Backend, render_haproxy_config

__all__ = ["ReplicaSet", "ReplicaSetError"]

logger = logging.getLogger(__name__)


class ReplicaSetError(RuntimeError):
    pass


@dataclass
class _Replica:
    backend: Backend
    log: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    out: IO[bytes] | None = field(default=None, repr=False)


class ReplicaSet:
    def __init__(
        self,
        count: int,
        bind_host: str,
        bind_port: int,
        first_port: int,
        run_dir: Path,
        serve_args: list[str],
        *,
        haproxy: str = "haproxy",
        cached_balance: Literal["hash", "roundrobin"] = "hash",
        drain_seconds: float = 40.0,
    ) -> None:
        self.run_dir = run_dir
        self.bind = f"{bind_host}:{bind_port}"
        self.serve_args = serve_args
        self.haproxy = haproxy
        self.cached_balance: Literal["hash", "roundrobin"] = cached_balance
        self.drain_seconds = drain_seconds
        self.replicas = [
            _Replica(Backend(f"replica-{i + 1}", "127.0.0.1", first_port + i), run_dir / f"replica-{i + 1}.log")
            for i in range(count)
        ]
        self.proxy: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()

    def _start_replica(self, replica: _Replica) -> None:
        b = replica.backend
        command = [sys.executable, "-m", "gateway.cli.main", "serve", *self.serve_args]
        command += ["--host", b.host, "--port", str(b.port), "--replica-id", b.name]
        if replica.out is not None:
            replica.out.close()
        replica.out = replica.log.open("ab")
        replica.process = subprocess.Popen(command, stdout=replica.out, stderr=subprocess.STDOUT)
        logger.info("%s started on port %d (pid %d)", b.name, b.port, replica.process.pid)

    def _write_state(self) -> None:
        state = {
            "proxy": f"http://{self.bind}",
            "haproxy_pid": self.proxy.pid if self.proxy else None,
            "replicas": [
                {
                    "id": r.backend.name,
                    "url": f"http://{r.backend.host}:{r.backend.port}",
                    "pid": r.process.pid if r.process else None,
                    "restarts": r.restarts,
                }
                for r in self.replicas
            ],
        }
        tmp = self.run_dir / ".replicas.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.run_dir / "replicas.json")

    def start(self) -> None:
        """Write haproxy.cfg, check it, start the replicas and HAProxy.

        Raises:
            ReplicaSetError: HAProxy is missing or refuses the configuration.
        """
        binary = shutil.which(self.haproxy)
        if binary is None:
            raise ReplicaSetError(
                f"'{self.haproxy}' not found: install HAProxy 2.6 or newer (Debian/Ubuntu: apt-get install haproxy)"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.run_dir / "haproxy.cfg"
        cfg.write_text(
            render_haproxy_config([r.backend for r in self.replicas], self.bind, cached_balance=self.cached_balance)
        )
        check = subprocess.run([binary, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise ReplicaSetError(f"HAProxy refuses {cfg}: {check.stdout}{check.stderr}")
        for replica in self.replicas:
            self._start_replica(replica)
        with (self.run_dir / "haproxy.log").open("ab") as out:
            # -db: stay in the foreground, so that this process sees it exit.
            self.proxy = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
        self._write_state()
        logger.info(
            "HAProxy on %s in front of %d replicas (run folder %s)", self.bind, len(self.replicas), self.run_dir
        )

    def supervise(self) -> int:
        """Restart replicas that exit until :meth:`stop` is called or HAProxy exits; returns an exit status."""
        while not self._stop.wait(0.2):
            if self.proxy is not None and self.proxy.poll() is not None:
                logger.error("HAProxy exited with %s; stopping the replicas", self.proxy.returncode)
                self.shutdown()
                return 1
            changed = False
            now = time.monotonic()
            for replica in self.replicas:
                process = replica.process
                if process is None or process.poll() is None:
                    continue
                if replica.next_start == 0.0:
                    # Backs off when a replica keeps failing (a bad model path, a port taken): 1 s, 2 s ... 30 s.
                    replica.next_start = now + min(2.0**replica.restarts, 30.0)
                    logger.warning("%s exited with %s; starting it again", replica.backend.name, process.returncode)
                elif now >= replica.next_start:
                    replica.restarts += 1
                    replica.next_start = 0.0
                    self._start_replica(replica)
                    changed = True
            if changed:
                self._write_state()
        self.shutdown()
        return 0

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Drain the replicas (SIGTERM: they refuse new requests, HAProxy sees 503 and stops sending any, their
        streams finish), then stop HAProxy."""
        running = [r.process for r in self.replicas if r.process is not None and r.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_seconds
        for process in running:
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            self.proxy.wait(10)
        for replica in self.replicas:
            if replica.out is not None:
                replica.out.close()
