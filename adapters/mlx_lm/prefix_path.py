"""Where a request's KV starts from, and where prefix KV goes: named prefix caches (hits, misses, cold
caches recomputed when reading them was measured dearer, rebuilds of stale ones, builds), stored responses'
KV (``previous_response_id``), automatic reuse within a tenant (performance mode), and the measured prefill
rate that decides cold caches. Engine thread only."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from adapters.base import BuildProgress, EngineError, Failed, PrefixBuildRefused, PrefixBuilt, Started, StorageFull
from adapters.mlx_lm.models import LoadedModel
from adapters.mlx_lm.prefill import prefill_chunk, prefill_step
from adapters.mlx_lm.prefix_kv import exact_prefix, library_version, new_manifest
from adapters.mlx_lm.response_kv import ResponseKV
from adapters.mlx_lm.reuse import TenantReuse
from adapters.mlx_lm.work import Build, Request, log_extra
from adapters.stats import EngineStats
from prefix_caches import kv
from prefix_caches.costs import MIN_PREFILL_SAMPLE_TOKENS, Rate, cheaper_to_recompute
from prefix_caches.errors import (
    PrefixCacheError,
    PrefixCacheExists,
    PrefixCacheNotFound,
    PrefixCacheQuotaExceeded,
    PrefixCacheStorageFull,
    PrefixCacheUnusable,
)
from prefix_caches.manifest import Manifest
from prefix_caches.store import PrefixCacheStore

__all__ = ["PrefixPath"]

logger = logging.getLogger(__name__)


class PrefixPath:
    """One engine's prefix caches and reuse. ``queue`` hands a build (or its next chunk) to the engine's turns."""

    def __init__(
        self,
        store: PrefixCacheStore | None,
        stats: EngineStats,
        queue: Callable[[Build], None],
        responses: ResponseKV,
    ) -> None:
        self.store = store
        self.stats = stats
        self.reuse = TenantReuse()
        self.responses = responses
        # Seconds per prompt token, per model, measured on evaluated prefill chunks (decides cold caches).
        self._rates: dict[str, Rate] = {}
        self._queue = queue

    def attach(self, request: Request) -> None:
        """Give the request its own view of its named prefix cache, or a fresh cache on a miss."""
        request.scheduled_at = time.perf_counter()
        use, store = request.plan.prefix, self.store
        if request.plan.response_kv is not None and request.plan.response_kv.parent is not None:
            self._continue_response(request)
            return
        if use is None and request.model.spec.isolation_mode == "performance" and self._reuse_hit(request):
            return
        if use is None or store is None:
            request.cache = request.model.make_cache()
            request.emit(Started(0))
            return
        start = time.perf_counter()
        try:
            manifest = store.get(use.tenant, use.name)
            if not store.is_resident(manifest) and self._recompute_cold(request, manifest, use.reuse):
                return
            stored, resident = store.arrays(manifest)
            request.cache = kv.view(stored, use.reuse, dequantize=True)
        except PrefixCacheError as exc:
            reason = str(exc)
            if isinstance(exc, PrefixCacheUnusable):
                logger.warning(
                    "prefix cache %s unusable, recomputing: %s", use.name, reason, extra=log_extra(request.plan)
                )
                store.set_status(use.tenant, use.name, "invalid", reason)
                self.queue_rebuild(request.model, use.tenant, use.name)
            store.record_miss(request.plan.model, use.tenant)
            request.cache = request.model.make_cache()
            request.emit(Started(0, prefix_miss_reason=reason))
            return
        request.prefilled = use.reuse
        request.cached_tokens = use.reuse
        store.record_hit(use.tenant, use.name)
        load_ms = (time.perf_counter() - start) * 1000
        request.emit(Started(use.reuse, True, resident, load_ms))

    def _continue_response(self, request: Request) -> None:
        """Start from the previous response's KV; without it (evicted, expired, never kept) prefill the whole
        prompt, whose first tokens are the stored sequence's ids: the same answer, only slower."""
        plan = request.plan
        use = plan.response_kv
        assert use is not None and use.parent is not None
        start = time.perf_counter()
        reuse = min(use.reuse, len(plan.prompt_tokens) - 1)
        found = self.responses.view(request.model.fingerprint, plan.tenant, use.parent, reuse)
        if found is None:
            request.cache = request.model.make_cache()
            request.emit(Started(0, prefix_miss_reason="the previous response's KV is not in memory: recomputed"))
            return
        request.cache, reuse = found
        request.prefilled = request.cached_tokens = reuse
        request.emit(Started(reuse, True, True, (time.perf_counter() - start) * 1000))

    def keep_response(self, request: Request, cache: list[Any] | None) -> None:
        """Keep a stored response's whole sequence (prompt and output) for its continuations."""
        plan = request.plan
        use = plan.response_kv
        if use is None or use.keep_as is None or cache is None:
            return
        reused = request.cached_tokens if use.parent is not None else 0
        try:
            self.responses.keep(request.model.fingerprint, plan.tenant, use.keep_as, cache, use.parent, reused)
        except Exception:  # keeping is an optimisation: the answer has been given either way
            logger.exception("response %s: KV not kept", use.keep_as, extra=log_extra(plan))

    def calibrate(self, loaded: LoadedModel) -> None:
        """Time one prefill chunk at start-up (after one that compiles the kernels), so that the first cold
        cache is already decided by measured costs; traffic refines the rate later."""
        if self.store is None:
            return
        tokens = [i % min(loaded.vocab_size, 1000) for i in range(prefill_step(loaded))]
        for timed in (False, True):
            part = prefill_chunk(loaded, tokens, loaded.make_cache(), 0, quantize=False, evaluate_last=True)
            if timed and part.seconds is not None:
                # Added whatever the chunk's length (record_prefill's floor is for traffic's short chunks):
                # one sample is better than none, and traffic refines it.
                self.rate(loaded).add(part.tokens, part.seconds)
        rate = self.rate(loaded).per_second() or 0.0
        logger.info("model %s: prefill measured at %.0f tokens/s", loaded.spec.name, rate)

    def rate(self, loaded: LoadedModel) -> Rate:
        """The model's measured prefill rate, to add samples to (engine thread)."""
        return self._rates.setdefault(loaded.spec.name, Rate())

    def prefill_seconds_per_token(self, model: str) -> float | None:
        """The model's measured prefill cost, seconds per prompt token; None until measured (calibration
        at load, when prefix caches are on, then every timed prefill chunk). A float read: any thread."""
        rate = self._rates.get(model)
        return None if rate is None else rate.seconds_per_unit

    def _recompute_cold(self, request: Request, manifest: Manifest, reuse: int) -> bool:
        """Serve a cold cache by recomputing its tokens when reading its file was measured to cost more.

        On a GPU, re-reading hundreds of MB of KV can take longer than the prefill it replaces; the request
        then prefills the whole prompt and the prefix KV it computes becomes the resident copy.
        """
        store = self.store
        assert store is not None
        load = store.estimated_load_seconds(manifest)
        prefill = self.rate(request.model).estimate(reuse)
        if not cheaper_to_recompute(load, prefill):
            return False
        assert load is not None and prefill is not None
        reason = (
            f"recomputed (reading {manifest.size_bytes / 1e6:.0f} MB ~{load * 1000:.0f} ms > "
            f"prefilling {reuse} tokens ~{prefill * 1000:.0f} ms)"
        )
        logger.info("prefix cache %s is cold: %s", manifest.name, reason, extra=log_extra(request.plan))
        store.record_recompute(manifest.model, manifest.tenant)
        request.cache = request.model.make_cache()
        request.recomputing = manifest
        request.emit(Started(0, prefix_miss_reason=reason))
        return True

    def keep_recomputed(self, request: Request, cache: list[Any] | None) -> None:
        manifest, request.recomputing = request.recomputing, None
        if manifest is None or cache is None or self.store is None:
            return
        n = manifest.num_tokens
        if tuple(request.plan.prompt_tokens[:n]) != tuple(manifest.tokens):
            return
        prefix = exact_prefix(cache, n)
        if prefix is None:
            return
        if manifest.kv_bits:
            prefix = kv.quantize(prefix, manifest.kv_bits, manifest.kv_group_size)
        self.store.keep_recomputed(manifest, prefix)

    def _reuse_hit(self, request: Request) -> bool:
        """performance mode: start from this tenant's longest matching earlier prompt, if any."""
        plan = request.plan
        found = self.reuse.find(request.model.fingerprint, plan.tenant, plan.prompt_tokens)
        if found is None:
            return False
        cache, common = found
        reuse = min(common, len(plan.prompt_tokens) - 1)
        request.cache = kv.view(cache, reuse)
        request.prefilled = request.cached_tokens = reuse
        request.emit(Started(reuse))
        return True

    def keep_for_reuse(self, request: Request, cache: list[Any] | None) -> None:
        plan = request.plan
        if cache is None or plan.prefix is not None or request.model.spec.isolation_mode != "performance":
            return
        prefix = exact_prefix(cache, len(plan.prompt_tokens))
        if prefix is not None:
            self.reuse.add(request.model.fingerprint, plan.tenant, plan.prompt_tokens, prefix)

    # ---- prefix-cache builds -------------------------------------------------------------------

    def build_turn(self, build: Build) -> None:
        manifest = build.manifest
        store = self.store
        assert store is not None
        if build.cancelled.is_set():
            logger.info("prefix cache build %s cancelled", manifest.name, extra={"request_id": build.request_id})
            _mark_failed(store, manifest, "build cancelled")
            return
        try:
            if build.cache is None:
                build.cache = build.model.make_cache()
            tokens = manifest.tokens
            # Full precision while building (quantised once, when saved); every chunk evaluated, the last
            # one too: its KV is saved, not sampled from.
            part = prefill_chunk(build.model, tokens, build.cache, build.prefilled, quantize=False, evaluate_last=True)
            if part.seconds is not None:
                self.record_prefill(build.model, part.tokens, part.seconds)
            build.prefilled = part.done
            logger.info(
                "prefix cache %s: %d/%d tokens",
                manifest.name,
                build.prefilled,
                len(tokens),
                extra={"request_id": build.request_id},
            )
            build.emit(BuildProgress(build.prefilled, len(tokens)))
            if build.prefilled < len(tokens):
                self._queue(build)
                return
            cache = kv.exact(build.cache)
            if manifest.kv_bits:
                cache = kv.quantize(cache, manifest.kv_bits, manifest.kv_group_size)
            seconds = time.perf_counter() - build.started
            manifest.build_seconds = seconds
            saved = store.save(manifest, cache, replace=build.replace)
            logger.info(
                "prefix cache %s built: %d tokens, %d bytes, %.2fs",
                manifest.name,
                len(tokens),
                saved.size_bytes,
                seconds,
                extra={"request_id": build.request_id},
            )
            build.emit(PrefixBuilt(saved, seconds))
        except (PrefixCacheQuotaExceeded, PrefixCacheExists) as exc:
            # A replaced cache stays as it was, usable: its status is not touched.
            logger.info("prefix cache %s refused: %s", manifest.name, exc, extra={"request_id": build.request_id})
            build.emit(Failed(PrefixBuildRefused(exc)))
        except PrefixCacheStorageFull as exc:
            logger.error("prefix cache %s not saved: %s", manifest.name, exc, extra={"request_id": build.request_id})
            _mark_failed(store, manifest, f"build failed: {exc}")
            build.emit(Failed(StorageFull(str(exc))))
        except Exception as exc:
            logger.exception("prefix cache build %s failed", manifest.name, extra={"request_id": build.request_id})
            _mark_failed(store, manifest, f"build failed: {exc}")
            build.emit(Failed(EngineError(f"{type(exc).__name__}: {exc}")))

    def check_stored(self, loaded: LoadedModel) -> None:
        """Stored caches built for other weights or library versions are never used: rebuild them."""
        if self.store is None:
            return

        for manifest in self.store.all():
            if manifest.model != loaded.spec.name:
                continue
            reasons = []
            if manifest.model_fingerprint != loaded.fingerprint:
                reasons.append("the model's weights or config changed")
            if manifest.mlx_version != library_version("mlx") or manifest.mlx_lm_version != library_version("mlx-lm"):
                reasons.append(f"written by mlx {manifest.mlx_version} / mlx-lm {manifest.mlx_lm_version}")
            status = self.store.status(manifest.tenant, manifest.name)
            if reasons or status.state != "ready":
                reason = "; ".join(reasons) or status.reason or status.state
                logger.warning("prefix cache %s is stale (%s): rebuilding", manifest.name, reason)
                self.store.set_status(manifest.tenant, manifest.name, "stale", reason)
                self.queue_rebuild(loaded, manifest.tenant, manifest.name)

    def queue_rebuild(self, loaded: LoadedModel, tenant: str, name: str) -> None:
        """Rebuild from the manifest: its tokens where the tokenizer is the same, else its source text."""
        store = self.store
        assert store is not None
        try:
            old = store.get(tenant, name)
        except PrefixCacheNotFound:
            return
        tokens = list(old.tokens)
        if old.tokenizer_fingerprint != loaded.tokenizer_fingerprint or (
            old.source == "messages" and old.chat_template_fingerprint != loaded.chat_template_fingerprint
        ):
            tok = loaded.tokenizer
            if old.source == "messages" and old.messages is not None:
                tokens = tok.encode(tok.render_chat(old.messages, add_generation_prompt=False))
            elif old.prompt is not None:
                tokens = tok.encode(old.prompt)
            else:
                store.set_status(tenant, name, "invalid", "built from token ids for another tokenizer")
                return
        manifest = new_manifest(
            loaded, tenant, name, old.source, tokens, old.prompt, old.messages, old.kv_bits, old.kv_group_size
        )
        store.set_status(tenant, name, "building", "rebuilding")
        self._queue(Build(manifest, loaded, _drop))

    def record_prefill(self, loaded: LoadedModel, tokens: int, seconds: float) -> None:
        if tokens >= MIN_PREFILL_SAMPLE_TOKENS:
            self.rate(loaded).add(tokens, seconds)


def _mark_failed(store: PrefixCacheStore, manifest: Manifest, reason: str) -> None:
    """A failed rebuild leaves its cache invalid; a failed replace of a ready cache leaves that cache as it
    was (a save never touches the old version's files before it commits)."""
    if store.status(manifest.tenant, manifest.name).state != "ready":
        store.set_status(manifest.tenant, manifest.name, "invalid", reason)


def _drop(_: Any) -> None:
    """The emitter of builds nobody listens to (rebuilds)."""
