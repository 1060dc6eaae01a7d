"""Prefix-cache I/O: save and load speed against the disk's own (``dd``, same run, same folder); the
time to build a cache against the prefill it replaces; and requests that hit no cache with caching on
against a server with caching off.

Cold reads drop the file's pages from the OS cache first (``posix_fadvise(DONTNEED)``), for ``dd`` and
for our loader alike; warm reads follow straight after.

    python -m bench.saveload --device cpu                 # small, 4096 tokens
    python -m bench.saveload --device gpu --model llama-8b
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import DEFAULT_MODEL, Texts, bench_parser, gateway, summary, write_result
from bench.overhead import over_http

DD_BLOCK = 4 * 1024 * 1024


def drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def dd(args: list[str]) -> float:
    """Seconds ``dd`` took (its own wall clock, around the process)."""
    start = time.perf_counter()
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    assert re.search(r"bytes", out.stderr), out.stderr
    return seconds


def disk_speeds(folder: Path, nbytes: int, repeats: int) -> dict[str, Any]:
    path = folder / "dd.bin"
    count = max(1, nbytes // DD_BLOCK)
    size = count * DD_BLOCK
    writes, cold, warm = [], [], []
    for _ in range(repeats):
        path.unlink(missing_ok=True)
        writes.append(dd(["if=/dev/zero", f"of={path}", f"bs={DD_BLOCK}", f"count={count}", "conv=fsync"]))
        drop_pages(path)
        cold.append(dd([f"if={path}", "of=/dev/null", f"bs={DD_BLOCK}"]))
        warm.append(dd([f"if={path}", "of=/dev/null", f"bs={DD_BLOCK}"]))
    path.unlink()
    mbps = lambda seconds: [size / s / 1e6 for s in seconds]  # noqa: E731
    return {
        "bytes": size,
        "write_mb_s": summary(mbps(writes)),
        "read_cold_mb_s": summary(mbps(cold)),
        "read_warm_mb_s": summary(mbps(warm)),
    }


def cache_io(model: str, texts: Texts, tokens: int, folder: Path, repeats: int) -> dict[str, Any]:
    import mlx.core as mx

    from adapters.mlx_lm.models import ModelSpec, load_model
    from adapters.mlx_lm.prefill import prefill_step
    from adapters.mlx_lm.prefix_kv import new_manifest
    from prefix_caches import kv
    from prefix_caches.names import cache_paths
    from prefix_caches.store import PrefixCacheStore

    loaded = load_model(ModelSpec(model, model))
    ids = texts.ids[:tokens]
    step = prefill_step(loaded)

    def prefill() -> list[Any]:
        cache = loaded.make_cache()
        for i in range(0, len(ids), step):
            loaded.model(mx.array(ids[i : i + step])[None], cache=cache)
            mx.eval([c.state for c in cache])
        return cache

    prefill()  # warm-up (kernels)
    prefills, exacts, saves, cold, warm, checked = [], [], [], [], [], []
    store = PrefixCacheStore(folder / "store")
    size = 0
    for r in range(repeats):
        start = time.perf_counter()
        cache = prefill()
        prefills.append(time.perf_counter() - start)
        start = time.perf_counter()
        exact = kv.exact(cache)
        exacts.append(time.perf_counter() - start)
        manifest = new_manifest(loaded, "bench", f"io-{r}", "prompt", ids, None, None, None, 64)
        # What a build does after its prefill: the atomic write with fsync, the file's sha256, the manifest.
        saves.append(timed(store.save, manifest, exact))
        path, _ = cache_paths(store.root, "bench", manifest.name)
        size = path.stat().st_size
        drop_pages(path)
        cold.append(timed(kv.load_kv, path))
        warm.append(timed(kv.load_kv, path))
        # A first use in a new server process also checks the file against its manifest's sha256.
        fresh = PrefixCacheStore(store.root)
        fresh.scan()
        drop_pages(path)
        checked.append(timed(fresh.arrays, fresh.get("bench", manifest.name)))
    mbps = lambda seconds: [size / s / 1e6 for s in seconds]  # noqa: E731
    prefill_s = summary(prefills)["median"]
    build_s = prefill_s + summary(exacts)["median"] + summary(saves)["median"]
    return {
        "tokens": tokens,
        "bytes": size,
        "prefill_seconds": summary(prefills),
        "save_seconds": summary(saves),
        "save_mb_s": summary(mbps(saves)),
        "load_cold_mb_s": summary(mbps(cold)),
        "load_warm_mb_s": summary(mbps(warm)),
        "first_use_cold_mb_s": summary(mbps(checked)),
        "load_cold_seconds": summary(cold),
        "build_over_prefill": build_s / prefill_s,
        "cold_load_over_prefill": summary(cold)["median"] / prefill_s,
    }


def no_hit_overhead(model: str, texts: Texts, repeats: int, max_tokens: int, folder: Path) -> list[dict[str, Any]]:
    """The same cache-less requests on a server with caching off, then on (three caches resident).

    (A row that named a cache "not matching" was dropped: for completions a named cache's tokens are
    prepended to the prompt's, so it measured a hit on a longer prompt, not a miss.)"""
    import httpx

    prompt = texts.ids[40000:40512]
    rows = []
    log = folder / "server.log"
    with gateway(model, folder / "off", log, env={"MLX_GATEWAY_PREFIX_CACHES": "false"}) as gw:
        rows.append({"caching": "off", **over_http(gw.url, model, prompt, max_tokens, "balanced", repeats)})
    with gateway(model, folder / "on", log) as gw:
        for i in range(3):
            body = {"name": f"other-{i}", "model": model, "prompt": texts.ids[1000 * i : 1000 * i + 512]}
            httpx.post(f"{gw.url}/admin/prefix-caches", json=body, timeout=3600).raise_for_status()
        rows.append({"caching": "on, no cache named", **over_http(gw.url, model, prompt, max_tokens, "", repeats)})
    off = rows[0]
    for row in rows:
        row["ttft_over_off"] = row["ttft"]["median"] / off["ttft"]["median"]
        row["tokens_per_s_over_off"] = row["decode_tokens_per_s"]["median"] / off["decode_tokens_per_s"]["median"]
    return rows


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8, help="requests per caching setting")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--dir", type=Path, default=Path("~/.cache/mlx-gateway").expanduser(), help="where the files go (the disk)"
    )
    parser.add_argument("--quick", action="store_true", help="1024 tokens, 2 repeats, 3 requests")
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    tokens, repeats, requests = (1024, 2, 3) if args.quick else (args.tokens, args.repeats, args.requests)
    texts = Texts(model)
    args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        io = cache_io(model, texts, tokens, folder, repeats)
        disk = disk_speeds(folder, io["bytes"], repeats)
        io["disk"] = disk
        io["load_cold_over_dd"] = io["load_cold_mb_s"]["median"] / disk["read_cold_mb_s"]["median"]
        io["load_warm_over_dd"] = io["load_warm_mb_s"]["median"] / disk["read_warm_mb_s"]["median"]
        io["save_over_dd"] = io["save_mb_s"]["median"] / disk["write_mb_s"]["median"]
        print({k: v for k, v in io.items() if not isinstance(v, dict)}, flush=True)
        nohit = no_hit_overhead(model, texts, requests, args.max_tokens, folder)
        for row in nohit:
            print(row["caching"], f"TTFT {row['ttft_over_off']:.3f}x, tok/s {row['tokens_per_s_over_off']:.3f}x")
    write_result(
        "saveload",
        args.device,
        model,
        [{"part": "cache-io", **io}, *({"part": "no-hit", **r} for r in nohit)],
        out=args.out,
        notes=f"{tokens}-token cache; medians of {repeats}; no-hit rows: 512-token prompt, {args.max_tokens} tokens, "
        f"medians of {requests}.",
    )


if __name__ == "__main__":
    main()
