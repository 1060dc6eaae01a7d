"""Start, serve and stop the real server several times, and check what it prints as it exits.

Each cycle starts ``mlx-gateway serve``, waits until it is ready, streams one request, sends SIGTERM and
waits for the exit. A cycle fails when the exit status is not 0, or the log after ``gateway: stopped``
holds anything (on CUDA a C++ abort printed ``terminate called without an active exception`` there).

    python -m bench.exit_cycles --device gpu --cycles 5      # model 'llama-8b'
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.harness import DEFAULT_MODEL, ROOT, bench_parser, free_port, write_result

MARK = "gateway: stopped"


def cycle(model: str, log: Path, cache_dir: Path) -> dict[str, object]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gateway.cli.main", "serve", "--model", model, "--port", str(port)]
    cmd += ["--cache-dir", str(cache_dir)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            return {"ready": False, "exit": proc.returncode, "after_stop": log.read_text(errors="replace")[-2000:]}
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > 1800:
            proc.kill()
            return {"ready": False, "exit": None, "after_stop": "not ready in 1800 s"}
        time.sleep(0.25)
    ready_s = time.monotonic() - started
    body = {"model": model, "prompt": "Hello", "max_tokens": 16, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        chunks = sum(1 for line in r.iter_lines() if line.startswith("data:"))
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    text = log.read_text(errors="replace")
    after = text.split(MARK, 1)[1].strip() if MARK in text else "(no stop line)\n" + text[-2000:]
    return {"ready": True, "ready_seconds": round(ready_s, 1), "chunks": chunks, "exit": code, "after_stop": after}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--cycles", type=int, default=5)
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.cycles):
            row = {"cycle": i + 1, **cycle(model, Path(tmp) / f"cycle-{i}.log", Path(tmp) / "caches")}
            rows.append(row)
            clean = row["exit"] == 0 and row["after_stop"] == ""
            print(f"cycle {i + 1}: exit {row['exit']}, {'clean' if clean else 'NOT CLEAN'}: {row['after_stop']!r}")
    bad = [r for r in rows if not (r["exit"] == 0 and r["after_stop"] == "")]
    print(f"{len(rows) - len(bad)} of {len(rows)} cycles exited cleanly")
    write_result("exit-cycles", args.device, model, rows, out=args.out)


if __name__ == "__main__":
    main()
