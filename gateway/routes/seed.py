"""The seed API, kept working as aliases over the same code as the OpenAI and admin routes."""

from __future__ import annotations

from litestar import Request, Router, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody

from gateway import prefix_service
from gateway.disconnect import unless_client_leaves
from gateway.openapi import GENERATE, MANAGE, READ, CachePath, errors
from gateway.planning import plan_completion
from gateway.request_planning import plan_request
from gateway.schemas.admin import CreatePrefixCache, DeletedPrefixCache, PrefixCacheList, PrefixCacheOut
from gateway.schemas.openai import CompletionRequest, CompletionResponse
from gateway.schemas.seed import SeedCreate, SeedGenerate, SeedGenerated, SeedGenerateWithPrefix
from gateway.serving import serve
from gateway.tenancy.auth import Access, provide_access, provide_tenant

__all__ = ["seed_router"]


@post("/prefix-cache/create", status_code=201, responses=errors(MANAGE))
async def seed_create(
    data: JSONBody[SeedCreate], access: NamedDependency[Access], state: State, request: Request
) -> PrefixCacheOut:
    req = CreatePrefixCache(name=data.cache_name, model=data.model, prompt=data.prefix_prompt, replace=True)
    return await unless_client_leaves(request, prefix_service.create(state.engine, state.config, access.tenant, req))


@get("/prefix-cache/list", responses=errors([400, 401, 500]))
async def seed_list(access: NamedDependency[Access], state: State) -> PrefixCacheList:
    return prefix_service.listing(state.engine, access.tenant)


@delete("/prefix-cache/{name:str}", status_code=200, responses=errors(READ))
async def seed_delete(name: CachePath, access: NamedDependency[Access], state: State) -> DeletedPrefixCache:
    return await prefix_service.delete(state.engine, access.tenant, name)


async def _generate(state: State, tenant: str, data: SeedGenerate, cache_name: str | None) -> SeedGenerated:
    req = CompletionRequest(
        model=data.model,
        prompt=data.prompt,
        max_tokens=data.max_tokens,
        temperature=data.temperature,
        stop=data.stop_strings,
        prefix_cache=cache_name,
    )
    planned, _ = await plan_request(state, plan_completion, req, tenant)
    async with serve(state, planned) as run:
        result = await run.collect("")
    assert isinstance(result, CompletionResponse) and result.usage is not None
    choice = result.choices[0]
    return SeedGenerated(
        id=result.id,
        model=result.model,
        text=choice.text,
        finish_reason=choice.finish_reason,
        usage=result.usage,
        cache_name=cache_name,
    )


@post("/generate", status_code=200, responses=errors(GENERATE))
async def seed_generate(
    data: JSONBody[SeedGenerate], tenant: NamedDependency[str], state: State, request: Request
) -> SeedGenerated:
    return await unless_client_leaves(request, _generate(state, tenant, data, None))


@post("/generate-with-prefix", status_code=200, responses=errors(GENERATE))
async def seed_generate_with_prefix(
    data: JSONBody[SeedGenerateWithPrefix], tenant: NamedDependency[str], state: State, request: Request
) -> SeedGenerated:
    return await unless_client_leaves(request, _generate(state, tenant, data, data.cache_name))


seed_router = Router(
    "/v1",
    route_handlers=[seed_create, seed_list, seed_delete, seed_generate, seed_generate_with_prefix],
    # Managing caches takes `access` (the admin routes' guard); generating takes `tenant`, like /v1/completions.
    dependencies={"access": Provide(provide_access), "tenant": Provide(provide_tenant)},
    tags=["Seed API (aliases)"],
)
