"""Planning a request against this app's config and engine: which model it names (404 if none), its tokenizer,
and the planning itself off the event loop; what every generating route (chat, completions, responses, the seed
aliases) starts with."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import anyio.to_thread
from litestar.datastructures import State

from adapters.base import ModelInfo
from gateway import adapter_service
from gateway.planning import PlannedRequest, check_kv_budget
from gateway.request_context import current_request_id, mark_planned

__all__ = ["fingerprint_of", "plan_request"]


async def plan_request(
    state: State, planner: Callable[..., PlannedRequest], data: Any, tenant: str
) -> tuple[PlannedRequest, ModelInfo]:
    """Plan ``data`` (tokenising, rendering, prefix matching) off the event loop; the plan and its model."""
    model, info = await adapter_service.resolve(state.engine, state.config, data.model, tenant)
    tokenizer = state.engine.tokenizer(data.model)
    planned = await anyio.to_thread.run_sync(
        partial(
            planner,
            data,
            tokenizer,
            model,
            info.context_length,
            tenant,
            state.engine.prefix_store,
            request_id=current_request_id.get(),
        )
    )
    check_kv_budget(planned, info)
    mark_planned()
    return planned, info


def fingerprint_of(info: ModelInfo) -> str:
    """The ``system_fingerprint`` answers carry: the model's weights and config, as OpenAI names a backend."""
    return f"fp_{info.fingerprint[:12]}" if info.fingerprint else "fp_unknown"
