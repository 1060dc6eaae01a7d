"""The ``mlx-gateway`` command: ``serve``, ``build-model``, ``caches`` and ``keys`` (click)."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from pathlib import Path

import click
import msgspec

from adapters.base import Engine
from adapters.setup import EngineSetup, ModelSpec, ResponseKVSetup, StoreSetup, os_reason
from gateway import __version__
from gateway.cli.caches import caches
from gateway.cli.keys import keys
from gateway.cli.replicas import replicas
from gateway.config import Config, ConfigError, load_config
from gateway.logs import setup_logging

__all__ = ["main"]

logger = logging.getLogger("gateway")


def _redacted(config: Config) -> dict[str, object]:
    shown = msgspec.to_builtins(config)
    shown["api_keys"] = {f"<key {i}>": tenant for i, tenant in enumerate(config.api_keys.values(), 1)}
    if config.admin_key:
        shown["admin_key"] = "<redacted>"
    return shown


class _Unusable(Exception):
    """A setting the server cannot work with (the operator's to fix, not a bug): one line, exit status 1."""


def _serve(flags: dict[str, object], print_config: bool) -> int:
    try:
        config = load_config(flags)
    except ConfigError as exc:
        click.echo(f"mlx-gateway: {exc}", err=True)
        return 2
    if print_config:
        click.echo(msgspec.json.format(msgspec.json.encode(_redacted(config)), indent=2).decode())
        return 0
    setup_logging(config.log_level, config.log_format)
    from gateway.processes.server import listen, run_server

    try:
        sockets = listen(config.host, config.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", config.host, config.port, os_reason(exc))
        return 1
    setup = _engine_setup(config)
    try:
        engine = _make_engine(config, setup)
    except _Unusable as exc:
        logger.error("%s", exc)
        for sock in sockets:
            sock.close()
        return 1
    if config.api_servers > 1:
        from adapters.remote import RemoteEngine
        from gateway.processes.api_servers import serve_api_servers

        assert isinstance(engine, RemoteEngine)  # several API servers imply the process layout
        return serve_api_servers(config, setup, engine, sockets)
    return run_server(config, engine, sockets)


def _engine_setup(config: Config) -> EngineSetup:
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
    models = tuple(
        ModelSpec(
            name=m.name,
            source=m.path,
            seed=m.seed,
            max_kv_size=m.max_kv_size,
            trust_remote_code=m.trust_remote_code,
            kv_bits=m.kv_bits,
            kv_group_size=m.kv_group_size,
            quantized_kv_start=m.quantized_kv_start,
            context_length=m.context_length,
            prefill_step_size=m.prefill_step_size,
            models_dir=config.models_dir,
            isolation_mode=m.isolation_mode or config.isolation_mode,
            max_running=config.max_running,
            max_running_kv_bytes=config.max_running_kv_bytes,
        )
        for m in config.models
    )
    responses = ResponseKVSetup(
        memory_bytes=config.response_kv_memory_bytes,
        ttl_seconds=config.response_kv_ttl_seconds,
        default_tenant_bytes=config.limits(config.default_tenant + "\0").max_response_kv_bytes,
        tenant_bytes={tenant: config.limits(tenant).max_response_kv_bytes for tenant in config.tenants},
    )
    return EngineSetup(
        models=models, store=store, responses=responses, blas=config.blas, profile_path=config.profile_path
    )


def engine_layout(config: Config) -> str:
    """``process`` or ``thread``: the configured one, or for ``auto`` the one measured faster on the installed
    backend (README, Performance): the process on an NVIDIA GPU, the thread on a CPU. Several API servers need
    the process (the config refuses them with ``thread``)."""
    if config.engine_layout != "auto":
        return config.engine_layout
    if config.api_servers > 1:
        return "process"
    # mlx's CUDA backend is its own distribution (mlx-cuda-13, pulled in by the `cuda` extra).
    cuda = any(
        (dist.metadata["Name"] or "").lower().replace("_", "-").startswith("mlx-cuda")
        for dist in importlib.metadata.distributions()
    )
    return "process" if cuda else "thread"


def _make_engine(config: Config, setup: EngineSetup) -> Engine:
    if engine_layout(config) == "thread":
        from adapters.mlx_lm.host import EngineSetupError, build_engine

        try:
            return build_engine(setup)  # type: ignore[no-any-return]
        except EngineSetupError as exc:
            raise _Unusable(str(exc)) from exc
    from adapters.remote import EngineProcessError, RemoteEngine

    command = [sys.executable, "-m", "gateway.processes.engine_process", config.log_level, config.log_format]
    engine = RemoteEngine(setup, command)
    try:
        engine.launch()
    except EngineProcessError as exc:
        raise _Unusable(str(exc)) from exc
    return engine


def _build_model(preset: str, seed: int, models_dir_flag: str | None) -> int:
    setup_logging("info", "text")
    from adapters.mlx_lm.blas import load_optimised_blas

    load_optimised_blas()
    from adapters.mlx_lm.gguf import GGUFError, build_from_gguf
    from adapters.mlx_lm.presets import PRESETS, build_model, default_models_dir
    from adapters.mlx_lm.registry_models import REGISTRY_MODELS, build_registry_model

    models_dir = Path(models_dir_flag) if models_dir_flag else default_models_dir()
    try:
        if preset in PRESETS:
            path = build_model(
                preset,
                seed=seed,
                models_dir=models_dir,
                progress=lambda msg: click.echo(f"[build-model {preset}] {msg}", err=True),
            )
        elif preset in REGISTRY_MODELS:
            path = build_registry_model(preset, models_dir)
        elif preset.lower().endswith(".gguf"):
            path = build_from_gguf(Path(preset).expanduser(), models_dir)
        else:
            names = ", ".join([*PRESETS, *REGISTRY_MODELS])
            click.echo(f"mlx-gateway: unknown model {preset!r}; give one of {names} or a .gguf file", err=True)
            return 2
    except (GGUFError, RuntimeError) as exc:
        click.echo(f"mlx-gateway: {exc}", err=True)
        return 1
    click.echo(path)
    return 0


def _env(var: str) -> str:
    return f"  [env var: {var}]"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", "-V", prog_name="mlx-gateway", message="%(prog)s %(version)s")
def cli() -> None:
    """mlx-gateway: an OpenAI-compatible LLM gateway on mlx-lm with named, persistent, isolated prefix caches."""


@cli.command()
@click.option(
    "--model",
    help="smollm2-135m (the default, a real model), a preset with random weights (tiny, small, llama-1b, "
    "llama-8b), a .gguf file (llama architecture; F32, F16, Q4_0, Q4_1, Q8_0 kept; K-quants read as "
    "float16), an mlx-lm directory or a Hugging Face id. Replaces the config file's [[models]]."
    + _env("MLX_GATEWAY_MODEL"),
)
@click.option(
    "--model-name", help="The model's id in the API (default: --model as given)." + _env("MLX_GATEWAY_MODEL_NAME")
)
@click.option(
    "--host",
    help="The address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)." + _env("MLX_GATEWAY_HOST"),
)
@click.option("--port", type=int, help="The port to listen on (default 8000)." + _env("MLX_GATEWAY_PORT"))
@click.option(
    "--config",
    "config_file",
    help="A TOML config file (flags and environment override it)." + _env("MLX_GATEWAY_CONFIG"),
)
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    metavar="KEY[:TENANT]",
    help="Require this API key on /v1 (repeat for several; a key without a tenant belongs to 'default'). Keys "
    "given as flags are visible to other users in `ps`: prefer the environment variable (KEY:TENANT,...)."
    + _env("MLX_GATEWAY_API_KEYS"),
)
@click.option(
    "--admin-key",
    help="The key that manages any tenant's prefix caches. Visible in `ps` as a flag: prefer the environment "
    "variable." + _env("MLX_GATEWAY_ADMIN_KEY"),
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Default info." + _env("MLX_GATEWAY_LOG_LEVEL"),
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    help="text: a line per record; json: a JSON object per line (default text)." + _env("MLX_GATEWAY_LOG_FORMAT"),
)
@click.option(
    "--isolation-mode",
    type=click.Choice(["strict", "balanced", "performance"]),
    help="strict: each request alone in its forward passes; balanced (default): continuous batching, each "
    "request on its own cache; performance: balanced plus automatic prefix reuse within a tenant."
    + _env("MLX_GATEWAY_ISOLATION_MODE"),
)
@click.option(
    "--max-running",
    type=click.IntRange(min=1),
    help="Requests in the engine at once, and sequences decoded together (default 32)."
    + _env("MLX_GATEWAY_MAX_RUNNING"),
)
@click.option(
    "--max-running-kv-bytes",
    metavar="SIZE",
    help="KV bytes a model's running sequences may hold at once, each at its longest (e.g. 8GiB; default half "
    "of the device's memory)." + _env("MLX_GATEWAY_MAX_RUNNING_KV_BYTES"),
)
@click.option(
    "--max-queued",
    type=click.IntRange(min=0),
    help="Requests waiting behind them before new ones get 429 (default 256)." + _env("MLX_GATEWAY_MAX_QUEUED"),
)
@click.option(
    "--max-queued-tokens",
    type=click.IntRange(min=0),
    help="Prompt tokens waiting before new requests get 429 (default 2000000)." + _env("MLX_GATEWAY_MAX_QUEUED_TOKENS"),
)
@click.option(
    "--queue-timeout",
    "queue_timeout_seconds",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="How long a request may wait for a slot before it gets 429 (default 120)."
    + _env("MLX_GATEWAY_QUEUE_TIMEOUT_SECONDS"),
)
@click.option(
    "--shutdown-timeout",
    "shutdown_timeout_seconds",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="On SIGTERM/SIGINT, how long running requests may finish (default 30)."
    + _env("MLX_GATEWAY_SHUTDOWN_TIMEOUT_SECONDS"),
)
@click.option(
    "--cache-dir",
    help="Where named prefix caches are stored (default ~/.cache/mlx-gateway/prefix-caches)."
    + _env("MLX_GATEWAY_CACHE_DIR"),
)
@click.option(
    "--models-dir",
    help="Where built and converted models are kept (default ~/.cache/mlx-gateway/models)."
    + _env("MLX_GATEWAY_MODELS_DIR"),
)
@click.option(
    "--prefix-caches/--no-prefix-caches",
    default=None,
    help="Named prefix caches on (default) or off (requests naming one and the admin cache routes get 400)."
    + _env("MLX_GATEWAY_PREFIX_CACHES"),
)
@click.option(
    "--prefix-cache-memory-bytes",
    metavar="SIZE",
    help="Memory for resident prefix caches, least recently used evicted first: bytes or a size such as 2GiB, "
    "512MiB, 4G (default 2GiB)." + _env("MLX_GATEWAY_PREFIX_CACHE_MEMORY_BYTES"),
)
@click.option(
    "--prefix-cache-sync-seconds",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="How often to re-read the cache directory, which other replicas may share: their creates, replaces "
    "and deletes are seen within this time (default 1; 0: never)." + _env("MLX_GATEWAY_PREFIX_CACHE_SYNC_SECONDS"),
)
@click.option(
    "--replica-id",
    help="This process's name in /health, to tell replicas apart behind a load balancer (default hostname:port)."
    + _env("MLX_GATEWAY_REPLICA_ID"),
)
@click.option(
    "--max-body-bytes",
    metavar="SIZE",
    help="Larger request bodies get 413: bytes or a size such as 16MiB (default 16MiB)."
    + _env("MLX_GATEWAY_MAX_BODY_BYTES"),
)
@click.option(
    "--cors-allowed-origins",
    multiple=True,
    metavar="ORIGIN[,ORIGIN]",
    help="Browser origins allowed by CORS (repeat, or separate with commas; * for any; default none: CORS off)."
    + _env("MLX_GATEWAY_CORS_ALLOWED_ORIGINS"),
)
@click.option(
    "--blas",
    metavar="PATH|none",
    help="The BLAS library for mlx on CPU (default: search for MKL; 'none': mlx's bundled reference BLAS)."
    + _env("MLX_GATEWAY_BLAS"),
)
@click.option(
    "--engine-layout",
    type=click.Choice(["auto", "process", "thread"]),
    help="process: the engine in its own process, HTTP in this one; thread: both here; auto (default): the "
    "faster for the installed backend." + _env("MLX_GATEWAY_ENGINE_LAYOUT"),
)
@click.option(
    "--api-servers",
    type=click.IntRange(min=1),
    metavar="N",
    help="HTTP front-end processes on the one port, feeding one engine process (default 1). More than 1 "
    "implies --engine-layout process; admission and tenants' limits are counted once for all of them."
    + _env("MLX_GATEWAY_API_SERVERS"),
)
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the configuration that the flags, environment and file give (keys redacted), and exit.",
)
def serve(
    print_config: bool,
    config_file: str | None,
    api_keys: tuple[str, ...],
    cors_allowed_origins: tuple[str, ...],
    **flags: object,
) -> int:
    """Serve the OpenAI-compatible API (and the admin API).

    Every setting is taken from, in order: these flags, MLX_GATEWAY_* environment variables, the TOML file
    (--config), the defaults.
    """
    origins = [o for item in cors_allowed_origins for o in item.split(",")]
    return _serve(
        {
            **flags,
            "config": config_file,
            "api_keys": list(api_keys) or None,
            "cors_allowed_origins": origins or None,
        },
        print_config,
    )


@cli.command("build-model")
@click.argument("preset")
@click.option("--seed", type=int, default=0, show_default=True, help="The seed of a preset's random weights.")
@click.option("--models-dir", help="Where built models are kept (default ~/.cache/mlx-gateway/models).")
def build_model_command(preset: str, seed: int, models_dir: str | None) -> int:
    """Build (once, cached) a preset, smollm2-135m or a .gguf file's mlx-lm directory, and print its path."""
    return _build_model(preset, seed, models_dir)


cli.add_command(caches)
cli.add_command(keys)
cli.add_command(replicas)


def main(argv: list[str] | None = None) -> int:
    """The ``mlx-gateway`` command; returns its exit status."""
    try:
        result = cli.main(args=argv, prog_name="mlx-gateway", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
