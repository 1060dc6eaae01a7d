"""The engine process's entry point (the process layout):
``python -m gateway.processes.engine_process LEVEL FORMAT FOLDER``.

It reads an :class:`~adapters.setup.EngineSetup` (JSON) on stdin, logs as the server does, writes one JSON line on
stdout once serving (``{"ready": pid}``) or failing (``{"error": why}``), and runs
:func:`adapters.mlx_lm.host.serve`. It is the only gateway module that runs where mlx is imported.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import msgspec

from adapters.setup import EngineSetup
from gateway.logs import setup_logging

__all__ = ["main"]


def main() -> int:
    level, fmt, folder = sys.argv[1], sys.argv[2], sys.argv[3]
    setup_logging(level, fmt)  # type: ignore[arg-type]
    setup = msgspec.json.decode(sys.stdin.buffer.read(), type=EngineSetup)

    def ready(error: str | None) -> None:
        sys.stdout.write(json.dumps({"error": error} if error else {"ready": os.getpid()}) + "\n")
        sys.stdout.flush()

    from adapters.mlx_lm.host import serve
    from adapters.mlx_lm.threads import await_os_exit

    try:
        return serve(setup, Path(folder), ready)
    finally:
        await_os_exit(threading.enumerate())  # the engine thread's C++ destructors, before the interpreter ends


if __name__ == "__main__":
    sys.exit(main())
