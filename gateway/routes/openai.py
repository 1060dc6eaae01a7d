"""The OpenAI routes: thin. Decode, plan, submit, return."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from litestar import Request, Router, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp

from adapters.base import ModelInfo
from gateway import adapter_service
from gateway.config import Config
from gateway.disconnect import unless_client_leaves
from gateway.encoding import encode
from gateway.openapi import GENERATE, errors
from gateway.planning import PlannedRequest, plan_chat, plan_completion
from gateway.request_planning import fingerprint_of, plan_request
from gateway.schemas.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    CompletionResponse,
    Model,
    ModelList,
)
from gateway.serving import prefix_header, serve
from gateway.sse import sse_response
from gateway.tenancy.auth import provide_tenant

__all__ = ["openai_router"]

logger = logging.getLogger(__name__)


async def _respond(state: State, planned: PlannedRequest, info: ModelInfo) -> ASGIApp:
    config: Config = state.config
    headers: dict[str, str] = {}  # x-request-id: gateway.request_context, on every response
    logger.info(
        "%s %s model=%s prompts=%d prompt_tokens=%s n=%d stream=%s",
        planned.kind,
        planned.id,
        planned.model,
        len(planned.plans),
        ",".join(str(len(p.prompt_tokens)) for p in planned.plans),
        planned.n,
        planned.stream,
    )
    async with serve(state, planned) as run:
        if planned.prefix_name is not None:
            # The x-prefix-cache header says what the cache gave: wait for the engine to admit the request.
            header = prefix_header(planned, await run.running.wait_started())
            if header:
                headers["x-prefix-cache"] = header
        if planned.stream:
            return sse_response(
                run.chunks(fingerprint_of(info)),
                request_id=planned.id,
                ping_seconds=config.sse_ping_seconds,
                send_timeout=config.sse_send_timeout_seconds,
                headers=headers,
                on_close=run.close,
            )
        body = await run.collect(fingerprint_of(info))
    return ASGIResponse(body=encode(body), media_type="application/json", headers=headers)


async def _serve(
    state: State, planner: Callable[..., PlannedRequest], data: ChatCompletionRequest | CompletionRequest, tenant: str
) -> ASGIApp:
    """Plan, then answer: the whole answer, or a stream once the request has its place (and, when it names a
    prefix cache, once the engine admitted it). A client that leaves before then cancels this."""
    planned, info = await plan_request(state, planner, data, tenant)
    return await _respond(state, planned, info)


@post(
    "/chat/completions",
    status_code=200,
    responses={
        200: ResponseSpec(data_container=ChatCompletion, description="A chat completion, or SSE chunks"),
        **errors(GENERATE),
    },
)
async def chat_completions(
    data: JSONBody[ChatCompletionRequest], tenant: NamedDependency[str], state: State, request: Request
) -> ASGIApp:
    # Chat shows a thinking model's reasoning apart, as reasoning_content.
    planner = partial(plan_chat, reasoning=True)
    return await unless_client_leaves(request, _serve(state, planner, data, tenant))


@post(
    "/completions",
    status_code=200,
    responses={
        200: ResponseSpec(data_container=CompletionResponse, description="A completion, or SSE chunks"),
        **errors(GENERATE),
    },
)
async def completions(
    data: JSONBody[CompletionRequest], tenant: NamedDependency[str], state: State, request: Request
) -> ASGIApp:
    return await unless_client_leaves(request, _serve(state, plan_completion, data, tenant))


def _model_out(info: ModelInfo) -> Model:
    if info.parent is None:
        return Model(id=info.id, created=info.created, owned_by=info.owned_by)
    return Model(id=info.id, created=info.created, owned_by=info.owned_by, parent=info.parent, root=info.parent)


@get("/models", responses=errors([401, 500]))
async def list_models(state: State, tenant: NamedDependency[str]) -> ModelList:
    models = await adapter_service.synced_models(state.engine, state.config)
    return ModelList(data=[_model_out(m) for m in models if adapter_service.visible(m, tenant)])


@get("/models/{model_id:path}", responses=errors([400, 401, 404, 500, 503]))
async def get_model(model_id: FromPath[str], state: State, tenant: NamedDependency[str]) -> Model:
    _, info = await adapter_service.resolve(state.engine, state.config, model_id.lstrip("/"), tenant)
    return _model_out(info)


openai_router = Router(
    "/v1",
    route_handlers=[chat_completions, completions, list_models, get_model],
    dependencies={"tenant": Provide(provide_tenant)},
    tags=["OpenAI"],
)
