"""Soak: mixed traffic for a long while, the server's resident memory sampled at a fixed interval.

Four clients loop over: streamed chat with and without a named cache, non-streamed completions on a
cache, several choices with a seed, streams dropped after a few chunks, and invalid requests (which must
get a 400, never a 500); every few minutes a cache is replaced and deleted. Samples start after one
interval; the reference sample is the first one after the warm-up (5 minutes: MLX's buffer pool and the
allocator's arenas fill with the shapes that the mix of lengths and batch sizes brings). Targets: the
last sample within 1.05x of the reference, zero errors.

    python -m bench.soak --device cpu                  # 5 minutes of warm-up, then 30, a sample a minute
    python -m bench.soak --device cpu --quick          # 1 + 2 minutes, a sample every 20 s
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import openai

from bench.harness import DEFAULT_MODEL, Gateway, Texts, bench_parser, gateway, write_result

CLIENTS = 4


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Traffic:
    def __init__(self, gw: Gateway, model: str, texts: Texts, seed: int) -> None:
        self.gw, self.model, self.texts = gw, model, texts
        self.client = openai.AsyncOpenAI(base_url=gw.v1, api_key="soak", max_retries=0, timeout=300)
        self.http = httpx.AsyncClient(base_url=gw.url, timeout=300)
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []

    def question(self) -> str:
        return self.texts.text(self.rng.randint(8, 48), offset=self.rng.randint(20000, 40000)) + "?"

    async def chat_stream(self, cache: str | None) -> None:
        extra = {"prefix_cache": cache} if cache else {}
        stream = await self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": self.question()}],
            max_tokens=self.rng.randint(8, 48),
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        if usage is None:
            raise RuntimeError("stream ended without usage")

    async def completion_cached(self) -> None:
        r = await self.client.completions.create(
            model=self.model,
            prompt="\n\nQ: " + self.question() + "\nA:",
            max_tokens=self.rng.randint(8, 32),
            n=2,
            seed=self.rng.randint(0, 1000),
            temperature=0.8,
            extra_body={"prefix_cache": "soak-shots"},
        )
        if len(r.choices) != 2:
            raise RuntimeError("expected two choices")

    async def dropped_stream(self) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.question()}],
            "max_tokens": 200,
            "stream": True,
        }
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"status {r.status_code}")
            seen = 0
            async for _ in r.aiter_lines():
                seen += 1
                if seen >= 6:
                    break  # the client goes away mid-stream

    async def invalid(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "x"}], "temperature": 9}
        r = await self.http.post("/v1/chat/completions", json=body)
        if r.status_code != 400 or "error" not in r.json():
            raise RuntimeError(f"invalid request answered {r.status_code}")

    async def churn_cache(self) -> None:
        body = {"name": "soak-churn", "model": self.model, "prompt": self.texts.text(256, 5000), "replace": True}
        (await self.http.post("/admin/prefix-caches", json=body)).raise_for_status()
        (await self.http.delete("/admin/prefix-caches/soak-churn")).raise_for_status()

    async def one(self) -> None:
        kind = self.rng.choices(
            ["chat", "chat-cached", "completion-cached", "dropped", "invalid"], weights=[3, 3, 2, 1, 1]
        )[0]
        try:
            if kind == "chat":
                await self.chat_stream(None)
            elif kind == "chat-cached":
                await self.chat_stream("soak-sys")
            elif kind == "completion-cached":
                await self.completion_cached()
            elif kind == "dropped":
                await self.dropped_stream()
            else:
                await self.invalid()
            self.counts[kind] += 1
        except Exception as exc:
            self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")

    async def close(self) -> None:
        await self.client.close()
        await self.http.aclose()


async def run(
    gw: Gateway, model: str, texts: Texts, minutes: float, sample_seconds: float, warmup_seconds: float
) -> dict[str, Any]:
    traffic = Traffic(gw, model, texts, seed=7)
    for name, body in (
        ("soak-sys", {"messages": [{"role": "system", "content": texts.text(768)}]}),
        ("soak-shots", {"prompt": texts.text(768, offset=9000)}),
    ):
        r = await traffic.http.post("/admin/prefix-caches", json={"name": name, "model": model, **body}, timeout=3600)
        r.raise_for_status()
    end = time.monotonic() + warmup_seconds + minutes * 60
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            await traffic.one()

    tasks = [asyncio.create_task(client()) for _ in range(CLIENTS)]
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    next_sample = start + sample_seconds
    churned = 0
    while time.monotonic() < end:
        await asyncio.sleep(max(0.0, min(next_sample, end) - time.monotonic()))
        elapsed = time.monotonic() - start
        if elapsed // 300 > churned:  # every five minutes
            churned += 1
            try:
                await traffic.churn_cache()
                traffic.counts["cache-churn"] += 1
            except Exception as exc:
                traffic.errors.append(f"cache-churn: {type(exc).__name__}: {exc}")
        health = (await traffic.http.get("/health")).json()
        sample = {
            "seconds": round(elapsed),
            "rss_bytes": rss_bytes(gw.process.pid),
            "requests": sum(traffic.counts.values()),
            "errors": len(traffic.errors),
            "mlx_active_bytes": health.get("memory", {}).get("active_memory"),
            "mlx_cache_bytes": health.get("memory", {}).get("cache_memory"),
        }
        samples.append(sample)
        print(sample, flush=True)
        next_sample += sample_seconds
    stop.set()
    await asyncio.gather(*tasks)
    await traffic.close()
    reference = next(s for s in samples if s["seconds"] >= warmup_seconds)
    first, last = reference["rss_bytes"], samples[-1]["rss_bytes"]
    return {
        "minutes": minutes,
        "warmup_seconds": warmup_seconds,
        "sample_seconds": sample_seconds,
        "clients": CLIENTS,
        "samples": samples,
        "requests": dict(traffic.counts),
        "errors": traffic.errors[:50],
        "error_count": len(traffic.errors),
        "rss_first": first,
        "rss_last": last,
        "rss_peak": max(s["rss_bytes"] for s in samples),
        "rss_last_over_first": last / first,
        "rss_last_over_first_sample": last / samples[0]["rss_bytes"],
    }


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--sample-seconds", type=float, default=60)
    parser.add_argument("--warmup-minutes", type=float, default=5)
    parser.add_argument("--quick", action="store_true", help="1 minute of warm-up, 2 minutes, a sample every 20 s")
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.device]
    minutes, every, warmup = args.minutes, args.sample_seconds, args.warmup_minutes
    if args.quick:
        minutes, every, warmup = 2.0, 20.0, 1.0
    texts = Texts(model)
    with tempfile.TemporaryDirectory() as tmp:
        with gateway(model, Path(tmp) / "caches", Path(tmp) / "server.log") as gw:
            row = asyncio.run(run(gw, model, texts, minutes, every, warmup * 60))
        log = (Path(tmp) / "server.log").read_text()
        row["server_log_errors"] = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line][:20]
    print(
        f"rss first {row['rss_first'] / 1e6:.0f} MB, last {row['rss_last'] / 1e6:.0f} MB "
        f"({row['rss_last_over_first']:.3f}x); {sum(row['requests'].values())} requests, {row['error_count']} errors"
    )
    write_result("soak", args.device, model, [row], out=args.out)


if __name__ == "__main__":
    main()
