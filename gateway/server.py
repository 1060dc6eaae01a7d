"""Running the app under uvicorn: start, drain on SIGTERM/SIGINT, stop the engine, exit."""

from __future__ import annotations

import logging

from adapters.base import Engine
from gateway.config import Config

__all__ = ["run_server"]

logger = logging.getLogger("gateway")


def run_server(config: Config, engine: Engine) -> int:
    """Serve ``engine`` until a signal; the process's exit status."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    from gateway.app import create_app

    app = create_app(config, engine)
    # sse-starlette would end every stream on SIGTERM; we let running streams finish instead (uvicorn
    # stops accepting connections and waits up to shutdown_timeout_seconds) and refuse new requests.
    AppStatus.disable_automatic_graceful_drain()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            log_config=None,
            timeout_graceful_shutdown=int(config.shutdown_timeout_seconds),
        )
    )
    app.state.admission.is_closing = lambda: server.should_exit
    logger.info("serving %s on http://%s:%d/v1", ", ".join(m.name for m in config.models), config.host, config.port)
    server.run()
    AppStatus.should_exit = True  # anything still streaming after the grace period ends now
    return 0
