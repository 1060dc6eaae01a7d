"""The OpenAPI document tells the truth: schemathesis, every check on, against the real server.

Bounded for the suite (a fixed seed, a few examples per operation); ``python -m bench.fuzz`` runs the same
longer. The server runs the tiny model with a 64-token context and ``default_max_tokens = 8``, so that
generation requests stay fast; the document states the same limits any server states (``max_tokens`` at
least 1, a prompt plus ``max_tokens`` within the context is a 400 ``context_length_exceeded``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Server, run_server

CONFIG = """
[[models]]
name = "tiny"
path = "tiny"
context_length = 64
default_max_tokens = 8
"""
SETTINGS = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = 25
SEED = 20261129


@pytest.fixture(scope="module")
def fuzz_server(models_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = tmp_path_factory.mktemp("fuzz-config") / "gateway.toml"
    config.write_text(CONFIG)
    cache_dir = tmp_path_factory.mktemp("fuzz-prefix-caches")
    with run_server(
        ["--config", str(config), "--cache-dir", str(cache_dir)], models_dir=models_dir, log_dir=log_dir
    ) as srv:
        yield srv


def st_run(url: str, examples: int, seed: int, workdir: Path) -> subprocess.CompletedProcess[str]:
    """``st run`` with every check, the settings file's per-operation allowances, and no example database."""
    st = Path(sys.executable).with_name("st")
    cmd = [str(st), "--config-file", str(SETTINGS), "--no-color", "run", f"{url}/docs/openapi.json"]
    cmd += ["--checks", "all", "--max-examples", str(examples), "--seed", str(seed), "--workers", "1"]
    cmd += ["--request-timeout", "60", "--generation-database", "none"]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(600)
def test_schemathesis_finds_nothing(fuzz_server: Server, tmp_path: Path) -> None:
    result = st_run(fuzz_server.url, EXAMPLES, SEED, tmp_path)
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-4000:]
    # Every operation of the document (/metrics, warm, /admin/tenants, the four /v1/responses ones included).
    assert "Tested: 25" in result.stdout
