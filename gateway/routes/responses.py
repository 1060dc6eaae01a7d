"""The Responses API routes (``/v1/responses``): thin. Decode, plan as chat, submit, answer; store when asked.

Generation goes through the chat path unchanged (chat planning, ``gateway.serving.Serving``: admission slot, run,
settled tokens; disconnects), so tenants' quotas, auth, backpressure and cancellation apply as they do on
``/v1/chat/completions``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Annotated, Literal

import msgspec
from litestar import Request, Router, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, Parameter
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp

from adapters.base import Engine, ResponseKVUse, common_prefix
from gateway.config import Config
from gateway.disconnect import unless_client_leaves
from gateway.encoding import encode
from gateway.errors import APIError
from gateway.openapi import GENERATE, READ, errors
from gateway.planning import PlannedRequest, plan_chat
from gateway.request_planning import fingerprint_of, plan_request
from gateway.responses.continuation import continued_tokens, sequence_text
from gateway.responses.planning import (
    as_chat,
    assistant_message,
    check_unsupported,
    from_chat,
    input_messages,
    new_response_id,
    rename_param,
    response_of,
    usage_from_chat,
)
from gateway.responses.store import ResponseStore, StoredResponse
from gateway.responses.streaming import OutputEvents
from gateway.schemas.openai import ChatCompletion, ChatCompletionChunk, ChatMessage
from gateway.schemas.responses import (
    DeletedResponse,
    InputItemList,
    InputItemOut,
    Response,
    ResponseErrorBody,
    ResponseEvent,
    ResponsesRequest,
)
from gateway.serving import Running, serve
from gateway.sse import sse_response
from gateway.tenancy.auth import provide_tenant

__all__ = ["responses_router"]

logger = logging.getLogger(__name__)


def _store(state: State) -> ResponseStore:
    """The app's stored responses, made on first use (the event loop owns it)."""
    store = state.get("responses")
    if store is None:
        config: Config = state.config
        store = ResponseStore(config.max_stored_responses, config.response_ttl_seconds, config.cache_path / "responses")
        state["responses"] = store
    return store


class _Turn(msgspec.Struct, kw_only=True):
    """What a request brings to its stored conversation."""

    history: tuple[ChatMessage, ...]
    new: tuple[ChatMessage, ...]
    items: tuple[InputItemOut, ...]


async def _keep(
    state: State,
    tenant: str,
    req: ResponsesRequest,
    turn: _Turn,
    response: Response,
    planned: PlannedRequest,
    output_ids: list[int],
) -> None:
    """Store the response (before its last event or body leaves: a follow-up may come at once, to any replica)."""
    if req.store is False:
        return
    conversation = (*turn.history, *turn.new, assistant_message(response.output))
    plan = planned.plans[0]
    chars, sha = 0, ""
    if planned.prompt_text is not None:
        chars, sha = sequence_text(planned.prompt_text, output_ids, state.engine.tokenizer(plan.model))
    stored = StoredResponse(
        response=response,
        input_items=turn.items,
        conversation=conversation,
        model=plan.model,
        token_ids=(*plan.prompt_tokens, *output_ids),
        text_chars=chars,
        text_sha256=sha,
        stored_at=time.time(),
    )
    engine: Engine = state.engine
    for evicted in await _store(state).put(tenant, stored):
        engine.forget_response(tenant, evicted)


async def _plan(
    state: State, req: ResponsesRequest, tenant: str, response_id: str
) -> tuple[PlannedRequest, _Turn, str]:
    check_unsupported(req)
    parent: StoredResponse | None = None
    history: tuple[ChatMessage, ...] = ()
    if req.previous_response_id is not None:
        parent = await _store(state).get(tenant, req.previous_response_id, param="previous_response_id")
        history = parent.conversation
    new, items = input_messages(req)
    turn = _Turn(history=history, new=tuple(new), items=tuple(items))
    # The stored ids stand for the conversation only under the model that wrote them.
    same = parent if parent is not None and parent.model == req.model else None
    continued: Callable[[str], list[int] | None] | None = None
    if same is not None:
        stored, tokenizer = same, state.engine.tokenizer(req.model)

        def continued_from_stored(text: str) -> list[int] | None:
            return continued_tokens(text, stored.token_ids, stored.text_chars, stored.text_sha256, tokenizer)

        continued = continued_from_stored

    # A thinking model's reasoning becomes its own output item, never the answer's text.
    planner = partial(plan_chat, reasoning=True, continued=continued)
    try:
        planned, info = await plan_request(state, planner, as_chat(req, turn.history, turn.new), tenant)
    except APIError as exc:
        raise rename_param(exc) from None
    plan = planned.plans[0]
    reuse = 0
    if same is not None:
        reuse = min(common_prefix(plan.prompt_tokens, same.token_ids), len(plan.prompt_tokens) - 1)
    use = ResponseKVUse(
        parent=req.previous_response_id if reuse > 0 else None,
        reuse=reuse,
        keep_as=None if req.store is False else response_id,
    )
    planned = dataclasses.replace(planned, plans=(dataclasses.replace(plan, response_kv=use),))
    fingerprint = fingerprint_of(info)
    return planned, turn, fingerprint


async def _serve(state: State, req: ResponsesRequest, tenant: str) -> ASGIApp:
    response_id, created = new_response_id(req.previous_response_id), int(time.time())
    planned, turn, fingerprint = await _plan(state, req, tenant, response_id)
    logger.info(
        "response %s model=%s prompt_tokens=%d stream=%s",
        response_id,
        planned.model,
        len(planned.plans[0].prompt_tokens),
        planned.stream,
    )
    config: Config = state.config
    async with serve(state, planned) as run:
        if planned.stream:
            events = _events(state, tenant, req, turn, run.chunks(fingerprint), run.running, response_id, created)
            return sse_response(
                events,
                request_id=planned.id,
                ping_seconds=config.sse_ping_seconds,
                send_timeout=config.sse_send_timeout_seconds,
                on_close=run.close,
            )
        completion = await run.collect(fingerprint)
    assert isinstance(completion, ChatCompletion)
    response = from_chat(req, response_id, created, completion)
    await _keep(state, tenant, req, turn, response, planned, run.running.output_ids)
    return ASGIResponse(body=encode(response), media_type="application/json")


async def _events(
    state: State,
    tenant: str,
    req: ResponsesRequest,
    turn: _Turn,
    chunks: AsyncIterator[msgspec.Struct],
    running: Running,
    response_id: str,
    created: int,
) -> AsyncIterator[msgspec.Struct]:
    """The typed events in order, each with its ``sequence_number``; a failure is ``response.failed``. ``chunks``
    (``Serving.chunks``) leave the run once they end: its slot is given back before the response is stored and
    its last event sent."""
    out = OutputEvents()
    progress = response_of(req, response_id, created, status="in_progress")
    yield ResponseEvent(type="response.created", sequence_number=out.seq(), response=progress)
    yield ResponseEvent(type="response.in_progress", sequence_number=out.seq(), response=progress)
    finish: str | None = None
    usage = None
    try:
        async for chunk in chunks:
            assert isinstance(chunk, ChatCompletionChunk)
            if chunk.usage is not None:
                usage = chunk.usage
            for event in out.feed(chunk):
                yield event
            finish = next((c.finish_reason for c in chunk.choices if c.finish_reason is not None), finish)
    except APIError as exc:
        logger.warning("[%s] response failed: %s", response_id, exc.message)
        failed = response_of(req, response_id, created, status="failed")
        failed.error = ResponseErrorBody(code=exc.code or "server_error", message=exc.message)
        yield ResponseEvent(type="response.failed", sequence_number=out.seq(), response=failed)
        return
    incomplete = finish == "length"
    for event in out.close(incomplete):
        yield event
    final = response_of(
        req,
        response_id,
        created,
        status="incomplete" if incomplete else "completed",
        output=out.output,
        usage=None if usage is None else usage_from_chat(usage),
    )
    await _keep(state, tenant, req, turn, final, running.planned, running.output_ids)
    kind = "response.incomplete" if incomplete else "response.completed"
    yield ResponseEvent(type=kind, sequence_number=out.seq(), response=final)


@post(
    "/responses",
    status_code=200,
    responses={200: ResponseSpec(data_container=Response, description="A response, or SSE events"), **errors(GENERATE)},
)
async def create_response(
    data: JSONBody[ResponsesRequest], tenant: NamedDependency[str], state: State, request: Request
) -> ASGIApp:
    return await unless_client_leaves(request, _serve(state, data, tenant))


@get("/responses/{response_id:str}", responses=errors(READ))
async def get_response(response_id: FromPath[str], state: State, tenant: NamedDependency[str]) -> Response:
    return (await _store(state).get(tenant, response_id)).response


@delete("/responses/{response_id:str}", status_code=200, responses=errors(READ))
async def delete_response(response_id: FromPath[str], state: State, tenant: NamedDependency[str]) -> DeletedResponse:
    await _store(state).delete(tenant, response_id)
    engine: Engine = state.engine
    engine.forget_response(tenant, response_id)  # its KV goes with it
    return DeletedResponse(id=response_id)


@get("/responses/{response_id:str}/input_items", responses=errors(READ))
async def list_input_items(
    response_id: FromPath[str],
    state: State,
    tenant: NamedDependency[str],
    limit: Annotated[int, Parameter(ge=1, le=100, description="At most this many items")] = 20,
    order: Annotated[Literal["asc", "desc"], Parameter(description="By position in the input")] = "desc",
    after: Annotated[str | None, Parameter(description="List the items after this item id")] = None,
) -> InputItemList:
    items = list((await _store(state).get(tenant, response_id)).input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [i.id for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return InputItemList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(items) > len(page),
    )


responses_router = Router(
    "/v1",
    route_handlers=[create_response, get_response, delete_response, list_input_items],
    dependencies={"tenant": Provide(provide_tenant)},
    tags=["Responses"],
)
