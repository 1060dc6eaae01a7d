"""Adapters as models: which one a request names (and whether its tenant may see it), and registering and
unregistering them at run time.

An adapter registered at run time is recorded as one JSON file under ``<cache dir>/adapters/`` (atomic writes),
the folder replicas share: each replica's engine loads the recorded adapters at start, and a request naming an
adapter this replica does not serve yet loads it from its record; a record deleted through another replica
unloads it here at its next request. Adapters from the config are not recorded (every replica has them).

Ownership: nothing here holds state; the records are the disk's, the loaded adapters the engine's.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import anyio.to_thread
import msgspec
from litestar.datastructures import State

from adapters.base import AdapterExists, Engine, ModelInfo, UnknownModel
from adapters.setup import AdapterSpec
from gateway.config import Config, ModelConfig
from gateway.errors import Conflict, InvalidRequest, QuotaExceeded
from gateway.schemas.admin import ADAPTER_NAME, AdapterList, AdapterOut, DeletedAdapter, RegisterAdapter
from gateway.tenancy.auth import Access
from prefix_caches.durable import atomic_write

__all__ = [
    "AdapterRecord",
    "listing",
    "recorded_specs",
    "register",
    "resolve",
    "synced_models",
    "unregister",
    "visible",
]

_NAME = re.compile(ADAPTER_NAME)


class AdapterRecord(msgspec.Struct, kw_only=True, frozen=True):
    """An adapter registered at run time, as its file records it."""

    name: str
    base: str
    path: str
    tenant: str | None = None
    created_at: float = 0.0

    def spec(self) -> AdapterSpec:
        return AdapterSpec(self.name, self.base, self.path, self.tenant)


def _record_path(config: Config, name: str) -> Path:
    return config.adapters_path / f"{name}.json"


def _read_record(path: Path) -> AdapterRecord | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=AdapterRecord)
    except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def _records(config: Config) -> dict[str, AdapterRecord]:
    """The adapters registered at run time on any replica, by name (those whose base is not served here, or
    whose name a configured adapter has, are left out)."""
    if not config.adapters_dir or not config.adapters_path.is_dir():
        return {}
    records = {}
    for path in sorted(config.adapters_path.glob("*.json")):
        record = _read_record(path)
        if record is not None and config.model(record.base) is not None and config.adapter(record.name) is None:
            records[record.name] = record
    return records


def recorded_specs(config: Config) -> list[AdapterSpec]:
    """What the engine loads at start-up besides the configured adapters."""
    return [record.spec() for record in _records(config).values()]


def visible(info: ModelInfo, tenant: str) -> bool:
    """Whether ``tenant`` may use (and see) model ``info``: an adapter owned by another tenant is a 404 to it."""
    return info.owner is None or info.owner == tenant


async def resolve(engine: Engine, config: Config, name: str, tenant: str) -> tuple[ModelConfig, ModelInfo]:
    """The model a request names, as planning takes it (an adapter: its base model's settings under its own
    name) and as the engine has it.

    Raises:
        UnknownModel: no such model or adapter, or another tenant's adapter (404 ``model_not_found``).
    """
    model = config.model(name)
    if model is not None:
        return model, _model_info(engine, name)
    info = await _synced(engine, config, name)
    if info is None or info.parent is None or not visible(info, tenant):
        raise UnknownModel(name)
    base = config.model(info.parent)
    if base is None:
        raise UnknownModel(name)
    return msgspec.structs.replace(base, name=name), info


def _model_info(engine: Engine, name: str) -> ModelInfo:
    """The engine's view of a configured model; a model that failed to load raises the error that says why."""
    for info in engine.models():
        if info.id == name:
            return info
    engine.tokenizer(name)  # a configured model that failed to load: the error that says why
    raise UnknownModel(name)


def _adapter_info(engine: Engine, name: str) -> ModelInfo | None:
    return next((m for m in engine.models() if m.id == name and m.parent is not None), None)


async def _synced(engine: Engine, config: Config, name: str) -> ModelInfo | None:
    """The engine's entry of adapter ``name`` after its record (if any) is checked: registered through another
    replica (loaded here now), deleted through one (unloaded here), or replaced (loaded again)."""
    info = _adapter_info(engine, name)
    if not config.adapters_dir or config.adapter(name) is not None or not _NAME.fullmatch(name):
        return info
    record = await anyio.to_thread.run_sync(_read_record, _record_path(config, name))
    return await _follow(engine, name, info, record)


async def _follow(engine: Engine, name: str, info: ModelInfo | None, record: AdapterRecord | None) -> ModelInfo | None:
    """Make the engine serve runtime adapter ``name`` as its ``record`` says (None: deleted), given its entry."""
    if record is None:
        if info is not None:
            await engine.unload_adapter(name)
        return None
    if info is not None and info.source == record.path and info.owner == record.tenant:
        return info
    if info is not None:
        await engine.unload_adapter(name)
    try:
        return await engine.load_adapter(record.spec())
    except AdapterExists:  # loaded by a request that came at the same time
        return _adapter_info(engine, name)


async def synced_models(engine: Engine, config: Config) -> list[ModelInfo]:
    """Every model the engine serves, after the recorded adapters are checked (``/v1/models`` on a replica
    lists what another replica registered or deleted)."""
    if config.adapters_dir:
        served = {m.id: m for m in engine.models() if m.parent is not None and config.adapter(m.id) is None}
        records = await anyio.to_thread.run_sync(_records, config)  # each file read once
        for name in sorted(served.keys() | records.keys()):
            await _follow(engine, name, served.get(name), records.get(name))
    return engine.models()


def _out(info: ModelInfo) -> AdapterOut:
    return AdapterOut(
        id=info.id,
        parent=info.parent or "",
        tenant=info.owner,
        path=info.source,
        fingerprint=info.adapter_fingerprint,
        size_bytes=info.adapter_bytes,
        created=info.created,
    )


def _inside(root: str, given: str) -> str:
    """``given`` (relative to ``root``, or absolute) resolved, symlinks included, and checked to lie in ``root``."""
    base = Path(root).expanduser().resolve()
    path = (base / given).resolve()
    if path != base and base not in path.parents:
        raise InvalidRequest(f"The adapter's path must lie in the server's adapters directory ({base})", param="path")
    if not path.is_dir():
        raise InvalidRequest(f"No adapter directory at '{given}' in the adapters directory", param="path")
    return str(path)


def _weights_bytes(path: str) -> int:
    with contextlib.suppress(OSError):
        return (Path(path) / "adapters.safetensors").stat().st_size
    return 0


async def register(state: State, access: Access, req: RegisterAdapter) -> AdapterOut:
    """Load an adapter at run time and record it for the replicas; its owner is the tenant the request acts
    for (an admin request without ``tenant``: every tenant)."""
    config: Config = state.config
    engine: Engine = state.engine
    if not config.adapters_dir:
        raise InvalidRequest(
            "This server registers no adapters at run time: start it with --adapters-dir (MLX_GATEWAY_ADAPTERS_DIR)",
            param="path",
        )
    owner = None if access.is_admin and req.tenant is None else access.tenant_for(req.tenant)
    if req.base is not None:
        base = req.base
    elif len(config.models) == 1:
        base = config.models[0].name
    else:
        names = ", ".join(m.name for m in config.models)
        raise InvalidRequest(f"Several models are served ({names}): name the adapter's 'base'", param="base")
    if config.model(base) is None:
        raise InvalidRequest(f"The base model '{base}' is not served here", param="base")
    if config.model(req.name) is not None or config.adapter(req.name) is not None:
        raise Conflict(f"'{req.name}' is a model or configured adapter of this server", param="name")
    path = await anyio.to_thread.run_sync(_inside, config.adapters_dir, req.path)
    record_path = _record_path(config, req.name)
    if _adapter_info(engine, req.name) is not None or await anyio.to_thread.run_sync(record_path.exists):
        raise Conflict(f"An adapter named '{req.name}' is already registered", param="name")
    if owner is not None:
        await _check_quota(config, engine, owner, await anyio.to_thread.run_sync(_weights_bytes, path))
    record = AdapterRecord(name=req.name, base=base, path=path, tenant=owner, created_at=time.time())
    info = await engine.load_adapter(record.spec())  # AdapterRefused -> 400, AdapterExists -> 409
    try:
        await anyio.to_thread.run_sync(_write_record, record_path, msgspec.json.encode(record))
    except BaseException:
        await engine.unload_adapter(req.name)
        raise
    return _out(info)


def _write_record(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(path, write)


async def _check_quota(config: Config, engine: Engine, owner: str, nbytes: int) -> None:
    limits = config.limits(owner)
    owned = [m for m in engine.models() if m.parent is not None and m.owner == owner]
    if limits.max_adapters is not None and len(owned) + 1 > limits.max_adapters:
        raise QuotaExceeded(
            f"Tenant '{owner}' has {len(owned)} adapters, its limit (max_adapters {limits.max_adapters})",
            param="name",
            code="adapter_count_quota",
        )
    held = sum(m.adapter_bytes for m in owned)
    if limits.max_adapter_bytes is not None and held + nbytes > limits.max_adapter_bytes:
        raise QuotaExceeded(
            f"Tenant '{owner}''s adapters would take {held + nbytes} bytes, over its limit (max_adapter_bytes "
            f"{limits.max_adapter_bytes})",
            param="path",
            code="adapter_bytes_quota",
        )


def _manages(access: Access, info: ModelInfo) -> bool:
    return access.is_admin or info.owner == access.tenant


async def unregister(state: State, access: Access, name: str) -> DeletedAdapter:
    """Unload a registered adapter and delete its record: running requests finish on it; the prefix caches
    built under it go with it."""
    config: Config = state.config
    engine: Engine = state.engine
    info = await _synced(engine, config, name)
    if info is None or not _manages(access, info):
        raise UnknownModel(name)
    if config.adapter(name) is not None:
        raise Conflict(f"The adapter '{name}' comes from the server's config: remove it there", param="name")
    await anyio.to_thread.run_sync(_delete_record, _record_path(config, name))
    await engine.unload_adapter(name)
    return DeletedAdapter(id=name)


def _delete_record(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def listing(state: State, access: Access) -> AdapterList:
    """The adapters the caller manages (an admin: all)."""
    engine: Engine = state.engine
    return AdapterList(data=[_out(m) for m in engine.models() if m.parent is not None and _manages(access, m)])
