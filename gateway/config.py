"""The server's configuration: one frozen, typed object built once.

Precedence: command-line flags > ``MLX_GATEWAY_*`` environment variables > the TOML file > defaults.
This is the only module of the gateway that reads the environment (``XDG_CACHE_HOME`` through
``adapters.setup.cache_home``, which also serves code run without a config).

Each setting is declared once, on its :class:`Config` field: the type, the default and, in a :class:`Setting`
beside the type, its help text, environment variable and flag. ``load_config`` reads the environment and the
flags from these declarations, ``mlx-gateway serve`` builds its options and ``--help`` from them
(``gateway.cli.options``), and ``--print-config`` shows the result with the secrets they mark redacted.
Defaults that depend on the machine (the cache directories) or on another setting (a model's isolation_mode)
are resolved here, once, at load; the prefill step, which depends on the device, where the model loads.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from adapters.setup import default_models_dir, default_prefix_cache_dir
from gateway.settings import ConfigError, Declared, Setting, declared, parse_size
from gateway.tenancy.keys import HASHED_PREFIX, is_hashed

__all__ = [
    "LOAD_SETTINGS",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Declared",
    "ModelConfig",
    "Setting",
    "TenantLimits",
    "child_environment",
    "declared",
    "environment_value",
    "load_config",
    "parse_size",
    "redacted",
]

DEFAULT_MODEL = "smollm2-135m"


def _parse_keys(items: list[str]) -> dict[str, str]:
    """``key:tenant`` items (a key without a tenant belongs to the default tenant)."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in items)):
        hashed = item.startswith(HASHED_PREFIX)
        key, _, tenant = item.removeprefix(HASHED_PREFIX).partition(":")
        keys[HASHED_PREFIX + key if hashed else key] = tenant or "default"
    return keys


def _parse_adapters(items: list[str]) -> list[dict[str, str]]:
    """``NAME=PATH`` or ``NAME=BASE:PATH`` items (which one: ``_check_adapters`` knows the models' names)."""
    out = []
    for item in filter(None, (part.strip() for part in items)):
        name, eq, rest = item.partition("=")
        if not eq or not name or not rest:
            raise ConfigError(f"--adapter takes NAME=PATH or NAME=BASE:PATH, not '{item}'")
        out.append({"name": name, "path": rest})
    return out


def _origins(items: list[str]) -> list[str]:
    """Origins from items that may each hold several, separated by commas."""
    return [o.strip() for item in items for o in item.split(",") if o.strip()]


# A size field read from the TOML file only: marked so that its text form is parsed like the others.
_SIZE = Setting(size=True)

IsolationMode = Literal["strict", "balanced", "performance"]


class ModelConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One served model. ``path`` is a preset name, a local directory or a Hugging Face id.

    The fields that ``adapters.setup.ModelSpec`` shares by name reach the engine as they are
    (``gateway.cli.engine_setup``).
    """

    name: str
    path: str
    seed: int = 0
    max_kv_size: int | None = None
    trust_remote_code: bool = False
    kv_bits: Literal[2, 3, 4, 6, 8] | None = None
    kv_group_size: int = 64
    quantized_kv_start: int = 0
    context_length: int | None = None
    # Tokens per prefill chunk (None: 512 on CPU, 2048 on a GPU, resolved where the model loads, the one place
    # that knows the device); other streams wait at most one chunk.
    prefill_step_size: int | None = None
    # Used when a request sets no max_tokens; None means "up to the context length".
    default_max_tokens: int | None = None
    # None in the file: the server-wide isolation_mode (load_config fills it in).
    isolation_mode: IsolationMode | None = None


class AdapterConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A LoRA or DoRA adapter made by ``mlx_lm.lora`` (its directory), served as model ``name`` on model ``base``
    (None: the one model served). ``tenant``: the one tenant that may use it (None: every tenant). Written as
    ``[[adapters]]`` tables, or ``[[models]]`` entries with ``adapter = PATH`` and ``base``."""

    name: str
    path: str
    base: str | None = None
    tenant: str | None = None


class TenantLimits(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One tenant's quotas; None (absent) is unlimited. Sizes may be written as text (``2GiB``)."""

    max_prefix_caches: int | None = None
    max_prefix_cache_disk_bytes: Annotated[int | None, _SIZE] = None
    # Resident KV arrays: past it the tenant's own least recently used caches leave memory first.
    max_prefix_cache_memory_bytes: Annotated[int | None, _SIZE] = None
    # Requests of the tenant in the server at once (running or waiting for a place).
    max_concurrent_requests: int | None = None
    # Prompt tokens of those requests together.
    max_queued_tokens: int | None = None
    # Sliding 60-second windows: prompt + completion tokens, and requests.
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    # Stored responses' KV in the engine's memory (previous_response_id): past it the tenant's own least
    # recently used responses lose their KV first (None: only the server-wide response_kv_memory_bytes).
    max_response_kv_bytes: Annotated[int | None, _SIZE] = None
    # Adapters the tenant owns (registered at run time or configured for it), and their weights' bytes together.
    max_adapters: int | None = None
    max_adapter_bytes: Annotated[int | None, _SIZE] = None

    def over(self, defaults: TenantLimits) -> TenantLimits:
        """These limits, each absent one taken from ``defaults``."""
        own = {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not None}
        return msgspec.structs.replace(defaults, **own)


class Config(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    host: Annotated[
        str,
        Setting(help="The address to listen on (0.0.0.0 for every interface).", env="MLX_GATEWAY_HOST", flag="--host"),
    ] = "127.0.0.1"
    port: Annotated[
        int,
        msgspec.Meta(ge=0, le=65535),
        Setting(help="The port to listen on.", env="MLX_GATEWAY_PORT", flag="--port"),
    ] = 8000
    models: tuple[ModelConfig, ...] = ()
    adapters: Annotated[
        tuple[AdapterConfig, ...],
        Setting(
            help="Serve an mlx_lm.lora adapter directory as model NAME on the base model (BASE: needed when several "
            "models are served). Repeat for several; they share the base model's weights.",
            env="MLX_GATEWAY_ADAPTERS",
            flag="--adapter",
            metavar="NAME=[BASE:]PATH",
            items=_parse_adapters,
        ),
    ] = ()
    adapters_dir: Annotated[
        str | None,
        Setting(
            help="The directory that adapters registered at run time (POST /admin/adapters) must lie in.",
            env="MLX_GATEWAY_ADAPTERS_DIR",
            flag="--adapters-dir",
            default_help="none (no registration at run time)",
        ),
    ] = None
    # API key -> tenant. A key written ``sha256:<64 hex>`` is the SHA-256 digest of the key (gateway.tenancy.keys).
    # Empty: auth is off and every request belongs to the default tenant.
    api_keys: Annotated[
        dict[str, str],
        Setting(
            help="Require this API key on /v1 (repeat for several; a key without a tenant belongs to 'default'). "
            "Keys given as flags are visible to other users in `ps`: prefer the environment variable "
            "(KEY:TENANT,...).",
            env="MLX_GATEWAY_API_KEYS",
            flag="--api-key",
            metavar="KEY[:TENANT]",
            items=_parse_keys,
            secret=True,
            default_help="none (auth off)",
        ),
    ] = {}
    admin_key: Annotated[
        str | None,
        Setting(
            help="The key that manages any tenant's prefix caches. Visible in `ps` as a flag: prefer the "
            "environment variable.",
            env="MLX_GATEWAY_ADMIN_KEY",
            flag="--admin-key",
            secret=True,
        ),
    ] = None
    default_tenant: str = "default"
    # Quotas of every tenant, and of named tenants (their own values over the defaults).
    tenant_defaults: TenantLimits = TenantLimits()
    tenants: dict[str, TenantLimits] = {}
    # Both directories: None in the file means the default, which load_config resolves (XDG_CACHE_HOME).
    models_dir: Annotated[
        str | None,
        Setting(
            help="Where built and converted models are kept.",
            env="MLX_GATEWAY_MODELS_DIR",
            flag="--models-dir",
            default_help="$XDG_CACHE_HOME/mlx-gateway/models, ~/.cache/mlx-gateway/models without it",
        ),
    ] = None
    cache_dir: Annotated[
        str | None,
        Setting(
            help="Where named prefix caches (and stored responses) are kept.",
            env="MLX_GATEWAY_CACHE_DIR",
            flag="--cache-dir",
            default_help="$XDG_CACHE_HOME/mlx-gateway/prefix-caches, ~/.cache/mlx-gateway/prefix-caches without it",
        ),
    ] = None
    isolation_mode: Annotated[
        IsolationMode,
        Setting(
            help="strict: every request alone in its forward passes (bit-identical under any traffic); balanced: "
            "continuous batching, each request on its own cache; performance: balanced plus automatic prefix "
            "reuse within one tenant. A model's own isolation_mode (file) overrides it.",
            env="MLX_GATEWAY_ISOLATION_MODE",
            flag="--isolation-mode",
        ),
    ] = "balanced"
    max_running: Annotated[
        int,
        msgspec.Meta(ge=1),
        Setting(
            help="Requests in the engine at once (and sequences decoded together in one batch, balanced mode).",
            env="MLX_GATEWAY_MAX_RUNNING",
            flag="--max-running",
        ),
    ] = 32
    max_running_kv_bytes: Annotated[
        int | None,
        Setting(
            help="KV bytes a model's running sequences may hold at once, each counted at its longest (prompt + "
            "max_tokens), e.g. 8GiB: arrivals that would pass it wait, a request that could never fit alone "
            "gets 400.",
            env="MLX_GATEWAY_MAX_RUNNING_KV_BYTES",
            flag="--max-running-kv-bytes",
            size=True,
            default_help="half of what mlx may allocate on the device; on a CPU, of the host's memory",
        ),
    ] = None
    max_queued: Annotated[
        int,
        msgspec.Meta(ge=0),
        Setting(
            help="Requests waiting behind the running ones before new ones get 429 (with Retry-After).",
            env="MLX_GATEWAY_MAX_QUEUED",
            flag="--max-queued",
        ),
    ] = 256
    max_queued_tokens: Annotated[
        int,
        msgspec.Meta(ge=0),
        Setting(
            help="Prompt tokens waiting before new requests get 429.",
            env="MLX_GATEWAY_MAX_QUEUED_TOKENS",
            flag="--max-queued-tokens",
        ),
    ] = 2_000_000
    queue_timeout_seconds: Annotated[
        float,
        msgspec.Meta(ge=0),
        Setting(
            help="How long a request may wait for a place before it gets 429.",
            env="MLX_GATEWAY_QUEUE_TIMEOUT_SECONDS",
            flag="--queue-timeout",
            metavar="SECONDS",
        ),
    ] = 120.0
    shutdown_timeout_seconds: Annotated[
        float,
        msgspec.Meta(ge=0),
        Setting(
            help="On SIGTERM/SIGINT: refuse new requests (503) and let running streams finish for up to this long.",
            env="MLX_GATEWAY_SHUTDOWN_TIMEOUT_SECONDS",
            flag="--shutdown-timeout",
            metavar="SECONDS",
        ),
    ] = 30.0
    prefix_caches: Annotated[
        bool,
        Setting(
            help="Named prefix caches on or off (off: requests naming one and the admin cache routes get 400).",
            env="MLX_GATEWAY_PREFIX_CACHES",
            flag="--prefix-caches/--no-prefix-caches",
        ),
    ] = True
    prefix_cache_memory_bytes: Annotated[
        int,
        Setting(
            help="Memory for resident prefix caches' KV, least recently used evicted first (files stay on disk): "
            "bytes or a size such as 2GiB, 512MiB, 4G.",
            env="MLX_GATEWAY_PREFIX_CACHE_MEMORY_BYTES",
            flag="--prefix-cache-memory-bytes",
            size=True,
        ),
    ] = 2 * 1024**3
    prefix_cache_sync_seconds: Annotated[
        float,
        msgspec.Meta(ge=0),
        Setting(
            help="How often to re-read the cache directory's manifests, which other replicas sharing it may "
            "write: their creates, replaces and deletes are seen within this time (0: never; one process only).",
            env="MLX_GATEWAY_PREFIX_CACHE_SYNC_SECONDS",
            flag="--prefix-cache-sync-seconds",
            metavar="SECONDS",
        ),
    ] = 1.0
    replica_id: Annotated[
        str | None,
        Setting(
            help="This process's name in /health, to tell replicas apart behind a load balancer.",
            env="MLX_GATEWAY_REPLICA_ID",
            flag="--replica-id",
            default_help="hostname:port",
        ),
    ] = None
    max_body_bytes: Annotated[
        int,
        Setting(
            help="Larger request bodies get 413: bytes or a size such as 16MiB.",
            env="MLX_GATEWAY_MAX_BODY_BYTES",
            flag="--max-body-bytes",
            size=True,
        ),
    ] = 16 * 1024 * 1024
    # Stored responses (/v1/responses with `store`) per tenant, least recently used deleted first; they are kept in
    # the cache directory (under responses/), so they survive a restart and every replica sharing it sees them.
    max_stored_responses: Annotated[int, msgspec.Meta(ge=0)] = 1000
    # A stored response is deleted this long after it was made (OpenAI keeps them 30 days).
    response_ttl_seconds: Annotated[float, msgspec.Meta(gt=0)] = 30 * 24 * 3600.0
    # The KV of stored responses' sequences, kept in the engine's memory so that previous_response_id prefills only
    # the new input; least recently used dropped first, and after response_kv_ttl_seconds unused (0: never). A
    # response whose KV is gone is continued from its stored token ids: the same answer, prefilled in full.
    response_kv_memory_bytes: Annotated[
        int,
        msgspec.Meta(ge=0),
        Setting(
            help="Stored responses' KV kept in the engine's memory.",
            env="MLX_GATEWAY_RESPONSE_KV_MEMORY_BYTES",
            size=True,
        ),
    ] = 1024**3
    response_kv_ttl_seconds: Annotated[float, msgspec.Meta(ge=0)] = 3600.0
    # Seconds between SSE keep-alive comments (long prefills, slow first tokens).
    sse_ping_seconds: float = 10.0
    sse_send_timeout_seconds: float = 30.0
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"],
        Setting(help="How much to log.", env="MLX_GATEWAY_LOG_LEVEL", flag="--log-level"),
    ] = "info"
    log_format: Annotated[
        Literal["text", "json"],
        Setting(
            help="text: one human-readable line per record; json: one JSON object per line (with the request id).",
            env="MLX_GATEWAY_LOG_FORMAT",
            flag="--log-format",
        ),
    ] = "text"
    cors_allowed_origins: Annotated[
        tuple[str, ...],
        Setting(
            help="Browser origins allowed by CORS, e.g. https://app.example.com (repeat, or separate with commas; "
            "* for any).",
            env="MLX_GATEWAY_CORS_ALLOWED_ORIGINS",
            flag="--cors-allowed-origins",
            metavar="ORIGIN[,ORIGIN]",
            items=_origins,
            default_help="none (CORS off)",
        ),
    ] = ()
    blas: Annotated[
        str | None,
        Setting(
            help="The BLAS library for mlx on CPU: a path, or 'none' for mlx's bundled reference BLAS.",
            env="MLX_GATEWAY_BLAS",
            flag="--blas",
            metavar="PATH|none",
            default_help="search for MKL",
        ),
    ] = None
    profile_path: Annotated[
        str | None,
        Setting(
            help="Write a cProfile of the engine thread here at shutdown (diagnostics).", env="MLX_GATEWAY_PROFILE"
        ),
    ] = None
    engine_layout: Annotated[
        Literal["auto", "process", "thread"],
        Setting(
            help="process: the engine (mlx, models, batches, resident KV) in its own process, HTTP in this one, so "
            "that neither waits for the other's GIL; thread: both in this process; auto: the faster one for the "
            "installed backend, as measured (docs/performance.md).",
            env="MLX_GATEWAY_ENGINE_LAYOUT",
            flag="--engine-layout",
        ),
    ] = "auto"
    api_servers: Annotated[
        int,
        msgspec.Meta(ge=1),
        Setting(
            help="HTTP front-end processes on the one port, all feeding one engine process, for when HTTP and "
            "JSON, not the engine, are the limit. More than 1 implies --engine-layout process; admission and "
            "tenants' limits are counted once for all of them.",
            env="MLX_GATEWAY_API_SERVERS",
            flag="--api-servers",
            metavar="N",
        ),
    ] = 1

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def cache_path(self) -> Path:
        # load_config always sets cache_dir; the default is for a Config built directly (tests).
        return Path(self.cache_dir) if self.cache_dir else default_prefix_cache_dir()

    def limits(self, tenant: str) -> TenantLimits:
        own = self.tenants.get(tenant)
        return self.tenant_defaults if own is None else own.over(self.tenant_defaults)

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def adapter(self, name: str) -> AdapterConfig | None:
        """A configured adapter (one registered at run time is not in the config)."""
        return next((a for a in self.adapters if a.name == name), None)

    @property
    def adapters_path(self) -> Path:
        """Where adapters registered at run time are recorded: beside the caches, so replicas share them."""
        return self.cache_path / "adapters"


SETTINGS: tuple[Declared, ...] = declared(Config)
_SIZE_FIELDS = tuple(d.name for d in SETTINGS if d.setting.size)
_TENANT_SIZE_FIELDS = tuple(d.name for d in declared(TenantLimits) if d.setting.size)

# What ``load_config`` reads besides Config's fields: the file itself, and one model (Config.models holds a list).
LOAD_SETTINGS: dict[str, Setting] = {
    "model": Setting(
        help="smollm2-135m (the default, a real model), a preset with random weights (tiny, small, llama-1b, "
        "llama-8b), a .gguf file (llama architecture; F32, F16, Q4_0, Q4_1, Q8_0 kept; K-quants read as float16), "
        "an mlx-lm directory or a Hugging Face id. Replaces the config file's [[models]].",
        env="MLX_GATEWAY_MODEL",
        flag="--model",
    ),
    "model_name": Setting(
        help="The model's id in the API.",
        env="MLX_GATEWAY_MODEL_NAME",
        flag="--model-name",
        default_help="--model as given",
    ),
    "config": Setting(
        help="A TOML config file (flags and environment override it).", env="MLX_GATEWAY_CONFIG", flag="--config"
    ),
}


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


def _adapters_from_models(raw: dict[str, Any]) -> None:
    """``[[models]]`` entries with ``adapter = PATH`` are adapters: moved to ``adapters``."""
    models = raw.get("models")
    if not isinstance(models, list):
        return
    moved = [m for m in models if isinstance(m, dict) and "adapter" in m]
    if not moved:
        return
    if any("path" in m for m in moved):
        raise ConfigError("a [[models]] entry with 'adapter' takes no 'path' (the adapter's directory is 'adapter')")
    raw["models"] = [m for m in models if m not in moved]
    entries = [{**{k: v for k, v in m.items() if k != "adapter"}, "path": m["adapter"]} for m in moved]
    raw["adapters"] = [*(raw.get("adapters") or []), *entries]


def _check_adapters(config: Config) -> Config:
    """Every adapter names a served base model (the one model when it names none) and a name of its own."""
    bases = [m.name for m in config.models]
    adapters = []
    for adapter in config.adapters:
        base, path = adapter.base, adapter.path
        if base is None:  # NAME=BASE:PATH from a flag: BASE is a served model's name (which may hold ':' or '/')
            base = next((b for b in bases if path.startswith(b + ":")), None)
            path = path[len(base) + 1 :] if base is not None else path
        if base is None:
            if len(bases) > 1:
                raise ConfigError(
                    f"adapter '{adapter.name}': several models are served ({', '.join(bases)}): name its base "
                    f"(--adapter {adapter.name}=BASE:PATH, or base = ... in the file)"
                )
            base = bases[0]
        if base not in bases:
            raise ConfigError(f"adapter '{adapter.name}': its base '{base}' is not a served model ({', '.join(bases)})")
        path = str(Path(path).expanduser().resolve())  # the engine process may not share our working directory
        adapters.append(msgspec.structs.replace(adapter, base=base, path=path))
    names = bases + [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ConfigError(f"model and adapter names must be unique: {names}")
    return msgspec.structs.replace(config, adapters=tuple(adapters))


def _model_from_flag(value: str, name: str | None) -> dict[str, Any]:
    return {"name": name or value, "path": value}


def _env(environ: Mapping[str, str], setting: Setting) -> str | None:
    # Set-but-empty (as compose passes unset variables) means "not set".
    return (environ.get(setting.env) or None) if setting.env else None


def environment_value(field: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The text the environment gives one Config field (None where its variable is unset or empty), for a
    command that needs one setting without loading a whole config (``build-model``'s BLAS)."""
    setting = next(d.setting for d in SETTINGS if d.name == field)
    return _env(os.environ if environ is None else environ, setting)


def _resolved(config: Config, environ: Mapping[str, str]) -> Config:
    """The defaults that depend on the machine, or on the server-wide setting, filled in: once, here."""
    models = tuple(
        m if m.isolation_mode else msgspec.structs.replace(m, isolation_mode=config.isolation_mode)
        for m in config.models
    )
    return msgspec.structs.replace(
        config,
        models=models,
        models_dir=config.models_dir or str(default_models_dir(environ)),
        cache_dir=config.cache_dir or str(default_prefix_cache_dir(environ)),
    )


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration.

    Args:
        flags: command-line values (None for "not given"), by name: those of ``LOAD_SETTINGS`` (``config``,
            ``model``, ``model_name``) and of every Config field that declares a flag; a list's items as a
            list (``api_keys``: ``KEY`` or ``KEY:TENANT``); sizes may be given as text (``2GiB``).
        environ: the environment (``os.environ`` when None).

    Raises:
        ConfigError: the file is missing or invalid, or a value has the wrong type.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    path = flags.get("config") or _env(env, LOAD_SETTINGS["config"])
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc

    for d in SETTINGS:
        value = _env(env, d.setting)
        if value is not None:
            raw[d.name] = d.setting.items(value.split(",")) if d.setting.items else value
    for d in SETTINGS:
        if d.setting.flag and d.name in flags:
            value = flags[d.name]
            raw[d.name] = d.setting.items(list(value)) if d.setting.items else value

    env_model = _env(env, LOAD_SETTINGS["model"])
    if "model" in flags:
        raw["models"] = [_model_from_flag(flags["model"], flags.get("model_name"))]
    elif env_model:
        raw["models"] = [_model_from_flag(env_model, flags.get("model_name", _env(env, LOAD_SETTINGS["model_name"])))]
    elif "model_name" in flags:
        raise ConfigError("--model-name names the model given by --model (or MLX_GATEWAY_MODEL); neither is set")
    if not raw.get("models"):
        raw["models"] = [_model_from_flag(DEFAULT_MODEL, None)]
    _adapters_from_models(raw)
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
    config = _check_adapters(config)
    _check_keys(config)
    if config.api_servers > 1 and config.engine_layout == "thread":
        raise ConfigError(
            "api_servers > 1 runs the engine in a process of its own, which engine_layout 'thread' rules out "
            "(use 'process' or 'auto')"
        )
    return _resolved(config, env)


def redacted(config: Config) -> dict[str, object]:
    """The configuration as plain data (what ``--print-config`` prints), the fields declared secret redacted:
    a key -> tenant table keeps its tenants, a single key becomes ``<redacted>``."""
    shown: dict[str, object] = msgspec.to_builtins(config)
    for d in SETTINGS:
        value = getattr(config, d.name)
        if not d.setting.secret or not value:
            continue
        if isinstance(value, dict):
            shown[d.name] = {f"<key {i}>": tenant for i, tenant in enumerate(value.values(), 1)}
        else:
            shown[d.name] = "<redacted>"
    return shown


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with ``extra`` added, for a child process (a library that is configured
    only through the environment, such as prometheus_client's multiprocess mode, is set up this way)."""
    return {**os.environ, **extra}
