"""What an engine is built from: the configured models and the prefix-cache store's settings, as plain data.

The gateway turns its config into an :class:`EngineSetup`; the engine is built from it in the server's process
(the thread layout) or sent to the engine's own process (the process layout). Nothing here imports mlx.

Also the one place that knows where mlx-gateway's files live by default (``$XDG_CACHE_HOME/mlx-gateway``): the
gateway's config resolves its directories with it at load, and code run without a config (``build-model``,
benchmarks, tests) finds the same ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prefix_caches.quotas import NO_QUOTA, StorageQuota

__all__ = [
    "AdapterSpec",
    "EngineSetup",
    "ModelSpec",
    "ResponseKVSetup",
    "StoreSetup",
    "cache_home",
    "default_models_dir",
    "default_prefix_cache_dir",
    "os_reason",
]


def cache_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/mlx-gateway`` (``~/.cache/mlx-gateway`` where it is unset or empty).

    Args:
        environ: the environment to read (``os.environ`` when None), so that a config loaded from a given
            mapping resolves its paths from that mapping alone.
    """
    env = os.environ if environ is None else environ
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-gateway"


def default_models_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where built and converted models are kept when no ``models_dir`` is configured."""
    return cache_home(environ) / "models"


def default_prefix_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where named prefix caches (and stored responses) are kept when no ``cache_dir`` is configured."""
    return cache_home(environ) / "prefix-caches"


def os_reason(exc: OSError) -> str:
    """An OS error in one line for the operator: what went wrong and the file it names."""
    if exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    return str(exc)


@dataclass(frozen=True)
class ModelSpec:
    """One configured model. ``source`` is a preset name, a local directory or a Hugging Face id."""

    name: str
    source: str
    seed: int = 0
    max_kv_size: int | None = None
    trust_remote_code: bool = False
    kv_bits: int | None = None
    kv_group_size: int = 64
    quantized_kv_start: int = 0
    context_length: int | None = None
    prefill_step_size: int | None = None  # None: 512 on CPU, 2048 on a GPU
    # strict: one sequence per forward pass, outputs independent of other traffic, bit for bit.
    # balanced: continuous batching (outputs may differ from a solo run by float rounding only).
    isolation_mode: str = "balanced"
    max_running: int = 32
    # Bytes of KV that running sequences may hold at once (None: KV_BUDGET_SHARE of mlx's memory limit).
    max_running_kv_bytes: int | None = None
    models_dir: str | None = None


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA or DoRA adapter (an ``mlx_lm.lora`` directory) served as model ``name`` on model ``base``;
    ``owner``: the one tenant that may use it (None: every tenant)."""

    name: str
    base: str
    path: str
    owner: str | None = None


@dataclass(frozen=True)
class StoreSetup:
    """The prefix-cache store: its folder, resident-KV budget, tenants' quotas and the disk re-read period."""

    root: str
    memory_budget_bytes: int
    default_quota: StorageQuota = NO_QUOTA
    quotas: dict[str, StorageQuota] = field(default_factory=dict)
    sync_seconds: float = 0.0

    def quota_of(self, tenant: str) -> StorageQuota:
        return self.quotas.get(tenant, self.default_quota)

    def unusable(self, exc: OSError) -> str:
        """Why the store's folder cannot be used (the engine's store and a front end's index say it alike)."""
        return f"cannot use the prefix-cache directory {self.root}: {os_reason(exc)}"


@dataclass(frozen=True)
class ResponseKVSetup:
    """Stored responses' KV in memory: the engine-wide byte budget, each tenant's (None: the engine-wide one),
    and how long an unused response's KV stays (0: until evicted)."""

    memory_bytes: int = 1024**3
    ttl_seconds: float = 3600.0
    default_tenant_bytes: int | None = None
    tenant_bytes: dict[str, int | None] = field(default_factory=dict)

    def budget_of(self, tenant: str) -> int | None:
        return self.tenant_bytes.get(tenant, self.default_tenant_bytes)


@dataclass(frozen=True)
class EngineSetup:
    models: tuple[ModelSpec, ...]
    adapters: tuple[AdapterSpec, ...] = ()
    store: StoreSetup | None = None
    responses: ResponseKVSetup = ResponseKVSetup()
    blas: str | None = None  # the CPU BLAS to load before mlx (adapters.mlx_lm.blas)
    profile_path: str | None = None
