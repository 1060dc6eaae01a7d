"""Named prefix caches as the API sees them: create (at once or with streamed progress), list, get, warm,
delete. The admin routes and the seed API's aliases both call these."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio.to_thread

from adapters.base import (
    BuildEvent,
    BuildProgress,
    Engine,
    Failed,
    PrefixBuild,
    PrefixBuilt,
)
from gateway import adapter_service
from gateway.config import Config
from gateway.errors import (
    BuildFailed,
    Conflict,
    ContextLengthExceeded,
    InvalidRequest,
    QuotaExceeded,
    ServerError,
    failure,
)
from gateway.limits import check_prompt_chars
from gateway.planning import message_dicts
from gateway.request_context import current_request_id
from gateway.schemas.admin import (
    CreatePrefixCache,
    DeletedPrefixCache,
    PrefixCacheList,
    PrefixCacheOut,
    PrefixCacheProgress,
    WarmedPrefixCache,
)
from prefix_caches import Manifest, PrefixCacheStore, validate_name

__all__ = ["create", "create_streamed", "delete", "describe", "get", "listing", "warm"]

logger = logging.getLogger(__name__)


def _store(engine: Engine) -> PrefixCacheStore:
    store = engine.prefix_store
    if store is None:
        raise InvalidRequest("Prefix caches are not enabled on this server")
    return store


def describe(store: PrefixCacheStore, m: Manifest, integrity: dict[str, Any] | None = None) -> PrefixCacheOut:
    status = store.status(m.tenant, m.name)
    return PrefixCacheOut(
        id=m.name,
        model=m.model,
        status=status.state,
        status_reason=status.reason,
        source=m.source,
        num_tokens=m.num_tokens,
        tokens_sha256=m.tokens_sha256,
        version=m.version,
        kv_bits=m.kv_bits,
        kv_group_size=m.kv_group_size,
        dtype=m.dtype,
        size_bytes=m.size_bytes,
        created_at=m.created_at,
        last_used_at=m.last_used_at,
        hits=m.hits,
        build_seconds=m.build_seconds,
        model_fingerprint=m.model_fingerprint,
        adapter_fingerprint=m.adapter_fingerprint or None,
        mlx_version=m.mlx_version,
        mlx_lm_version=m.mlx_lm_version,
        integrity=integrity,
    )


def _tokens(engine: Engine, req: CreatePrefixCache) -> tuple[list[int], dict[str, Any]]:
    tokenizer = engine.tokenizer(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("Give exactly one of 'prompt' and 'messages'", param="prompt")
    source: dict[str, Any]
    context = next(m.context_length for m in engine.models() if m.id == req.model)
    if req.messages is not None:
        if not req.messages:
            raise InvalidRequest("'messages' must contain at least one message", param="messages")
        dicts = message_dicts(req.messages)
        try:
            text = tokenizer.render_chat(dicts, add_generation_prompt=False)
        except Exception as exc:
            raise InvalidRequest(f"The model's chat template rejected the messages: {exc}", param="messages") from exc
        check_prompt_chars(text, context, "messages")
        tokens = tokenizer.encode(text)
        source = {"source": "messages", "messages": tuple(dicts)}
    elif isinstance(req.prompt, str):
        check_prompt_chars(req.prompt, context, "prompt")
        tokens = tokenizer.encode(req.prompt)
        source = {"source": "prompt", "prompt": req.prompt}
    else:
        tokens = list(req.prompt or [])
        bad = next((t for t in tokens if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"Token id {bad} is outside the vocabulary", param="prompt")
        source = {"source": "prompt", "prompt": None}
    if not tokens:
        raise InvalidRequest("The prefix is empty", param="prompt" if req.prompt is not None else "messages")
    if len(tokens) >= context:
        raise ContextLengthExceeded(
            f"The prefix is {len(tokens)} tokens; this model's context is {context}, and a request needs at "
            "least one more token",
            param="prompt" if req.prompt is not None else "messages",
        )
    return tokens, source


async def _start_build(
    engine: Engine, config: Config, tenant: str, req: CreatePrefixCache
) -> tuple[PrefixCacheStore, AsyncIterator[BuildEvent]]:
    store = _store(engine)
    validate_name(req.name)
    await anyio.to_thread.run_sync(store.check_new, tenant, req.name, req.replace)
    await adapter_service.resolve(engine, config, req.model, tenant)  # 404 for another tenant's adapter
    tokens, source = await anyio.to_thread.run_sync(_tokens, engine, req)
    job = PrefixBuild(
        request_id=current_request_id.get() or f"pc-{uuid.uuid4().hex[:12]}",
        model=req.model,
        tenant=tenant,
        name=req.name,
        tokens=tuple(tokens),
        kv_bits=req.kv_bits,
        kv_group_size=req.kv_group_size,
        replace=req.replace,
        **source,
    )
    logger.info("building prefix cache %s (%d tokens, model %s)", req.name, len(tokens), req.model)
    return store, engine.build_prefix(job)


def _built(store: PrefixCacheStore, event: BuildEvent) -> PrefixCacheOut | None:
    """The cache once ``event`` says it is built; None while it is being prefilled. A failure is raised as
    ``gateway.errors`` declares it (a full disk, a quota's refusal; else a 500 saying the build failed)."""
    if isinstance(event, Failed):
        raise failure(event.error, BuildFailed)
    if isinstance(event, PrefixBuilt):
        return describe(store, event.manifest)
    return None


async def create(engine: Engine, config: Config, tenant: str, req: CreatePrefixCache) -> PrefixCacheOut:
    store, events = await _start_build(engine, config, tenant, req)
    try:
        async for event in events:
            built = _built(store, event)
            if built is not None:
                return built
    finally:  # an error, or the client left (gateway.disconnect): closing the engine's events cancels the build
        await _close(events)
    raise ServerError("The prefix cache build ended without a result")


async def create_streamed(
    engine: Engine, config: Config, tenant: str, req: CreatePrefixCache
) -> AsyncIterator[PrefixCacheProgress | PrefixCacheOut]:
    """The build's progress, then the cache. Every error known before the build starts, and the engine's
    refusal of it (model loading, KV settings), is raised here, before the first byte is sent."""
    store, events = await _start_build(engine, config, tenant, req)
    try:
        first = await anext(events)
        built = _built(store, first)
    except BaseException:
        await _close(events)
        raise
    return _progress(store, req.name, first, built, events)


async def _progress(
    store: PrefixCacheStore,
    name: str,
    event: BuildEvent,
    built: PrefixCacheOut | None,
    events: AsyncIterator[BuildEvent],
) -> AsyncIterator[PrefixCacheProgress | PrefixCacheOut]:
    # Closing this stream early (the client went away) closes the engine's, which cancels the build.
    try:
        while built is None:
            if isinstance(event, BuildProgress):
                yield PrefixCacheProgress(id=name, done=event.done, total=event.total)
            following = await anext(events, None)
            if following is None:
                raise ServerError("The prefix cache build ended without a result")
            event = following
            built = _built(store, event)
        yield built
    finally:
        await _close(events)


async def _close(events: AsyncIterator[BuildEvent]) -> None:
    if isinstance(events, AsyncGenerator):
        await events.aclose()


async def warm(engine: Engine, tenant: str, name: str) -> WarmedPrefixCache:
    store = _store(engine)
    warmed = await engine.warm_prefix(tenant, name)
    quota = store.quota_of(tenant).max_memory_bytes
    if not warmed.resident and quota is not None and warmed.bytes_in_memory > quota:
        raise QuotaExceeded(
            f"The prefix cache '{name}' takes {warmed.bytes_in_memory} bytes in memory, more than tenant "
            f"'{tenant}' may keep resident ({quota} bytes): requests read it from disk each time.",
            param="name",
            code="prefix_cache_memory_quota",
        )
    if not warmed.resident:
        raise Conflict(
            f"The prefix cache '{name}' takes {warmed.bytes_in_memory} bytes in memory, more than the whole "
            f"prefix-cache memory budget ({store.memory_budget} bytes): requests read it from disk each time. "
            "Raise prefix_cache_memory_bytes to keep it resident.",
            param="name",
            code="prefix_cache_over_memory_budget",
        )
    return WarmedPrefixCache(
        id=name,
        was_resident=warmed.was_resident,
        load_ms=round(warmed.seconds * 1000, 3),
        bytes_in_memory=warmed.bytes_in_memory,
    )


def listing(engine: Engine, tenant: str) -> PrefixCacheList:
    store = _store(engine)
    return PrefixCacheList(data=[describe(store, m) for m in store.list(tenant)])


async def get(engine: Engine, tenant: str, name: str, verify: bool) -> PrefixCacheOut:
    store = _store(engine)
    manifest = store.get(tenant, name)
    integrity = await engine.verify_prefix(tenant, name) if verify else None
    return describe(store, manifest, integrity)


async def delete(engine: Engine, tenant: str, name: str) -> DeletedPrefixCache:
    store = _store(engine)
    await anyio.to_thread.run_sync(store.delete, tenant, name)
    return DeletedPrefixCache(id=name)
