"""The ``mlx-gateway`` command: ``serve``, ``build-model``, ``caches`` and ``keys`` (click)."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from pathlib import Path

import click
import msgspec

from adapters.base import Engine
from adapters.setup import EngineSetup, os_reason
from gateway import __version__
from gateway.cli.caches import caches
from gateway.cli.engine_setup import engine_setup
from gateway.cli.keys import keys
from gateway.cli.options import LIST_OPTIONS, serve_options
from gateway.cli.replicas import replicas
from gateway.config import Config, ConfigError, environment_value, load_config, redacted
from gateway.logs import setup_logging

__all__ = ["main"]

logger = logging.getLogger("gateway")


class _Unusable(Exception):
    """A setting the server cannot work with (the operator's to fix, not a bug): one line, exit status 1."""


def _serve(flags: dict[str, object], print_config: bool) -> int:
    try:
        config = load_config(flags)
    except ConfigError as exc:
        click.echo(f"mlx-gateway: {exc}", err=True)
        return 2
    if print_config:
        click.echo(msgspec.json.format(msgspec.json.encode(redacted(config)), indent=2).decode())
        return 0
    setup_logging(config.log_level, config.log_format)
    from gateway.processes.server import listen, run_server

    try:
        sockets = listen(config.host, config.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", config.host, config.port, os_reason(exc))
        return 1
    setup = engine_setup(config)
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


def engine_layout(config: Config) -> str:
    """``process`` or ``thread``: the configured one, or for ``auto`` the one measured faster on the installed
    backend (docs/performance.md): the process on an NVIDIA GPU, the thread on a CPU. Several API servers need
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

    load_optimised_blas(environment_value("blas"))
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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", "-V", prog_name="mlx-gateway", message="%(prog)s %(version)s")
def cli() -> None:
    """mlx-gateway: an OpenAI-compatible LLM gateway on mlx-lm with named, persistent, isolated prefix caches."""


@cli.command()
@serve_options
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the configuration that the flags, environment and file give, as JSON (keys redacted), and exit.",
)
def serve(print_config: bool, **flags: object) -> int:
    """Serve the OpenAI-compatible API (and the admin API).

    Every setting is taken from, in order: these flags, MLX_GATEWAY_* environment variables, the TOML file
    (--config), the defaults.
    """
    # A list option not given is (), which load_config would read as "set to nothing".
    return _serve({k: (v or None) if k in LIST_OPTIONS else v for k, v in flags.items()}, print_config)


@cli.command("build-model")
@click.argument("preset")
@click.option("--seed", type=int, default=0, show_default=True, help="The seed of a preset's random weights.")
@click.option(
    "--models-dir",
    help="Where built models are kept (default $XDG_CACHE_HOME/mlx-gateway/models, ~/.cache/mlx-gateway/models "
    "without it).",
)
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
