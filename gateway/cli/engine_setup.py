"""The config turned into what the engine is built from (``adapters.setup.EngineSetup``).

A model's own settings reach the engine by name: every field that ``ModelSpec`` shares with ``ModelConfig`` is
passed as it is, so that a setting added to both needs no line here; only what differs is written out
(``path`` is the spec's ``source``; the server-wide limits and directories).
"""

from __future__ import annotations

import dataclasses

from adapters.setup import AdapterSpec, EngineSetup, ModelSpec, ResponseKVSetup, StoreSetup
from gateway.config import Config, ModelConfig

__all__ = ["SHARED_MODEL_FIELDS", "engine_setup", "model_spec"]

# ModelConfig's fields that ModelSpec holds under the same name and meaning.
SHARED_MODEL_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(ModelSpec) if f.name in ModelConfig.__struct_fields__
)


def model_spec(config: Config, model: ModelConfig) -> ModelSpec:
    """One configured model as the engine takes it (the config's defaults already resolved at load)."""
    # isolation_mode among them: load_config gave every model the server-wide one where its own was unset.
    shared = {name: getattr(model, name) for name in SHARED_MODEL_FIELDS}
    return ModelSpec(
        **shared,
        source=model.path,
        models_dir=config.models_dir,
        max_running=config.max_running,
        max_running_kv_bytes=config.max_running_kv_bytes,
    )


def engine_setup(config: Config) -> EngineSetup:
    """The models, the prefix-cache store (None when prefix caches are off), stored responses' KV budgets, the
    BLAS and the profile path, from the config."""
    from prefix_caches import StorageQuota

    def quota(tenant: str | None) -> StorageQuota:
        limits = config.tenant_defaults if tenant is None else config.limits(tenant)
        return StorageQuota(
            limits.max_prefix_caches, limits.max_prefix_cache_disk_bytes, limits.max_prefix_cache_memory_bytes
        )

    store = None
    if config.prefix_caches:
        store = StoreSetup(
            root=str(config.cache_path),
            memory_budget_bytes=config.prefix_cache_memory_bytes,
            default_quota=quota(config.default_tenant + "\0"),  # a tenant without its own table
            quotas={tenant: quota(tenant) for tenant in config.tenants},
            sync_seconds=config.prefix_cache_sync_seconds,
        )
    responses = ResponseKVSetup(
        memory_bytes=config.response_kv_memory_bytes,
        ttl_seconds=config.response_kv_ttl_seconds,
        default_tenant_bytes=config.limits(config.default_tenant + "\0").max_response_kv_bytes,
        tenant_bytes={tenant: config.limits(tenant).max_response_kv_bytes for tenant in config.tenants},
    )
    from gateway.adapter_service import recorded_specs

    configured = [AdapterSpec(a.name, a.base or config.models[0].name, a.path, a.tenant) for a in config.adapters]
    return EngineSetup(
        models=tuple(model_spec(config, m) for m in config.models),
        adapters=(*configured, *recorded_specs(config)),
        store=store,
        responses=responses,
        blas=config.blas,
        profile_path=config.profile_path,
    )
