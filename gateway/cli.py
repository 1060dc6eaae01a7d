"""The ``mlx-gateway`` command: ``serve`` and ``build-model``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gateway.config import Config, ConfigError, load_config
from gateway.logs import setup_logging

__all__ = ["main"]

logger = logging.getLogger("gateway")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(
            {
                "config": args.config,
                "model": args.model,
                "model_name": args.model_name,
                "host": args.host,
                "port": args.port,
                "cache_dir": args.cache_dir,
                "models_dir": args.models_dir,
            }
        )
    except ConfigError as exc:
        print(f"mlx-gateway: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    engine = _make_engine(config)

    from gateway.server import run_server

    return run_server(config, engine)


def _make_engine(config: Config):  # noqa: ANN202 - the concrete engine type lives behind a lazy import
    # The BLAS must be chosen before anything imports mlx.
    from adapters.mlx_lm.blas import load_optimised_blas

    blas = load_optimised_blas(config.blas)
    import mlx.core as mx

    from adapters.mlx_lm.engine import MlxEngine
    from adapters.mlx_lm.models import ModelSpec

    device = mx.default_device()
    if device == mx.cpu:
        logger.info("device cpu, BLAS %s (%s), weights as float32", blas.name, blas.path or "bundled")
        if not blas.fast:
            logger.warning(
                "mlx is using its bundled reference BLAS: CPU matmul will be about 30x slower. "
                "Install the 'cpu' extra (pip install 'mlx-gateway[cpu]') to get MKL."
            )
    else:
        logger.info("device %s", device)
    specs = [
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
        )
        for m in config.models
    ]
    if not config.prefix_caches:
        return MlxEngine(specs, None, config.profile_path)
    from prefix_caches import PrefixCacheStore

    store = PrefixCacheStore(config.cache_path, config.prefix_cache_memory_bytes)
    store.scan()
    return MlxEngine(specs, store, config.profile_path)


def _build_model(args: argparse.Namespace) -> int:
    _setup_logging("info")
    from adapters.mlx_lm.blas import load_optimised_blas

    load_optimised_blas()
    from adapters.mlx_lm.gguf import GGUFError, build_from_gguf
    from adapters.mlx_lm.presets import PRESETS, build_model, default_models_dir
    from adapters.mlx_lm.registry_models import REGISTRY_MODELS, build_registry_model

    models_dir = Path(args.models_dir) if args.models_dir else default_models_dir()
    try:
        if args.preset in PRESETS:
            path = build_model(
                args.preset,
                seed=args.seed,
                models_dir=models_dir,
                progress=lambda msg: print(f"[build-model {args.preset}] {msg}", file=sys.stderr, flush=True),
            )
        elif args.preset in REGISTRY_MODELS:
            path = build_registry_model(args.preset, models_dir)
        elif args.preset.lower().endswith(".gguf"):
            path = build_from_gguf(Path(args.preset).expanduser(), models_dir)
        else:
            names = ", ".join([*PRESETS, *REGISTRY_MODELS])
            print(f"mlx-gateway: unknown model {args.preset!r}; give one of {names} or a .gguf file", file=sys.stderr)
            return 2
    except (GGUFError, RuntimeError) as exc:
        print(f"mlx-gateway: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument(
        "--model",
        help="smollm2-135m (the default, a real model), a preset with random weights (tiny, small, llama-1b, "
        "llama-8b), a .gguf file (llama architecture; F32, F16, Q4_0, Q4_1, Q8_0), an mlx-lm directory or a "
        "Hugging Face id",
    )
    serve.add_argument("--model-name", help="the model's id in the API (default: --model as given)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--config", help="a TOML config file")
    serve.add_argument("--cache-dir", help="where named prefix caches are stored")
    serve.add_argument("--models-dir", help="where built preset models are cached")
    serve.set_defaults(func=_serve)
    build = sub.add_parser(
        "build-model", help="build (once, cached) a preset, a registry model or a .gguf file's mlx-lm directory"
    )
    build.add_argument("preset", help="a preset, smollm2-135m, or a .gguf file")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--models-dir")
    build.set_defaults(func=_build_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
