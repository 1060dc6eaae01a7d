"""One of several API servers (``--api-servers N``): ``python -m gateway.processes.front_process``, started by
:mod:`gateway.processes.api_servers`.

It reads a :class:`FrontSetup` (JSON) on stdin and serves HTTP on the listening sockets it inherited (their
file descriptors are in the setup), as uvicorn's own workers serve the socket their parent bound: the same app
as a single server's, with a :class:`~adapters.remote.RemoteEngine` attached to the running engine process
under this front end's own id, the coordinator's admission (:class:`~gateway.tenancy.coordinator.SharedAdmission`) and
its HTTP-side metrics in the shared folder. It drains on SIGTERM as a single server does, and exits 1 when the
engine process or the supervising process is gone. It never imports mlx.

Ownership: this process's event loop owns the app and everything it holds, as in a single server; the
supervising process owns the engine process, the admission and the metrics folder.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import msgspec

from adapters.remote import EngineAddress
from adapters.setup import EngineSetup
from gateway.config import Config
from gateway.logs import setup_logging

__all__ = ["FrontSetup", "main"]

logger = logging.getLogger("gateway")


class FrontSetup(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What one front end needs from its supervisor."""

    config: Config
    engine: EngineSetup
    address: EngineAddress  # the engine process to attach to
    front: int  # this front end's id among the engine's (1..N)
    admission: str  # the coordinator's ZMQ address
    metrics_dir: str  # prometheus_client's multiprocess folder (PROMETHEUS_MULTIPROC_DIR is set to it too)
    fds: list[int]  # the inherited listening sockets
    parent: int  # the supervising process: when it is gone, this one stops


def main() -> int:
    setup = msgspec.json.decode(sys.stdin.buffer.read(), type=FrontSetup)
    config = setup.config
    setup_logging(config.log_level, config.log_format, origin=f"api server {setup.front}")
    from adapters.remote import EngineProcessError, RemoteEngine
    from gateway.processes.server import run_server
    from gateway.tenancy.coordinator import SharedAdmission

    sockets = [socket.socket(fileno=fd) for fd in setup.fds]
    try:
        engine = RemoteEngine.attach(setup.engine, setup.address, setup.front)
    except EngineProcessError as exc:
        logger.error("%s", exc)
        return 1
    places = SharedAdmission(setup.admission, config.limits, config.queue_timeout_seconds)
    try:
        return run_server(
            config, engine, sockets, places=places, metrics_dir=Path(setup.metrics_dir), parent=setup.parent
        )
    finally:
        places.close()


if __name__ == "__main__":
    sys.exit(main())
