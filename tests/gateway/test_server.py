"""The server's exit: a finished thread has left the operating system before the interpreter finalizes."""

from __future__ import annotations

import subprocess
import sys

from tests.servers import ROOT

# A thread that used mx.random (as the engine thread does: model construction, sampling) and was joined. Its
# thread_local random key takes the GIL in its C++ destructor, which runs after join() returns; when the
# interpreter was finalizing by then, Python 3.11 ended the thread with pthread_exit and the process aborted:
# "terminate called without an active exception", exit 134 (about 1 run in 5 on a 2-core machine).
SCRIPT = """
import threading
import mlx.core as mx
from adapters.mlx_lm.threads import await_os_exit

thread = threading.Thread(target=lambda: mx.eval(mx.random.uniform(shape=(4,))))
thread.start()
thread.join()
await_os_exit([thread])
"""


def test_exit_waits_until_a_joined_mlx_thread_has_left_the_os() -> None:
    for _ in range(10):
        done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr
