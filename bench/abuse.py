"""Abuse: one tenant sends the worst valid request shapes at once, over and over, while another tenant's
small streamed chats are timed and ``/health`` and ``/metrics`` are each scraped 20 times a second.

The noisy tenant may have ``NOISY_CONCURRENCY`` requests in the server at once (past it: 429). One worker
per shape, all at once, each in a loop (0.1 s between an answer and the next request):

- ``n``: a chat with ``n`` = 128 choices (above the server's batch limit, ``max_running`` = 32) and 4 tokens;
- ``ctx-stream-leave`` / ``ctx-leave``: ``max_tokens`` up to the context limit, streamed and not, the
  client going away after a second;
- ``stop16`` (16 stop strings), ``logit-bias300`` (300 entries), ``top-logprobs20`` (streamed, with
  logprobs), ``json-schema48`` (a ``json_schema`` response format 48 objects deep), ``messages100`` (a
  100-message conversation), ``ctx-prompt`` (a prompt at the context limit, one token);
- ``prefix-cache``: create a named prefix cache of 1,000 tokens with the tenant's own key, then delete it;
- ``over-limit``: shapes just past a limit (``n`` 129, 17 stop strings, ``top_logprobs`` 21, schema 64
  deep, prompt + ``max_tokens`` one past the context), which must be refused (400 or 429).

The well-behaved tenant sends one small streamed chat at a time and its time to first token is taken,
alone first, then under the abuse. Before that, a warm-up runs the same workload for a few seconds without
what may leave work behind on a server with the bugs this hunts (``n`` past the batch limit, clients that
leave); the resident memory (``VmRSS``) taken after it is "before". Afterwards the server must go idle: 0
active requests in ``/health``, no engine step for 5 s (batch steps in ``/health``'s ``batch_steps``, plus
``mlx_gateway_decode_step_seconds_count`` of ``/metrics``, which also counts the sequential path), and
resident memory back near "before". ``Bounds`` says how near, and how fast.

``tests/integration/test_abuse.py`` runs 30 s of this on the tiny model and asserts it; the long run:

    python -m bench.abuse                            # tiny, 3 minutes
    python -m bench.abuse --model smollm2-135m --minutes 5
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness import bench_parser, free_port, server_process, write_result

__all__ = ["ADMIN_KEY", "CALM_KEY", "NOISY_KEY", "Abuse", "Bounds", "Report", "Shape", "config_toml", "shapes"]

NOISY_KEY, CALM_KEY, ADMIN_KEY = "key-noisy", "key-calm", "abuse-admin"
MAX_RUNNING = 32  # the server's default, written into the config so that the figures below agree with it
NOISY_CONCURRENCY = 4
SCRAPE_HZ = 20.0
LEAVE_AFTER_S = 1.0
# No single request may take longer: a tiny or 135M model answers every shape here well within it, so a
# request still unanswered at this point is stuck (e.g. the engine wedged), not slow.
REQUEST_TIMEOUT_S = 20.0
SCRAPE_TIMEOUT_S = 5.0
IDLE_WINDOW_S = 5.0
PAUSE_S = 0.1
CALM_BODY: dict[str, Any] = {
    "messages": [{"role": "user", "content": "What is two plus two?"}],
    "max_tokens": 8,
    "stream": True,
}


@dataclass(frozen=True)
class Bounds:
    """What ``Report.problems`` allows."""

    # The well-behaved tenant's p95 time to first token under abuse may be this many times its median alone,
    # and at least ttft_floor_s. On the 2-core test machine, tiny model, 2,048-token context, its median alone
    # was 40-52 ms and its p95 under abuse 0.54-0.81 s (three runs, 2026-12-06, other work loading the
    # machine). Most of it is the noisy tenant's context-length prompts: each is prefilled 512 tokens a step,
    # and the well-behaved tenant's arrival goes first only between two of those chunks (before the batch took
    # arrivals tenant by tenant, it waited for all of them: p95 1.0-2.9 s). So the floor decides here; it
    # still fails a tenant that is starved (a wedged engine: no token within the request timeout) or made to
    # wait for the noisy tenant's whole work.
    ttft_factor: float = 4.0
    ttft_floor_s: float = 2.0
    # Every client gone, /health must show 0 active requests within this (a request whose client left must
    # leave the engine at its next step).
    settle_s: float = 5.0
    # The RSS after (the idle window) over the RSS before (after the warm-up: see Abuse.run). Allocator noise
    # alone reached 13% once (315 -> 356 MB in a 30 s CI run; 0.3-2.4% in 30 s runs and 3% in a 3-minute run
    # here on 2026-12-07: it does not grow with time). Heap pages kept by glibc before the idle trim were 40%.
    rss_tolerance: float = 0.20


def config_toml(model: str, context: int) -> str:
    """The server's config: the two tenants, the admin, the model with ``context`` as its limit."""
    return (
        f'admin_key = "{ADMIN_KEY}"\n'
        f'api_keys = {{ "{NOISY_KEY}" = "noisy", "{CALM_KEY}" = "calm" }}\n'
        f"max_running = {MAX_RUNNING}\n"
        # A server that fails here may hold requests that never end: stopping it need not wait for them.
        "shutdown_timeout_seconds = 2\n"
        f"[[models]]\nname = {json.dumps(model)}\npath = {json.dumps(model)}\ncontext_length = {context}\n"
        f"[tenants.noisy]\nmax_concurrent_requests = {NOISY_CONCURRENCY}\n"
    )


@dataclass(frozen=True)
class Shape:
    """One kind of noisy request."""

    name: str
    path: str
    body: dict[str, Any]
    stream: bool = False
    leave: bool = False  # the client goes away after LEAVE_AFTER_S
    over_limit: bool = False  # must be refused: 400 (or 429)


def _nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for i in range(depth):
        schema = {
            "type": "object",
            "properties": {f"k{i}": schema, "n": {"type": "integer"}},
            "required": [f"k{i}"],
            "additionalProperties": False,
        }
    return schema


def _tokens(count: int) -> list[int]:
    """A prompt of exactly ``count`` token ids (ordinary ones, below 300 in any vocabulary)."""
    return [10 + i % 290 for i in range(count)]


def shapes(model: str, context: int, n: int = 128) -> list[Shape]:
    """The noisy tenant's shapes: the valid ones, then those just past a limit."""
    chat, completions = "/v1/chat/completions", "/v1/completions"
    hello = [{"role": "user", "content": "Say something long."}]

    def ask(**body: Any) -> dict[str, Any]:
        return {"model": model, "messages": hello, **body}

    def schema(depth: int) -> dict[str, Any]:
        fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": _nested_schema(depth), "strict": True}}
        return ask(max_tokens=16, response_format=fmt)

    conversation = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"Message {i}: tell me about the tides."}
        for i in range(99)
    ] + hello
    long = {"model": model, "prompt": _tokens(4), "max_tokens": context - 4}
    valid = [
        Shape("n", chat, ask(n=n, max_tokens=4)),
        Shape("ctx-stream-leave", completions, {**long, "stream": True}, stream=True, leave=True),
        Shape("ctx-leave", completions, long, leave=True),
        Shape("stop16", chat, ask(max_tokens=16, stop=[f"never{i}" for i in range(16)])),
        Shape("logit-bias300", chat, ask(max_tokens=16, logit_bias={str(10 + i): (i % 7) - 3.0 for i in range(300)})),
        Shape("top-logprobs20", chat, ask(max_tokens=16, logprobs=True, top_logprobs=20, stream=True), stream=True),
        Shape("json-schema48", chat, schema(48)),
        Shape("messages100", chat, {"model": model, "messages": conversation, "max_tokens": 16}),
        Shape("ctx-prompt", completions, {"model": model, "prompt": _tokens(context - 1), "max_tokens": 1}),
    ]
    over = [
        Shape("n129", chat, ask(n=129, max_tokens=4), over_limit=True),
        Shape("stop17", chat, ask(max_tokens=4, stop=[f"never{i}" for i in range(17)]), over_limit=True),
        Shape("top-logprobs21", chat, ask(max_tokens=4, logprobs=True, top_logprobs=21), over_limit=True),
        Shape("json-schema64", chat, schema(64), over_limit=True),
        Shape("ctx+1", completions, {"model": model, "prompt": _tokens(context), "max_tokens": 1}, over_limit=True),
        Shape("max-tokens-ctx", completions, {**long, "max_tokens": context}, over_limit=True),
    ]
    return valid + over


def send(client: httpx.Client, shape: Shape, timeout: float) -> str:
    """Send one request; its outcome: the status, ``200 left`` / ``left`` (the client went away after or
    before the answer began, as the shape asks), ``error event`` (a 200 stream that carried an error),
    ``timeout`` (no answer within ``timeout`` seconds) or the client's exception."""
    started = time.monotonic()
    try:
        if shape.stream:
            limits = httpx.Timeout(timeout, read=LEAVE_AFTER_S if shape.leave else timeout)
            with client.stream("POST", shape.path, json=shape.body, timeout=limits) as r:
                if r.status_code != 200:
                    r.read()
                    return str(r.status_code)
                for line in r.iter_lines():
                    if line.startswith('data: {"error"'):
                        return "error event"
                    elapsed = time.monotonic() - started
                    if shape.leave and elapsed > LEAVE_AFTER_S:
                        return "200 left"
                    if elapsed > timeout:
                        return "timeout"
                return "200"
        limits = httpx.Timeout(timeout, read=LEAVE_AFTER_S if shape.leave else timeout)
        return str(client.post(shape.path, json=shape.body, timeout=limits).status_code)
    except httpx.TimeoutException:
        return "left" if shape.leave else "timeout"
    except httpx.HTTPError as exc:
        return type(exc).__name__


def calm_ttft(client: httpx.Client, model: str, timeout: float) -> tuple[float | None, str | None]:
    """One well-behaved streamed chat: seconds to its first token, or what went wrong."""
    started = time.monotonic()
    first: float | None = None
    try:
        with client.stream("POST", "/v1/chat/completions", json={"model": model, **CALM_BODY}, timeout=timeout) as r:
            if r.status_code != 200:
                return None, f"status {r.status_code}: {r.read()[:200]!r}"
            done = False
            for line in r.iter_lines():
                if time.monotonic() - started > timeout:
                    return None, f"the stream had not ended after {timeout:.0f} s"
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return None, f"error event: {chunk['error']}"
                    token = any(c["delta"].get("content") or c.get("finish_reason") for c in chunk["choices"])
                    if first is None and token:
                        first = time.monotonic() - started
            if not done or first is None:
                return None, "the stream ended without [DONE] or without a token"
    except httpx.TimeoutException:
        return None, f"no answer within {timeout:.0f} s"
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return first, None


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Report:
    """What one run measured; ``problems()`` says what broke."""

    seconds: float
    n: int
    timeout: float
    alone_ttft: list[float] = field(default_factory=list)
    abuse_ttft: list[float] = field(default_factory=list)
    calm_errors: list[str] = field(default_factory=list)
    noisy: dict[str, Counter[str]] = field(default_factory=dict)
    over_limit: set[str] = field(default_factory=set)
    scrapes: dict[str, list[float]] = field(default_factory=dict)
    scrape_failures: list[str] = field(default_factory=list)
    settle_seconds: float | None = None  # None: still active at the end of the wait
    settle_waited: float = 0.0
    active_left: int = 0
    idle_steps: int = 0  # engine steps counted during the 5 s idle window
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    after_error: str | None = None  # the well-behaved request sent once everything settled

    def problems(self, bounds: Bounds) -> list[str]:
        """What broke, one line each, the noisy tenant's shapes first (empty: nothing)."""
        meaning = {"timeout": f"no answer within {self.timeout:.0f} s", "error event": "an error inside a 200 stream"}
        out = []
        for name, c in self.noisy.items():
            refused_only = name in self.over_limit
            wrong = {o: k for o, k in c.items() if o not in _FINE or (refused_only and o not in ("400", "429"))}
            out += [f"noisy {name}: {k} x {meaning.get(o, o)}" for o, k in sorted(wrong.items())]
            # Only 429s would leave the shape untested.
            if not refused_only and set(c) <= {"429"}:
                out.append(f"noisy {name}: never admitted in {self.seconds:.0f} s ({dict(c)})")
        totals = sum(self.noisy.values(), Counter[str]())
        if not totals["200"]:
            out.append("noisy tenant: not one 200")
        if not totals["429"] + totals["400"]:
            out.append("noisy tenant: never refused (429 or 400)")
        out += [f"well-behaved tenant: {e}" for e in self.calm_errors[:10]]
        if len(self.calm_errors) > 10:
            out.append(f"well-behaved tenant: {len(self.calm_errors) - 10} more errors")
        if not self.abuse_ttft or not self.alone_ttft:
            out.append(f"well-behaved tenant: no first token {'under abuse' if self.alone_ttft else 'alone'}")
        else:
            alone, p95 = statistics.median(self.alone_ttft), percentile(self.abuse_ttft, 0.95)
            bound = max(bounds.ttft_factor * alone, bounds.ttft_floor_s)
            if p95 > bound:
                out.append(
                    f"well-behaved tenant: p95 TTFT {p95 * 1000:.0f} ms under abuse > {bound * 1000:.0f} ms "
                    f"(max({bounds.ttft_factor:g} x {alone * 1000:.0f} ms alone, {bounds.ttft_floor_s:g} s))"
                )
        out += [f"scrape: {f}" for f in self.scrape_failures[:10]]
        if len(self.scrape_failures) > 10:
            out.append(f"scrape: {len(self.scrape_failures) - 10} more failures")
        if self.settle_seconds is None:
            out.append(
                f"after the abuse: {self.active_left} requests still active {self.settle_waited:.0f} s after every "
                "client left (the engine keeps running requests nobody waits for)"
            )
        elif self.settle_seconds > bounds.settle_s:
            out.append(
                f"after the abuse: active requests took {self.settle_seconds:.1f} s to reach 0 "
                f"(bound {bounds.settle_s:g} s)"
            )
        if self.idle_steps:
            out.append(
                f"after the abuse: the engine took {self.idle_steps} steps in {IDLE_WINDOW_S:g} s with nothing to do"
            )
        if self.rss_after > self.rss_before * (1 + bounds.rss_tolerance):
            out.append(
                f"after the abuse: RSS {self.rss_after / 1e6:.0f} MB > {1 + bounds.rss_tolerance:.2f} x "
                f"{self.rss_before / 1e6:.0f} MB before"
            )
        if self.after_error:
            out.append(f"after the abuse: a well-behaved request: {self.after_error}")
        return out

    def table(self) -> str:
        def ms(values: list[float], q: float) -> str:
            return f"{percentile(values, q) * 1000:8.0f}" if values else "       -"

        lines = [f"{'well-behaved TTFT':<24} {'p50 ms':>8} {'p95 ms':>8} {'n':>6}"]
        for label, values in (("alone", self.alone_ttft), ("under abuse", self.abuse_ttft)):
            lines.append(f"  {label:<22} {ms(values, 0.5)} {ms(values, 0.95)} {len(values):>6}")
        lines.append(f"  errors: {len(self.calm_errors)}")
        lines.append(f"{'noisy shape':<24} outcomes (count x outcome)")
        for name, c in self.noisy.items():
            lines.append(f"  {name:<22} " + ", ".join(f"{k} x {o}" for o, k in sorted(c.items())))
        lines.append(f"{'scrape':<24} {'p50 ms':>8} {'p99 ms':>8} {'n':>6}")
        for path, values in self.scrapes.items():
            lines.append(f"  {path:<22} {ms(values, 0.5)} {ms(values, 0.99)} {len(values):>6}")
        lines.append(f"  failures: {len(self.scrape_failures)}")
        settle = "never" if self.settle_seconds is None else f"{self.settle_seconds:.2f} s"
        lines.append(f"time to 0 active requests after the abuse: {settle} ({self.active_left} left)")
        lines.append(f"engine steps in the 5 s idle window: {self.idle_steps}")
        lines.append(
            f"RSS MB before / peak / after: {self.rss_before / 1e6:.0f} / {self.rss_peak / 1e6:.0f} / "
            f"{self.rss_after / 1e6:.0f}"
        )
        return "\n".join(lines)

    def row(self) -> dict[str, Any]:
        def q(values: list[float], p: float) -> float | None:
            return round(percentile(values, p), 4) if values else None

        return {
            "seconds": self.seconds,
            "n": self.n,
            "ttft_alone_p50": q(self.alone_ttft, 0.5),
            "ttft_alone_p95": q(self.alone_ttft, 0.95),
            "ttft_abuse_p50": q(self.abuse_ttft, 0.5),
            "ttft_abuse_p95": q(self.abuse_ttft, 0.95),
            "calm_requests": len(self.abuse_ttft),
            "calm_errors": self.calm_errors[:20],
            "noisy": {name: dict(c) for name, c in self.noisy.items()},
            "scrapes": {p: {"p50": q(v, 0.5), "p99": q(v, 0.99), "n": len(v)} for p, v in self.scrapes.items()},
            "scrape_failures": len(self.scrape_failures),
            "settle_seconds": self.settle_seconds,
            "active_left": self.active_left,
            "idle_steps": self.idle_steps,
            "rss_before": self.rss_before,
            "rss_peak": self.rss_peak,
            "rss_after": self.rss_after,
            "after_error": self.after_error,
        }


_FINE = {"200", "201", "200 left", "left", "400", "429"}


class Abuse:
    """The workload against a running server (``url``, process ``pid``) configured by ``config_toml``."""

    def __init__(
        self,
        url: str,
        pid: int,
        model: str,
        context: int,
        n: int = 128,
        timeout: float = REQUEST_TIMEOUT_S,
        log: Callable[[str], None] = print,
    ) -> None:
        self.url, self.pid, self.model, self.context, self.n, self.timeout = url, pid, model, context, n, timeout
        self.log = log
        self.shapes = shapes(model, context, n)
        self._lock = threading.Lock()

    def _client(self, key: str) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout)

    def _health(self, client: httpx.Client) -> dict[str, Any]:
        return dict(client.get("/health", timeout=SCRAPE_TIMEOUT_S).json())

    def _steps(self, client: httpx.Client) -> int:
        """Engine steps so far: batch steps (``/health``) plus decode steps of either path (``/metrics``)."""
        steps = int(self._health(client)["batch_steps"]["steps"])
        for line in client.get("/metrics", timeout=SCRAPE_TIMEOUT_S).text.splitlines():
            if line.startswith("mlx_gateway_decode_step_seconds_count{"):
                steps += int(float(line.rsplit(" ", 1)[1]))
        return steps

    def _settle(self, client: httpx.Client, limit: float) -> tuple[float | None, int]:
        """Seconds until ``/health`` shows 0 active requests (None: not within ``limit``), and how many are left."""
        started = time.monotonic()
        while True:
            active = int(self._health(client)["active_requests"])
            elapsed = time.monotonic() - started
            if active == 0:
                return elapsed, 0
            if elapsed > limit:
                return None, active
            time.sleep(0.1)

    def _count(self, counts: dict[str, Counter[str]], name: str, outcome: str) -> None:
        with self._lock:
            counts.setdefault(name, Counter())[outcome] += 1

    def _noise(self, todo: list[Shape], deadline: float, counts: dict[str, Counter[str]]) -> list[threading.Thread]:
        """Start the noisy tenant until ``deadline``: a worker per valid shape, one cycling over the shapes past a
        limit, one creating and deleting prefix caches. Each sends its next request PAUSE_S after an answer: a
        worker whose request just ended would otherwise take the place it freed every time, and the shapes that
        came back 429 would never get one."""

        def loop(cycle: list[Shape]) -> None:
            with self._client(NOISY_KEY) as client:
                i = 0
                while time.monotonic() < deadline:
                    shape = cycle[i % len(cycle)]
                    i += 1
                    outcome = send(client, shape, self.timeout)
                    self._count(counts, shape.name, outcome)
                    time.sleep(PAUSE_S)

        def churn() -> None:
            body = {"model": self.model, "prompt": _tokens(1000), "replace": True}
            with self._client(NOISY_KEY) as client:
                i = 0
                while time.monotonic() < deadline:
                    name = f"abuse-{i % 4}"
                    i += 1
                    created = _status(client.post, "/admin/prefix-caches", json={**body, "name": name})
                    self._count(counts, "prefix-cache", created)
                    self._count(counts, "prefix-cache", _status(client.delete, f"/admin/prefix-caches/{name}"))

        over = [s for s in todo if s.over_limit]
        workers = [threading.Thread(target=loop, args=([s],)) for s in todo if not s.over_limit]
        workers += [threading.Thread(target=loop, args=(over,)), threading.Thread(target=churn)]
        for t in workers:
            t.start()
        return workers

    def _join(self, threads: list[threading.Thread]) -> None:
        for t in threads:  # each request has its own timeout: every loop ends within one of them
            t.join(self.timeout + 5)

    def _scrape(self, path: str, stop: threading.Event, report: Report) -> None:
        """Scrape ``path`` SCRAPE_HZ times a second until ``stop``; from ``/health``'s loop, sample the RSS too."""
        latencies = report.scrapes.setdefault(path, [])
        # /health as a load balancer probes it (no key), /metrics with the admin key it needs.
        with self._client(ADMIN_KEY if path == "/metrics" else "") as client:
            tick = time.monotonic()
            while not stop.is_set():
                started = time.monotonic()
                outcome = _status(client.get, path, timeout=SCRAPE_TIMEOUT_S)
                latencies.append(time.monotonic() - started)
                if outcome != "200":
                    report.scrape_failures.append(f"{path}: {outcome}")
                if path == "/health":
                    report.rss_peak = max(report.rss_peak, rss_bytes(self.pid))
                tick = max(tick + 1 / SCRAPE_HZ, time.monotonic())
                time.sleep(max(0.0, tick - time.monotonic()))

    def _phase(self, todo: list[Shape], seconds: float, report: Report) -> None:
        """``seconds`` of the noisy tenant sending ``todo``, the scrapes, and the well-behaved tenant's chats one
        after another; returns when every client has left (each request within its timeout)."""
        stop = threading.Event()
        scrapers = [threading.Thread(target=self._scrape, args=(p, stop, report)) for p in ("/health", "/metrics")]
        for t in scrapers:
            t.start()
        deadline = time.monotonic() + seconds
        workers = self._noise(todo, deadline, report.noisy)
        with self._client(CALM_KEY) as calm:
            while time.monotonic() < deadline:
                ttft, error = calm_ttft(calm, self.model, self.timeout)
                if ttft is not None:
                    report.abuse_ttft.append(ttft)
                if error:
                    report.calm_errors.append(f"under abuse: {error}")
        self._join(workers)
        stop.set()
        self._join(scrapers)

    def _new_report(self, seconds: float) -> Report:
        report = Report(seconds, self.n, self.timeout, over_limit={s.name for s in self.shapes if s.over_limit})
        report.noisy = {s.name: Counter() for s in self.shapes if not s.over_limit}
        report.noisy["prefix-cache"] = Counter()
        report.noisy.update({s.name: Counter() for s in self.shapes if s.over_limit})
        return report

    def run(self, seconds: float, warm_up: float = 6.0, settle_limit: float = 5.0, alone_samples: int = 10) -> Report:
        """Warm up, time the well-behaved tenant alone, then under ``seconds`` of abuse, then watch the server
        settle: every figure of the report."""
        # The warm-up is the same workload without what may leave work behind on a server with the bugs this
        # hunts (``n`` past the batch limit, clients that go away), so that "before" is measured on an idle server
        # whose allocator has already met these shapes and batch sizes at once.
        warm = [
            dataclasses.replace(s, body={**s.body, "n": min(s.body["n"], MAX_RUNNING)}) if s.name == "n" else s
            for s in self.shapes
            if not s.leave
        ]
        scratch = self._new_report(warm_up)
        self._phase(warm, warm_up, scratch)
        self.log(
            f"warm-up: RSS peak {scratch.rss_peak / 1e6:.0f} MB, well-behaved TTFT p95 "
            f"{percentile(scratch.abuse_ttft, 0.95) * 1000:.0f} ms; "
            + "; ".join(f"{name} {dict(c)}" for name, c in scratch.noisy.items() if c)
        )
        report = self._new_report(seconds)
        with self._client(ADMIN_KEY) as admin, self._client(CALM_KEY) as calm:
            self._settle(admin, settle_limit)
            time.sleep(1.0)
            report.rss_before = report.rss_peak = rss_bytes(self.pid)
            alone_until = time.monotonic() + alone_samples * 0.6
            while len(report.alone_ttft) < alone_samples and time.monotonic() < alone_until:
                ttft, error = calm_ttft(calm, self.model, self.timeout)
                if ttft is not None:
                    report.alone_ttft.append(ttft)
                if error:
                    report.calm_errors.append(f"alone: {error}")
            self.log(f"alone: median TTFT {statistics.median(report.alone_ttft or [0]) * 1000:.0f} ms")

            self._phase(self.shapes, seconds, report)
            self.log("abuse over; every client has left")

            report.settle_waited = settle_limit
            report.settle_seconds, report.active_left = self._settle(admin, settle_limit)
            before = self._steps(admin)
            time.sleep(IDLE_WINDOW_S)
            report.idle_steps = self._steps(admin) - before
            report.rss_after = rss_bytes(self.pid)
            _, report.after_error = calm_ttft(calm, self.model, 5.0)
        return report


def _status(call: Callable[..., httpx.Response], *args: Any, **kwargs: Any) -> str:
    """The status of ``call(*args, **kwargs)``, or ``timeout``, or the client's exception."""
    try:
        return str(call(*args, **kwargs).status_code)
    except httpx.TimeoutException:
        return "timeout"
    except httpx.HTTPError as exc:
        return type(exc).__name__


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--context", type=int, default=8192, help="the model's context limit (tiny, smollm2: 8192)")
    parser.add_argument("--n", type=int, default=128, help="choices of the n shape")
    parser.add_argument("--settle-limit", type=float, default=120.0, help="seconds to wait for 0 active requests")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds any one request may take")
    parser.add_argument("--warm-up", type=float, default=30.0, help="seconds of warm-up before 'before'")
    parser.add_argument("--skip", default="", help="shapes to leave out, by name, comma-separated (a known bug's)")
    args = parser.parse_args()
    model = args.model or "tiny"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "gateway.toml").write_text(config_toml(model, args.context))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "gateway.cli.main", "serve", "--port", str(port)]
        cmd += ["--config", str(folder / "gateway.toml"), "--cache-dir", str(folder / "caches")]
        with server_process(cmd, url, folder / "server.log", {"PYTHONUNBUFFERED": "1"}) as proc:
            abuse = Abuse(
                url, proc.pid, model, args.context, args.n, args.timeout, lambda line: print(line, flush=True)
            )
            abuse.shapes = [s for s in abuse.shapes if s.name not in args.skip.split(",")]
            report = abuse.run(args.minutes * 60, warm_up=args.warm_up, settle_limit=args.settle_limit)
        log = (folder / "server.log").read_text(errors="replace")
    print(report.table())
    problems = report.problems(Bounds())
    print("\n".join(["problems:", *problems]) if problems else "no problems")
    row = {"context": args.context, "warm_up_seconds": args.warm_up, "timeout": args.timeout, "skipped": args.skip}
    row.update(report.row())
    row["problems"] = problems
    row["server_log_errors"] = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line][:20]
    write_result(
        "abuse", args.device, model, [row], notes="bench/abuse.py's docstring says what each shape is", out=args.out
    )


if __name__ == "__main__":
    main()
