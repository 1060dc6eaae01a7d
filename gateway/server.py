"""Running the app under uvicorn: start, drain on SIGTERM or Ctrl-C, stop the engine, exit 0."""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from adapters.base import Engine
from gateway.config import Config
from gateway.draining import Drain

__all__ = ["run_server"]

logger = logging.getLogger("gateway")


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains (see :mod:`gateway.draining`) instead of closing the socket,
    a second one stops at once, and no signal is re-raised after a clean stop: Ctrl-C used to end in a
    KeyboardInterrupt traceback and, during interpreter teardown, ``terminate called without an active
    exception`` (exit 134) from MLX's threads."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain: Drain, grace_seconds: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain = drain
        self.grace_seconds = grace_seconds
        self._deadline = float("inf")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if self.drain.draining or self.grace_seconds <= 0:
            # Stop now, still in order: the engine fails what it runs (each request gets its error, each
            # stream an error event), the streams end, then uvicorn shuts down and the engine thread is joined.
            logger.warning("%s again: stopping now (%d requests in flight are cut)", name, self.drain.in_flight)
            self.drain.draining = True
            self._deadline = time.monotonic() + 3
            self.engine.stop(wait=False)
            return
        self.drain.draining = True
        self._deadline = time.monotonic() + self.grace_seconds
        logger.info(
            "%s: draining (new requests get 503; %d in flight finish within %.0fs; repeat the signal to stop now)",
            name,
            self.drain.in_flight,
            self.grace_seconds,
        )

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            if self.drain.in_flight == 0:
                logger.info("drained: no request in flight")
                self.should_exit = True
            elif time.monotonic() >= self._deadline:
                logger.warning("grace period over: %d requests still in flight are cut", self.drain.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


def run_server(config: Config, engine: Engine) -> int:
    """Serve ``engine`` until a signal; the process's exit status."""
    from sse_starlette.sse import AppStatus

    from gateway.app import create_app

    app = create_app(config, engine)
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
    )
    logger.info("serving %s on http://%s:%d/v1", ", ".join(m.name for m in config.models), config.host, config.port)
    try:
        server.run()
    finally:
        AppStatus.should_exit = True  # anything still streaming after the grace period ends now
        engine.stop()  # idempotent; also after a second signal, which skips the app's shutdown hooks
    logger.info("stopped")
    return 0
