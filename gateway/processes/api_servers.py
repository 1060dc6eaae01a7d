"""Several API servers on one port feeding one engine process (``--api-servers N``), for when HTTP and JSON,
not the engine, are the limit (as vLLM's ``--api-server-count``).

The process the user started has bound the listening sockets (:func:`gateway.processes.server.listen`) and launched the
engine process (:meth:`adapters.remote.RemoteEngine.launch`); :func:`serve_api_servers` then

1. runs the server's one admission (:class:`gateway.tenancy.coordinator.Coordinator`) on its event loop;
2. starts N front-end processes (:mod:`gateway.processes.front_process`), each inheriting the listening sockets (as
   uvicorn's own workers share the socket their parent bound) and attaching to the engine process under its own
   front id (1..N), with ``PROMETHEUS_MULTIPROC_DIR`` set to a fresh folder of this run (``gateway.metrics``);
3. supervises them: SIGTERM or SIGINT is passed to every front end as SIGTERM (each drains its own requests; a
   second signal is passed on too, and they stop at once); once they are gone it stops the engine process,
   removes the run's folder and exits 0. A front end or the engine process that ends on its own is a failure:
   the other front ends are stopped (they drain), then the engine, and the exit status is 1. A front end that
   does not end within its grace period (and a margin) is killed.

Front ends run in a process group of their own: a terminal's Ctrl-C (sent to the foreground group) then reaches
only this process, which passes it on once; a front end that got it twice would skip draining. If this process
is killed, the front ends and the engine process see their parent gone and stop (``gateway.processes.server``,
``adapters.mlx_lm.host``).

Ownership: this process's main thread and its event loop own everything here: the coordinator, the front ends'
``Popen`` objects, the engine process's launcher (a :class:`RemoteEngine` never started as a front end) and the
run's folder (the coordinator's socket and the metrics folder).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from adapters.remote import RemoteEngine
from adapters.setup import EngineSetup
from gateway.config import Config, child_environment
from gateway.processes.front_process import FrontSetup
from gateway.processes.server import CUT_SECONDS
from gateway.tenancy.admission import Admission
from gateway.tenancy.coordinator import Coordinator

__all__ = ["serve_api_servers"]

logger = logging.getLogger("gateway")

# How often the supervisor looks at its children (and so reaps a dead engine, which the front ends, watching its
# pid, then see gone).
POLL_SECONDS = 0.1
# After the engine process ended on its own: how long the front ends have to fail their open requests and exit
# by themselves before they are told to stop.
ENGINE_GONE_SECONDS = 5.0
# Beyond a front end's grace period and cut: how long it may take to exit before it is killed.
KILL_SLACK_SECONDS = 10.0


@dataclass
class _Front:
    number: int
    process: subprocess.Popen[bytes]
    seen_end: bool = False


class _Supervisor:
    def __init__(self, config: Config, setup: EngineSetup, engine: RemoteEngine, sockets: list[socket.socket]) -> None:
        self.config = config
        self.setup = setup
        self.engine = engine
        self.sockets = sockets
        self.folder = Path(tempfile.mkdtemp(prefix="mlx-gateway-api-"))  # 0700: the admission socket, metrics
        self.fronts: list[_Front] = []
        self.stopping = False
        self.failure: str | None = None
        self.engine_ended = False
        self._stop_at = float("inf")
        self._kill_at = float("inf")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        address = f"ipc://{self.folder}/admission"
        coordinator = loop.create_task(Coordinator(Admission.of(self.config), address).serve())
        try:
            self._start_fronts(address)
            await self._supervise()
        finally:
            for front in self.fronts:  # only after an error here: normally every front end has ended
                if front.process.poll() is None:
                    front.process.kill()
                    front.process.wait()
            coordinator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await coordinator
            await asyncio.to_thread(self.engine.stop)
            shutil.rmtree(self.folder, ignore_errors=True)
        codes = [front.process.returncode for front in self.fronts]
        if self.failure is not None or any(codes):
            logger.error("stopped: %s", self.failure or f"API servers' exit statuses {codes}")
            return 1
        logger.info("stopped")
        return 0

    def _start_fronts(self, address: str) -> None:
        metrics = self.folder / "metrics"
        metrics.mkdir()
        env = child_environment({"PROMETHEUS_MULTIPROC_DIR": str(metrics)})
        fds = [sock.fileno() for sock in self.sockets]
        try:
            for number in range(1, self.config.api_servers + 1):
                setup = FrontSetup(
                    config=self.config,
                    engine=self.setup,
                    address=self.engine.address,
                    front=number,
                    admission=address,
                    metrics_dir=str(metrics),
                    fds=fds,
                    parent=os.getpid(),
                )
                process = subprocess.Popen(
                    [sys.executable, "-m", "gateway.processes.front_process"],
                    stdin=subprocess.PIPE,
                    pass_fds=fds,
                    env=env,
                    process_group=0,
                )
                assert process.stdin is not None
                process.stdin.write(msgspec.json.encode(setup))
                process.stdin.close()
                self.fronts.append(_Front(number, process))
        finally:
            # The front ends hold the listening sockets now: a copy kept here would queue connections that no one
            # accepts once they have all gone.
            for sock in self.sockets:
                sock.close()
        pids = ", ".join(str(front.process.pid) for front in self.fronts)
        logger.info("%d API servers (pids %s) on engine process %d", len(self.fronts), pids, self.engine.address.pid)

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.stopping:
            logger.warning("%s again: passed on to the API servers, which stop now", name)
        else:
            logger.info("%s: every API server drains", name)
        self._stop()
        self._pass_on()

    def _stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self._kill_at = time.monotonic() + self.config.shutdown_timeout_seconds + CUT_SECONDS + KILL_SLACK_SECONDS

    def _pass_on(self) -> None:
        for front in self.fronts:
            if front.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    front.process.send_signal(signal.SIGTERM)

    def _fail(self, failure: str) -> None:
        if self.failure is None:
            self.failure = failure
            logger.error("%s: stopping every API server", failure)

    async def _supervise(self) -> None:
        while any(front.process.poll() is None for front in self.fronts):
            await asyncio.sleep(POLL_SECONDS)
            now = time.monotonic()
            status = self.engine.exit_status()  # reaps it: the front ends watching its pid see it gone
            if status is not None and not self.engine_ended:
                self.engine_ended = True
                how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
                self._fail(f"the engine process {self.engine.address.pid} ended ({how})")
                self._stop_at = now + ENGINE_GONE_SECONDS  # they fail their requests and exit by themselves
            for front in self.fronts:
                code = front.process.poll()
                if code is None or front.seen_end:
                    continue
                front.seen_end = True
                if not self.stopping:
                    self._fail(f"API server {front.number} (pid {front.process.pid}) ended with status {code}")
                    self._stop()
                    self._pass_on()
            if now >= self._stop_at and not self.stopping:
                self._stop()
                self._pass_on()
            if now >= self._kill_at:
                for front in self.fronts:
                    if front.process.poll() is None:
                        logger.error("API server %d (pid %d) did not stop: killing it", front.number, front.process.pid)
                        front.process.kill()


def serve_api_servers(config: Config, setup: EngineSetup, engine: RemoteEngine, sockets: list[socket.socket]) -> int:
    """Serve ``config.api_servers`` front ends on ``sockets`` feeding ``engine`` (launched from ``setup``) until
    a signal, or until one of them or the engine ends; the process's exit status."""
    port = sockets[0].getsockname()[1]
    logger.info(
        "serving %s on http://%s:%d/v1 with %d API servers",
        ", ".join(m.name for m in config.models),
        config.host,
        port,
        config.api_servers,
    )
    return asyncio.run(_Supervisor(config, setup, engine, sockets).run())
