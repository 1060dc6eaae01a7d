"""Letting mlx's threads leave the process before the interpreter ends (the engine's process, or the server's in
the thread layout). Imports no mlx."""

from __future__ import annotations

import threading
import time
from pathlib import Path

__all__ = ["await_os_exit"]


def await_os_exit(threads: list[threading.Thread], timeout: float = 5.0) -> None:
    """Wait until each of ``threads`` that has finished has also left the operating system.

    ``join()`` returns before a thread's C++ ``thread_local`` destructors run. mlx's per-thread random key
    (``PyKeySequence``, set by any ``mx.random`` call: sampling, random preset weights) takes the GIL in its
    destructor; if the interpreter is finalizing by then, Python 3.11 ends that thread with ``pthread_exit``,
    whose unwinding through the ``noexcept`` destructor calls ``std::terminate``: ``terminate called without
    an active exception`` and exit 134 after a clean stop (python/cpython#87135; 3.14 parks such threads).
    """
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():  # no /proc (macOS): give the destructors the GIL for a moment
        time.sleep(0.1)
        return
    deadline = time.monotonic() + timeout
    for thread in threads:
        if thread.is_alive() or thread.native_id is None:
            continue
        while (tasks / str(thread.native_id)).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
