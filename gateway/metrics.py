"""Prometheus metrics, one registry per app (tests start several apps in one process).

Two sources. What only the HTTP side sees is measured where requests are served: requests by route
template and status, time to first token, inter-token latency, tokens. What the engine and admission
count is read at scrape time from the very objects ``/health`` reports (:class:`adapters.stats.EngineStats`,
``PrefixCacheStore.usage()``, ``Admission.stats()``, ``Engine.health()``), so the two never disagree.
Labels are bounded: route templates (never raw paths), model names, tenant names (never keys).

With several API servers (``--api-servers``) each front-end process counts its own HTTP side into one shared
folder (prometheus_client's multiprocess mode: the supervising process makes a fresh private folder per run and
sets ``PROMETHEUS_MULTIPROC_DIR`` for its front ends), and a scrape of any of them reads every front end's
files: totals over all of them. The engine's figures come from the engine's report as with one front end,
the admission gauges from the one shared admission (``gateway.tenancy.coordinator``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from adapters.base import Engine, Finished, Started, TokenEvent
from adapters.stats import CANCEL_LAG_BUCKETS, DECODE_STEP_BUCKETS
from gateway.request_context import RequestInfo

if TYPE_CHECKING:
    from gateway.tenancy.admission import Places

__all__ = ["CONTENT_TYPE", "GenerationObserver", "Metrics"]

# The text format every Prometheus reads (our names are plain ASCII, so 1.0.0's escaping changes nothing);
# Litestar appends the charset.
CONTENT_TYPE = "text/plain; version=0.0.4"
PREFIX = "mlx_gateway"

# A `_created` series beside every counter and histogram doubles what is stored for nothing Prometheus uses
# (the process start is in its own metrics). A switch of the library's, process-wide.
disable_created_metrics()

# Seconds, from 1 ms (a cache hit on a tiny model) to minutes (a long prompt queued behind others on a CPU).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
INTER_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The app's registry: HTTP-side metrics, and a collector reading the engine's counters on scrape.

    Args:
        shared_dir: the folder of every front end's HTTP-side metrics (multiprocess mode; this process must
            have been started with ``PROMETHEUS_MULTIPROC_DIR`` set to it); None: this app's own.
    """

    def __init__(self, engine: Engine, admission: Places, shared_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry()
        # Where this process's HTTP-side metrics live: the exposed registry, or (shared) a registry never read,
        # whose values prometheus_client writes to this process's files in the shared folder.
        r = self.registry if shared_dir is None else CollectorRegistry()
        if shared_dir is not None:
            MultiProcessCollector(self.registry, path=str(shared_dir))
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Seconds from a request's arrival to the end of its response (a stream's last byte)",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Seconds from a generation request's arrival to its first token",
            ["model", "tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Seconds between consecutive tokens of one sequence, as the HTTP side receives them",
            ["model", "tenant"],
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        # A request's phases, named as vLLM names them (serving-architecture notes), and every phase apart for
        # `python -m bench.ttft --breakdown`. Observed per prompt when it finishes.
        self.queue_time = Histogram(
            f"{PREFIX}_request_queue_time_seconds",
            "Seconds from a request's plan (tokens, limits) to the engine's first work on its prompt: the "
            "admission queue, the hop to the engine and the engine's own queue",
            ["model", "tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill_time = Histogram(
            f"{PREFIX}_request_prefill_time_seconds",
            "Seconds from the engine's first work on a prompt to its first sampled token (a batch slot's wait "
            "included)",
            ["model", "tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_time = Histogram(
            f"{PREFIX}_request_decode_time_seconds",
            "Seconds from a prompt's first sampled token to its end, as the HTTP side receives it",
            ["model", "tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Seconds from a generation request's arrival to its last prompt's end",
            ["model", "tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.phases = Histogram(
            f"{PREFIX}_request_phase_seconds",
            "Each phase of a request up to its first token: planning (arrival to plan), admission (plan to a "
            "place in the engine), to_engine (to the engine's queue), engine_queue (to its first work on the "
            "prompt), prefill (to its first sampled token), first_token_out (to the HTTP side)",
            ["model", "phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished prompts", ["model", "tenant"], registry=r
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Tokens generated for finished prompts", ["model", "tenant"], registry=r
        )
        self.cached_tokens = Counter(
            f"{PREFIX}_cached_tokens",
            "Prompt tokens of finished prompts that came from a prefix cache (not computed)",
            ["model", "tenant"],
            registry=r,
        )
        self.registry.register(_EngineCollector(engine, admission))

    def request_finished(self, info: RequestInfo) -> None:
        self.requests.labels(info.route, info.method, str(info.status)).inc()
        self.duration.labels(info.route, info.method).observe(info.seconds)

    def observer(self, model: str, tenant: str, arrived: float, planned: float) -> GenerationObserver:
        return GenerationObserver(self, model, tenant, arrived, planned)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class GenerationObserver:
    """One generation request's latencies and tokens, fed with its engine events as they arrive."""

    def __init__(self, metrics: Metrics, model: str, tenant: str, arrived: float, planned: float) -> None:
        self._metrics, self._model, self._tenant = metrics, model, tenant
        self._ttft = metrics.ttft.labels(model, tenant)
        self._itl = metrics.inter_token.labels(model, tenant)
        self._prompt = metrics.prompt_tokens.labels(model, tenant)
        self._completion = metrics.completion_tokens.labels(model, tenant)
        self._cached = metrics.cached_tokens.labels(model, tenant)
        self._arrived = arrived
        self._planned = planned
        self._admitted = time.perf_counter()  # observers are made once the request holds its place
        self._first: dict[int, float] = {}  # prompt index -> when its first token arrived here
        self._last: dict[tuple[int, int], float] = {}  # (prompt index, choice) -> its last token's time
        self._open = 0

    def event(self, index: int, event: object) -> None:
        now = time.perf_counter()
        if isinstance(event, TokenEvent) and event.token_ids:
            if not self._first:
                self._ttft.observe(now - self._arrived)
            self._first.setdefault(index, now)
            key = (index, event.choice)
            last = self._last.get(key)
            if last is not None:
                self._itl.observe(now - last)
            self._last[key] = now
        elif isinstance(event, Started):
            self._open += 1
        elif isinstance(event, Finished):
            self._prompt.inc(event.prompt_tokens)
            self._completion.inc(event.completion_tokens)
            self._cached.inc(event.cached_tokens)
            self._phases(index, event, now)
            self._open -= 1
            if self._open <= 0:
                self._metrics.e2e.labels(self._model, self._tenant).observe(now - self._arrived)

    def _phases(self, index: int, event: Finished, now: float) -> None:
        if not (event.queued_at and event.scheduled_at and event.first_token_at):
            return  # an engine that does not time its requests
        m, model, tenant = self._metrics, self._model, self._tenant
        first_out = self._first.get(index, now)
        m.queue_time.labels(model, tenant).observe(max(0.0, event.scheduled_at - self._planned))
        m.prefill_time.labels(model, tenant).observe(max(0.0, event.first_token_at - event.scheduled_at))
        m.decode_time.labels(model, tenant).observe(max(0.0, now - event.first_token_at))
        if index:
            return  # a request's phases up to its first token: its first prompt's
        for phase, seconds in (
            ("planning", self._planned - self._arrived),
            ("admission", self._admitted - self._planned),
            ("to_engine", event.queued_at - self._admitted),
            ("engine_queue", event.scheduled_at - event.queued_at),
            ("prefill", event.first_token_at - event.scheduled_at),
            ("first_token_out", first_out - event.first_token_at),
        ):
            m.phases.labels(model, phase).observe(max(0.0, seconds))


class _EngineCollector(Collector):
    """Reads the engine's, the prefix-cache store's and admission's counters at scrape time."""

    def __init__(self, engine: Engine, admission: Places) -> None:
        self.engine = engine
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        yield from self._admission()
        yield from self._engine()
        yield from self._prefix_caches()

    def _admission(self) -> Iterator[Metric]:
        stats = self.admission.stats()
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting for a place in the engine", stats["queued"])
        yield GaugeMetricFamily(
            f"{PREFIX}_queued_prompt_tokens", "Prompt tokens of the requests waiting", stats["queued_tokens"]
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_admitted_requests", "Requests holding a place in the engine (max_running)", stats["running"]
        )

    def _engine(self) -> Iterator[Metric]:
        engine = self.engine
        report = engine.health()
        yield GaugeMetricFamily(
            f"{PREFIX}_engine_up", "1 while the engine thread runs", int(bool(report["engine_alive"]))
        )
        ready = GaugeMetricFamily(f"{PREFIX}_model_ready", "1 when the model is loaded and serving", labels=["model"])
        for info in engine.models():
            ready.add_metric([info.id], int(info.ready))
        yield ready
        yield GaugeMetricFamily(
            f"{PREFIX}_running_requests",
            "Requests in the engine (prefilling or decoding)",
            _number(report, "active_requests"),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_batched_sequences",
            "Sequences (choices) in the continuous batches now",
            _number(report, "batched_sequences"),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_waiting_sequences",
            "Sequences in a batch waiting for a slot or KV room (new, or preempted for another tenant's share)",
            _number(report, "waiting_sequences"),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_preempted_sequences",
            "Sequences taken out of their slot for a tenant below its fair share (they resume later)",
            value=_number(report, "preempted_sequences"),
        )
        memory = GaugeMetricFamily(f"{PREFIX}_memory_bytes", "MLX memory: active, peak and cache", labels=["kind"])
        for kind, value in _mapping(report, "memory").items():
            memory.add_metric([kind.removesuffix("_memory")], float(value))
        yield memory
        reuse = _mapping(report, "automatic_reuse")
        yield CounterMetricFamily(
            f"{PREFIX}_automatic_reuse_hits",
            "Requests started from a same-tenant earlier prompt's KV (performance mode)",
            value=float(reuse.get("hits", 0)),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_automatic_reuse_entries", "Prompts kept for automatic reuse", float(reuse.get("entries", 0))
        )
        kept = _mapping(report, "response_kv")
        yield GaugeMetricFamily(
            f"{PREFIX}_response_kv_bytes",
            "Stored responses' KV in the engine's memory (shared segments of a conversation counted once)",
            float(kept.get("bytes", 0)),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_response_kv_responses", "Stored responses whose KV is in memory", float(kept.get("responses", 0))
        )
        continued = CounterMetricFamily(
            f"{PREFIX}_response_kv_continuations",
            "Requests continuing a stored response (previous_response_id), by whether its KV was in memory",
            labels=["kv"],
        )
        continued.add_metric(["hit"], float(kept.get("hits", 0)))
        continued.add_metric(["miss"], float(kept.get("misses", 0)))
        yield continued
        stats = engine.stats
        outcomes = CounterMetricFamily(
            f"{PREFIX}_engine_requests",
            "Prompts that left the engine, by outcome (completed, cancelled, failed)",
            labels=["model", "outcome"],
        )
        for (model, outcome), n in sorted(stats.requests().items()):
            outcomes.add_metric([model, outcome], n)
        yield outcomes
        steps = HistogramMetricFamily(
            f"{PREFIX}_decode_step_seconds",
            "One decode step: every running sequence of a model's batch (path=batch, without the prefill chunk "
            "the step carried) or one request's choices (path=sequential)",
            labels=["model", "path"],
        )
        for (model, path), times in sorted(stats.step_times().items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, DECODE_STEP_BUCKETS), "+Inf"], times.counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            steps.add_metric([model, path], buckets, times.total)
        yield steps
        batch_steps = CounterMetricFamily(f"{PREFIX}_batch_steps", "Continuous-batch steps", labels=["model"])
        batch_seqs = CounterMetricFamily(
            f"{PREFIX}_batch_sequences",
            "Sequences stepped by continuous-batch steps (divided by batch_steps: the mean batch size)",
            labels=["model"],
        )
        for model, (n, sequences, _) in sorted(stats.batches().items()):
            batch_steps.add_metric([model], n)
            batch_seqs.add_metric([model], sequences)
        yield batch_steps
        yield batch_seqs
        lags = HistogramMetricFamily(
            f"{PREFIX}_cancel_lag_decode_steps",
            "Decode steps of the model between a client going away and its request leaving the engine",
            labels=["model"],
        )
        for model, counts in sorted(stats.cancel_lags().items()):
            cumulative, buckets, total = 0, [], 0.0
            for bound, count in zip([*map(str, CANCEL_LAG_BUCKETS), "+Inf"], counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            lags.add_metric([model], buckets, total)
        yield lags

    def _prefix_caches(self) -> Iterator[Metric]:
        store = self.engine.prefix_store
        if store is None:
            return
        labels = ["model", "tenant"]
        families = {
            "hits": CounterMetricFamily(
                f"{PREFIX}_prefix_cache_hits", "Requests served from a named prefix cache", labels=labels
            ),
            "misses": CounterMetricFamily(
                f"{PREFIX}_prefix_cache_misses",
                "Requests that named a prefix cache and computed their prompt without it (recomputes included)",
                labels=labels,
            ),
            "loads": CounterMetricFamily(f"{PREFIX}_prefix_cache_loads", "KV files read from disk", labels=labels),
            "recomputes": CounterMetricFamily(
                f"{PREFIX}_prefix_cache_recomputes",
                "Cold caches recomputed because reading their file was measured to cost more",
                labels=labels,
            ),
            "count": GaugeMetricFamily(f"{PREFIX}_prefix_caches", "Named prefix caches stored", labels=labels),
            "resident": GaugeMetricFamily(
                f"{PREFIX}_prefix_caches_resident", "Named prefix caches whose KV is in memory", labels=labels
            ),
        }
        size = GaugeMetricFamily(
            f"{PREFIX}_prefix_cache_bytes",
            "Bytes of named prefix caches, on disk and in memory",
            labels=[*labels, "where"],
        )
        for (model, tenant), use in sorted(store.usage().items()):
            for field, family in families.items():
                family.add_metric([model, tenant], getattr(use, field))
            size.add_metric([model, tenant, "disk"], use.bytes_on_disk)
            size.add_metric([model, tenant, "memory"], use.bytes_in_memory)
        yield from families.values()
        yield size


def _number(report: dict[str, object], key: str) -> float:
    value = report.get(key, 0)
    return float(value) if isinstance(value, int | float) else 0.0


def _mapping(report: dict[str, object], key: str) -> dict[str, float]:
    value = report.get(key)
    return {k: v for k, v in value.items() if isinstance(v, int | float)} if isinstance(value, dict) else {}
