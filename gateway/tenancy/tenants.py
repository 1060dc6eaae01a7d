"""Each tenant's use against its quotas, for ``GET /admin/tenants`` and the admin's view of ``/health``."""

from __future__ import annotations

from collections import Counter

from adapters.base import Engine
from gateway.config import Config
from gateway.schemas.admin import TenantList, TenantOut, TenantUse
from gateway.tenancy.admission import Places

__all__ = ["tenant_report"]


async def tenant_report(config: Config, admission: Places, engine: Engine) -> TenantList:
    """Every tenant the config names (keys, quotas, the default) or that holds caches, by name: as they stand
    now (an engine in its own process reports its caches' use every half second unasked, and admission shared by
    several API servers is the coordinator's)."""
    await engine.refresh()
    await admission.refresh()
    store = engine.prefix_store
    caches: Counter[str] = Counter()
    disk: Counter[str] = Counter()
    memory: Counter[str] = Counter()
    for (_, tenant), use in (store.usage() if store is not None else {}).items():
        caches[tenant] += use.count
        disk[tenant] += use.bytes_on_disk
        memory[tenant] += use.bytes_in_memory
    kept = engine.response_kv_bytes()
    names = {config.default_tenant, *config.api_keys.values(), *config.tenants, *caches, *kept}
    out = []
    for tenant in sorted(names):
        held = admission.tenant_use(tenant)
        use = TenantUse(
            prefix_caches=caches[tenant],
            prefix_cache_disk_bytes=disk[tenant],
            prefix_cache_memory_bytes=memory[tenant],
            response_kv_bytes=kept.get(tenant, 0),
            requests_in_progress=held["requests_in_progress"],
            queued_tokens=held["queued_tokens"],
            requests_last_minute=held["requests_last_minute"],
            tokens_last_minute=held["tokens_last_minute"],
        )
        out.append(TenantOut(id=tenant, limits=config.limits(tenant), use=use))
    return TenantList(data=out)
