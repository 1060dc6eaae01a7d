"""One replica against three behind HAProxy (``mlx-gateway replicas``) on this machine, and cache affinity
against round robin.

Setup: ``--caches`` prefix caches of ``--prefix-words`` words each are built once in a shared directory.
Each replica may keep ``--resident`` of them in memory (``prefix_cache_memory_bytes`` sized from the files),
so that together three replicas can hold every cache but one cannot. ``--clients`` clients then send
``--requests`` completions, each naming a cache drawn at random (seeded), through the proxy.
Reported per configuration: requests/s, completion tokens/s, median latency, and the hot-hit rate (the
``x-prefix-cache`` header says ``hit=true; resident=true``: the cache was in that replica's memory).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.harness import bench_parser, corpus_text, free_port, server_process, write_result


def _start(count: int, balance: str, model: str, cache_dir: Path, budget: int, run_dir: Path) -> tuple[Any, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gateway.cli.main", "replicas", "-n", str(count), "--port", str(port)]
    cmd += ["--first-port", str(free_port()), "--run-dir", str(run_dir), "--cached-balance", balance, "--"]
    cmd += ["--model", model, "--cache-dir", str(cache_dir), "--prefix-cache-memory-bytes", str(budget)]
    url = f"http://127.0.0.1:{port}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return server_process(cmd, url, run_dir / "bench.log", {"PYTHONUNBUFFERED": "1"}), url


def _wait_replicas(run_dir: Path) -> None:
    for replica in json.loads((run_dir / "replicas.json").read_text())["replicas"]:
        deadline = time.monotonic() + 600
        while httpx.get(f"{replica['url']}/health", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{replica['id']} not ready")
            time.sleep(0.25)


def _drive(url: str, model: str, prefixes: dict[str, str], requests: int, clients: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    plan = [rng.choice(sorted(prefixes)) for _ in range(requests)]
    lock = threading.Lock()
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    placement: dict[str, set[str]] = {}
    tokens = 0

    def client() -> None:
        nonlocal tokens
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not plan:
                        return
                    name = plan.pop()
                started = time.perf_counter()
                body = {
                    "model": model,
                    "prompt": prefixes[name] + " In short,",
                    "max_tokens": 16,
                    "temperature": 0,
                    "prefix_cache": name,
                }
                r = http.post(f"{url}/v1/completions", json=body)
                elapsed = time.perf_counter() - started
                fields = dict(p.split("=", 1) for p in r.headers.get("x-prefix-cache", "").split("; ") if "=" in p)
                with lock:
                    if r.status_code != 200:
                        outcomes["failed"] += 1
                        continue
                    latencies.append(elapsed)
                    tokens += r.json()["usage"]["completion_tokens"]
                    hot = fields.get("hit") == "true" and fields.get("resident") == "true"
                    outcomes["hot" if hot else ("cold" if fields.get("hit") == "true" else "miss")] += 1
                    placement.setdefault(name, set()).add(r.headers.get("x-replica", "?"))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    done = len(latencies)
    return {
        "requests": done,
        "failed": outcomes["failed"],
        "seconds": round(wall, 2),
        "requests_per_second": round(done / wall, 2),
        "completion_tokens_per_second": round(tokens / wall, 1),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "hot_hit_rate": round(outcomes["hot"] / max(done, 1), 3),
        "cold_hits": outcomes["cold"],
        "misses": outcomes["miss"],
        "replicas_per_cache": round(statistics.mean(len(v) for v in placement.values()), 2),
    }


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--caches", type=int, default=9)
    parser.add_argument("--resident", type=int, default=3, help="caches one replica may keep in memory")
    parser.add_argument("--prefix-words", type=int, default=300)
    parser.add_argument("--requests", type=int, default=90)
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args()
    model = args.model or "small"
    words = corpus_text().split()
    prefixes = {
        f"doc-{i}": " ".join(words[i * args.prefix_words : (i + 1) * args.prefix_words]) for i in range(args.caches)
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        cache_dir = Path(tmp) / "caches"
        # Build every cache once, through one replica; every configuration below shares the directory.
        proc, url = _start(1, "hash", model, cache_dir, 2 * 1024**3, Path(tmp) / "build")
        with proc:
            sizes = []
            for name, prefix in prefixes.items():
                r = httpx.post(
                    f"{url}/admin/prefix-caches", json={"model": model, "name": name, "prompt": prefix}, timeout=600
                )
                r.raise_for_status()
                sizes.append(r.json()["size_bytes"])
        budget = int(max(sizes) * (args.resident + 0.5))
        for count, balance in ((1, "hash"), (3, "hash"), (3, "roundrobin")):
            run_dir = Path(tmp) / f"run-{count}-{balance}"
            proc, url = _start(count, balance, model, cache_dir, budget, run_dir)
            with proc:
                _wait_replicas(run_dir)
                row = {"replicas": count, "cached_balance": balance, "memory_budget_bytes": budget}
                row |= _drive(url, model, prefixes, args.requests, args.clients, seed=1)
                print(row, flush=True)
                rows.append(row)
    notes = (
        f"{args.caches} caches of {args.prefix_words} words ({max(sizes)} bytes of KV each); each replica keeps "
        f"{args.resident} resident; {args.clients} clients, {args.requests} completions of 16 tokens, cache names "
        "drawn at random (seed 1)."
    )
    write_result("replicas", args.device, model, rows, notes, args.out)


if __name__ == "__main__":
    main()
