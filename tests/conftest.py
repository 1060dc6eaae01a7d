from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.mlx_lm.blas import load_optimised_blas
from tests.servers import Server, run_server

# Before any test imports mlx: in-process tests on real-sized models need the optimised BLAS too (the
# reference one made a 281-token forward pass of SmolLM2-135M take 30 s instead of under 1).
load_optimised_blas()

CONFIG = """
[[models]]
name = "tiny"
path = "tiny"

[[models]]
name = "tiny-short"
path = "tiny"
context_length = 64
"""


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def server(models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server on the tiny model (and a copy with a 64-token context), auth off."""
    config = tmp_path_factory.mktemp("config") / "gateway.toml"
    config.write_text(CONFIG)
    cache_dir = tmp_path_factory.mktemp("prefix-caches")
    with run_server(
        ["--config", str(config), "--cache-dir", str(cache_dir)], models_dir=models_dir, log_dir=log_dir
    ) as srv:
        yield srv


@pytest.fixture(scope="session")
def auth_server(models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server with API keys for two tenants and an admin key."""
    env = {"MLX_GATEWAY_API_KEYS": "key-alpha:alpha,key-beta:beta", "MLX_GATEWAY_ADMIN_KEY": "admin-secret"}
    cache_dir = tmp_path_factory.mktemp("auth-prefix-caches")
    args = ["--model", "tiny", "--cache-dir", str(cache_dir)]
    with run_server(args, models_dir=models_dir, log_dir=log_dir, env=env) as srv:
        yield srv
