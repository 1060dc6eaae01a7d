"""Running the app under uvicorn: listen, start, drain on SIGTERM or Ctrl-C, stop the engine, exit 0; or exit 1
once no configured model can serve. One of several API servers (``gateway.processes.front_process``) runs the same way,
and also exits 1 once the process that supervises it is gone."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from adapters.base import Engine
from adapters.mlx_lm.threads import await_os_exit
from gateway.config import Config
from gateway.draining import Drain
from gateway.tenancy.admission import Places

__all__ = ["listen", "run_server"]

logger = logging.getLogger("gateway")

# After the engine is told to stop, how long its failed requests have to send their error and end before
# uvicorn closes what is left.
CUT_SECONDS = 3.0


def listen(host: str, port: int) -> list[socket.socket]:
    """The listening sockets for ``host:port``, one per address it resolves to (as asyncio's ``create_server``
    binds them), made before anything loads: a port in use is one line at once, not uvicorn's error after the
    engine started.

    Raises:
        OSError: the address cannot be resolved or bound (in use, not this host's, not permitted).
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.set_inheritable(True)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _nothing_to_serve(report: dict[str, Any]) -> str | None:
    """Why no request can ever be served (every model failed to load, or the engine died), or None."""
    if not report["engine_alive"]:
        return f"the engine stopped: {report['engine_error'] or 'unknown reason'}"
    models: dict[str, dict[str, Any]] = report["models"]
    if not models or any(m["state"] != "failed" for m in models.values()):
        return None
    if len(models) == 1:
        [(name, model)] = models.items()
        return f"model {name} failed to load: {model['error']}"
    return "every model failed to load (" + "; ".join(f"{n}: {m['error']}" for n, m in models.items()) + ")"


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains (see :mod:`gateway.draining`) instead of closing the socket,
    a second one stops at once, and no signal is re-raised after a clean stop: Ctrl-C used to end in a
    KeyboardInterrupt traceback and, during interpreter teardown, ``terminate called without an active
    exception`` (exit 134) from MLX's threads."""

    def __init__(
        self, config: uvicorn.Config, engine: Engine, drain: Drain, grace_seconds: float, parent: int | None
    ) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain = drain
        self.grace_seconds = grace_seconds
        # The supervising process's pid (one of several API servers): this one stops once it is gone.
        self.parent = parent
        self._deadline = float("inf")
        self._cut = False
        # Why nothing can be served, once no model can serve: the server then exits with status 1.
        self.failure: str | None = None
        # The threads alive once the app started (the engine's among them), to see them leave at exit.
        self.threads: list[threading.Thread] = []

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.threads = [t for t in threading.enumerate() if t is not threading.current_thread()]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if self._cut:
            logger.warning("%s again: exiting without waiting for %d requests", name, self.drain.in_flight)
            self.should_exit = True
            return
        if self.drain.draining or self.grace_seconds <= 0:
            logger.warning("%s again: stopping now (%d requests in flight are cut)", name, self.drain.in_flight)
            self._cut_requests()
            return
        self.drain.draining = True
        self._deadline = time.monotonic() + self.grace_seconds
        logger.info(
            "%s: draining (new requests get 503; %d in flight finish within %.0fs; repeat the signal to stop now)",
            name,
            self.drain.in_flight,
            self.grace_seconds,
        )

    def _cut_requests(self) -> None:
        """Stop now, still in order: the engine fails what it runs (each request gets its error, each stream one
        error event), the streams end, then uvicorn shuts down and the engine thread is joined. uvicorn's own
        end would cancel the streams instead (a CancelledError traceback each)."""
        self.drain.draining = True
        self._cut = True
        self._deadline = time.monotonic() + CUT_SECONDS
        self.engine.stop(wait=False)

    async def on_tick(self, counter: int) -> bool:
        if not self.drain.draining and not self.should_exit and counter % 10 == 0:
            self.failure = _nothing_to_serve(self.engine.health())
            self.should_exit = self.failure is not None
        if self.parent is not None and os.getppid() != self.parent and not self._cut:
            self.failure = f"the supervising process {self.parent} is gone"
            logger.error("%s: stopping now (%d requests in flight are cut)", self.failure, self.drain.in_flight)
            self._cut_requests()
        if self.drain.draining and not self.should_exit:
            if self.drain.in_flight == 0:
                logger.info("drained: no request in flight")
                self.should_exit = True
            elif time.monotonic() >= self._deadline and not self._cut:
                logger.warning("grace period over: %d requests still in flight are cut", self.drain.in_flight)
                self._cut_requests()
            elif time.monotonic() >= self._deadline:
                logger.warning("%d requests did not end after the engine stopped; closing them", self.drain.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


def run_server(
    config: Config,
    engine: Engine,
    sockets: list[socket.socket],
    *,
    places: Places | None = None,
    metrics_dir: Path | None = None,
    parent: int | None = None,
) -> int:
    """Serve ``engine`` on ``sockets`` (see :func:`listen`) until a signal, or until no model can serve; the
    process's exit status.

    Args:
        places, metrics_dir: admission and metrics shared with other front ends (see :func:`create_app`).
        parent: the supervising process of several front ends, whose end ends this one too.
    """
    from sse_starlette.sse import AppStatus

    from gateway.app import create_app

    app = create_app(config, engine, places, metrics_dir)
    # sse-starlette would end every stream on SIGTERM; running streams finish instead (gateway.draining).
    AppStatus.disable_automatic_graceful_drain()
    server = _DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            log_config=None,
            # Draining already waited for the requests; this bounds only what is left after it.
            timeout_graceful_shutdown=5,
        ),
        engine,
        app.state.drain,
        config.shutdown_timeout_seconds,
        parent,
    )
    port = sockets[0].getsockname()[1]
    logger.info("serving %s on http://%s:%d/v1", ", ".join(m.name for m in config.models), config.host, port)
    try:
        server.run(sockets=sockets)
    finally:
        AppStatus.should_exit = True  # anything still streaming after the grace period ends now
        engine.stop()  # idempotent; also after a second signal, which skips the app's shutdown hooks
        await_os_exit(server.threads)
    if server.failure is not None:
        logger.error("nothing to serve: %s", server.failure)
        return 1
    logger.info("stopped")
    return 0
