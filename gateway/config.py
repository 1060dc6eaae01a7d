"""The server's configuration: one frozen, typed object built once.

Precedence: command-line flags > ``MLX_GATEWAY_*`` environment variables > the TOML file > defaults.
This is the only module that reads the environment.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from gateway.tenancy.keys import HASHED_PREFIX, is_hashed

__all__ = [
    "Config",
    "ConfigError",
    "ModelConfig",
    "TenantLimits",
    "child_environment",
    "load_config",
    "parse_size",
]

DEFAULT_MODEL = "smollm2-135m"


class ConfigError(ValueError):
    """The configuration cannot be used; the message says why."""


class ModelConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One served model. ``path`` is a preset name, a local directory or a Hugging Face id."""

    name: str
    path: str
    seed: int = 0
    max_kv_size: int | None = None
    trust_remote_code: bool = False
    kv_bits: Literal[2, 3, 4, 6, 8] | None = None
    kv_group_size: int = 64
    quantized_kv_start: int = 0
    context_length: int | None = None
    # Tokens per prefill chunk (None: 512 on CPU, 2048 on a GPU); other streams wait at most one chunk.
    prefill_step_size: int | None = None
    # Used when a request sets no max_tokens; None means "up to the context length".
    default_max_tokens: int | None = None
    # None: the server-wide isolation_mode.
    isolation_mode: Literal["strict", "balanced", "performance"] | None = None


class TenantLimits(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One tenant's quotas; None (absent) is unlimited. Sizes may be written as text (``2GiB``)."""

    max_prefix_caches: int | None = None
    max_prefix_cache_disk_bytes: int | None = None
    # Resident KV arrays: past it the tenant's own least recently used caches leave memory first.
    max_prefix_cache_memory_bytes: int | None = None
    # Requests of the tenant in the server at once (running or waiting for a place).
    max_concurrent_requests: int | None = None
    # Prompt tokens of those requests together.
    max_queued_tokens: int | None = None
    # Sliding 60-second windows: prompt + completion tokens, and requests.
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    # Stored responses' KV in the engine's memory (previous_response_id): past it the tenant's own least
    # recently used responses lose their KV first (None: only the server-wide response_kv_memory_bytes).
    max_response_kv_bytes: int | None = None

    def over(self, defaults: TenantLimits) -> TenantLimits:
        """These limits, each absent one taken from ``defaults``."""
        own = {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not None}
        return msgspec.structs.replace(defaults, **own)


class Config(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    models: tuple[ModelConfig, ...] = ()
    # API key -> tenant. A key written ``sha256:<64 hex>`` is the SHA-256 digest of the key (gateway.tenancy.keys).
    # Empty: auth is off and every request belongs to the default tenant.
    api_keys: dict[str, str] = {}
    admin_key: str | None = None
    default_tenant: str = "default"
    # Quotas of every tenant, and of named tenants (their own values over the defaults).
    tenant_defaults: TenantLimits = TenantLimits()
    tenants: dict[str, TenantLimits] = {}
    models_dir: str | None = None
    cache_dir: str | None = None
    # strict: every request alone in its forward passes (bit-identical under any traffic);
    # balanced: continuous batching, each request on its own cache (see README).
    # performance: balanced plus automatic prefix reuse within one tenant.
    isolation_mode: Literal["strict", "balanced", "performance"] = "balanced"
    # Requests in the engine at once (and sequences decoded together in one batch, balanced mode).
    max_running: int = 32
    # Bytes of KV that a model's running sequences may hold at once, each counted at its longest (prompt +
    # max_tokens); arrivals that would pass it wait, a request that could never fit it alone gets a 400.
    # None: half of what mlx may allocate on the device (on a CPU, of the host's memory).
    max_running_kv_bytes: int | None = None
    # Behind them: at most this many requests / prompt tokens wait, each at most queue_timeout seconds;
    # past a limit a request gets 429 with Retry-After.
    max_queued: int = 256
    max_queued_tokens: int = 2_000_000
    queue_timeout_seconds: float = 120.0
    # On SIGTERM/SIGINT: refuse new requests (503) and let running streams finish for up to this long.
    shutdown_timeout_seconds: float = 30.0
    # Off: no named prefix caches at all (requests naming one get a 400; the admin routes answer 400).
    prefix_caches: bool = True
    # Resident prefix-cache KV arrays, least recently used evicted first (files stay on disk).
    prefix_cache_memory_bytes: int = 2 * 1024**3
    # Seconds between re-reads of the cache directory's manifests, which other replicas sharing it may write:
    # a cache they create, replace or delete is seen here within this time. 0: never (one process only).
    prefix_cache_sync_seconds: float = 1.0
    # Names this process in /health (which replica answered behind a load balancer); default hostname:port.
    replica_id: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    # Stored responses (/v1/responses with `store`) per tenant, least recently used deleted first; they are kept in
    # the cache directory (under responses/), so they survive a restart and every replica sharing it sees them.
    max_stored_responses: Annotated[int, msgspec.Meta(ge=0)] = 1000
    # A stored response is deleted this long after it was made (OpenAI keeps them 30 days).
    response_ttl_seconds: Annotated[float, msgspec.Meta(gt=0)] = 30 * 24 * 3600.0
    # The KV of stored responses' sequences, kept in the engine's memory so that previous_response_id prefills only
    # the new input; least recently used dropped first, and after response_kv_ttl_seconds unused (0: never). A
    # response whose KV is gone is continued from its stored token ids: the same answer, prefilled in full.
    response_kv_memory_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1024**3
    response_kv_ttl_seconds: Annotated[float, msgspec.Meta(ge=0)] = 3600.0
    # Seconds between SSE keep-alive comments (long prefills, slow first tokens).
    sse_ping_seconds: float = 10.0
    sse_send_timeout_seconds: float = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # text: one human-readable line per record; json: one JSON object per line (with the request id).
    log_format: Literal["text", "json"] = "text"
    # Browser origins allowed by CORS (e.g. "https://app.example.com", or "*"); empty: CORS off.
    cors_allowed_origins: tuple[str, ...] = ()
    # "none" keeps mlx's reference BLAS; a path loads that library; None searches for MKL.
    blas: str | None = None
    # Write a cProfile of the engine thread here at shutdown (diagnostics).
    profile_path: str | None = None
    # process: the engine (mlx, models, batches, resident KV) runs in its own process, HTTP in this one, so that
    # neither waits for the other's GIL; thread: both in this process. auto: the faster one for the installed
    # backend, as measured (README, Performance).
    engine_layout: Literal["auto", "process", "thread"] = "auto"
    # HTTP front-end processes on the one port, all feeding one engine process (more than 1 implies the process
    # layout): for when HTTP and JSON, not the engine, are the limit. Admission and tenants' limits are counted
    # once for all of them (gateway.tenancy.coordinator).
    api_servers: Annotated[int, msgspec.Meta(ge=1)] = 1

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(os.path.expanduser("~/.cache")) / "mlx-gateway" / "prefix-caches"

    def limits(self, tenant: str) -> TenantLimits:
        own = self.tenants.get(tenant)
        return self.tenant_defaults if own is None else own.over(self.tenant_defaults)

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


def _parse_keys(items: list[str]) -> dict[str, str]:
    """``key:tenant`` items (a key without a tenant belongs to the default tenant)."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in items)):
        hashed = item.startswith(HASHED_PREFIX)
        key, _, tenant = item.removeprefix(HASHED_PREFIX).partition(":")
        keys[HASHED_PREFIX + key if hashed else key] = tenant or "default"
    return keys


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(text: str) -> int:
    """Bytes from ``2GiB``, ``512MiB``, ``1.5G`` or ``1000000``: ``Ki``/``Mi``/``Gi``/``Ti`` are powers of
    1024, ``K``/``M``/``G``/``T`` powers of 1000 (as Kubernetes reads them); a trailing ``B`` is optional.

    Raises:
        ConfigError: not a size.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"{text!r} is not a size (examples: 2GiB, 512MiB, 1G, 1000000)")
    number, unit = match.group(1), (match.group(2) or "").lower()
    scale = 1024 ** (" kmgt".index(unit[0])) if unit.endswith("i") else _UNITS[unit]
    return int(float(number) * scale)


# Flags that set a Config field of the same name as they are.
_FIELD_FLAGS = (
    "host",
    "port",
    "cache_dir",
    "models_dir",
    "admin_key",
    "log_level",
    "log_format",
    "isolation_mode",
    "max_running",
    "max_running_kv_bytes",
    "max_queued",
    "max_queued_tokens",
    "queue_timeout_seconds",
    "shutdown_timeout_seconds",
    "prefix_caches",
    "prefix_cache_memory_bytes",
    "prefix_cache_sync_seconds",
    "replica_id",
    "max_body_bytes",
    "blas",
    "engine_layout",
    "api_servers",
)
_SIZE_FIELDS = ("prefix_cache_memory_bytes", "max_body_bytes", "max_running_kv_bytes", "response_kv_memory_bytes")
_TENANT_SIZE_FIELDS = ("max_prefix_cache_disk_bytes", "max_prefix_cache_memory_bytes", "max_response_kv_bytes")


def _tenant_sizes(raw: dict[str, Any]) -> None:
    tables = [raw.get("tenant_defaults"), *(raw.get("tenants") or {}).values()]
    for table in tables:
        if isinstance(table, dict):
            for key in _TENANT_SIZE_FIELDS:
                if isinstance(table.get(key), str):
                    table[key] = parse_size(table[key])


def _check_keys(config: Config) -> None:
    for key in (*config.api_keys, config.admin_key or ""):
        if key.startswith(HASHED_PREFIX) and not is_hashed(key):
            raise ConfigError(
                f"a key starting '{HASHED_PREFIX}' must be '{HASHED_PREFIX}' and the 64 hex digits of a SHA-256 "
                "digest ('mlx-gateway keys new --hashed' prints one)"
            )


def _model_from_flag(value: str, name: str | None) -> dict[str, Any]:
    return {"name": name or value, "path": value}


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration.

    Args:
        flags: command-line values (None for "not given"): ``config``, ``model``, ``model_name``,
            ``api_keys`` (``KEY`` or ``KEY:TENANT`` items), ``cors_allowed_origins`` (items), and the
            Config fields named in ``_FIELD_FLAGS``; sizes may be given as text (``2GiB``).
        environ: the environment (``os.environ`` when None).

    Raises:
        ConfigError: the file is missing or invalid, or a value has the wrong type.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    path = flags.get("config") or env.get("MLX_GATEWAY_CONFIG")
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc

    env_map = {
        "MLX_GATEWAY_HOST": "host",
        "MLX_GATEWAY_PORT": "port",
        "MLX_GATEWAY_ADMIN_KEY": "admin_key",
        "MLX_GATEWAY_MODELS_DIR": "models_dir",
        "MLX_GATEWAY_CACHE_DIR": "cache_dir",
        "MLX_GATEWAY_LOG_LEVEL": "log_level",
        "MLX_GATEWAY_LOG_FORMAT": "log_format",
        "MLX_GATEWAY_BLAS": "blas",
        "MLX_GATEWAY_ENGINE_LAYOUT": "engine_layout",
        "MLX_GATEWAY_API_SERVERS": "api_servers",
        "MLX_GATEWAY_PROFILE": "profile_path",
        "MLX_GATEWAY_MAX_BODY_BYTES": "max_body_bytes",
        "MLX_GATEWAY_PREFIX_CACHE_MEMORY_BYTES": "prefix_cache_memory_bytes",
        "MLX_GATEWAY_RESPONSE_KV_MEMORY_BYTES": "response_kv_memory_bytes",
        "MLX_GATEWAY_PREFIX_CACHES": "prefix_caches",
        "MLX_GATEWAY_PREFIX_CACHE_SYNC_SECONDS": "prefix_cache_sync_seconds",
        "MLX_GATEWAY_REPLICA_ID": "replica_id",
        "MLX_GATEWAY_ISOLATION_MODE": "isolation_mode",
        "MLX_GATEWAY_MAX_RUNNING": "max_running",
        "MLX_GATEWAY_MAX_RUNNING_KV_BYTES": "max_running_kv_bytes",
        "MLX_GATEWAY_MAX_QUEUED": "max_queued",
        "MLX_GATEWAY_MAX_QUEUED_TOKENS": "max_queued_tokens",
        "MLX_GATEWAY_QUEUE_TIMEOUT_SECONDS": "queue_timeout_seconds",
        "MLX_GATEWAY_SHUTDOWN_TIMEOUT_SECONDS": "shutdown_timeout_seconds",
    }
    for var, key in env_map.items():
        if env.get(var):  # set-but-empty (as compose passes unset variables) means "not set"
            raw[key] = env[var]
    if env.get("MLX_GATEWAY_CORS_ALLOWED_ORIGINS"):
        origins = env["MLX_GATEWAY_CORS_ALLOWED_ORIGINS"].split(",")
        raw["cors_allowed_origins"] = [o.strip() for o in origins if o.strip()]
    if env.get("MLX_GATEWAY_API_KEYS"):
        raw["api_keys"] = _parse_keys(env["MLX_GATEWAY_API_KEYS"].split(","))
    env_model = env.get("MLX_GATEWAY_MODEL")

    for key in _FIELD_FLAGS:
        if key in flags:
            raw[key] = flags[key]
    if "api_keys" in flags:
        raw["api_keys"] = _parse_keys(list(flags["api_keys"]))
    if "cors_allowed_origins" in flags:
        raw["cors_allowed_origins"] = [o.strip() for o in flags["cors_allowed_origins"] if o.strip()]
    if "model" in flags:
        raw["models"] = [_model_from_flag(flags["model"], flags.get("model_name"))]
    elif env_model:
        raw["models"] = [_model_from_flag(env_model, flags.get("model_name", env.get("MLX_GATEWAY_MODEL_NAME")))]
    elif "model_name" in flags:
        raise ConfigError("--model-name names the model given by --model (or MLX_GATEWAY_MODEL); neither is set")
    if not raw.get("models"):
        raw["models"] = [_model_from_flag(DEFAULT_MODEL, None)]
    for key in _SIZE_FIELDS:
        if isinstance(raw.get(key), str):
            raw[key] = parse_size(raw[key])
    _tenant_sizes(raw)

    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    names = [m.name for m in config.models]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must be unique: {names}")
    _check_keys(config)
    if config.api_servers > 1 and config.engine_layout == "thread":
        raise ConfigError(
            "api_servers > 1 runs the engine in a process of its own, which engine_layout 'thread' rules out "
            "(use 'process' or 'auto')"
        )
    return config


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with ``extra`` added, for a child process (a library that is configured
    only through the environment, such as prometheus_client's multiprocess mode, is set up this way)."""
    return {**os.environ, **extra}
