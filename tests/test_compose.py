"""The Compose stack (compose/): its HAProxy config is the one the code generates and HAProxy accepts it, and
Compose itself validates the file (Docker's ``docker compose``, or Debian's ``docker-compose`` installed with
apt-get when neither is here: no Docker daemon is needed to validate)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gateway.replicas.haproxy_config import DnsBackends, render_haproxy_config
from tests.replica_sets import haproxy_executable
from tests.servers import ROOT

COMPOSE = ROOT / "compose"


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose") is None:
        if shutil.which("apt-get") is None:
            pytest.fail("validating compose/ needs docker compose or docker-compose, and there is no apt-get")
        print("docker compose is missing: installing Debian's docker-compose package with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=900)
        install = subprocess.run(
            ["apt-get", "install", "-y", "docker-compose"], env=env, capture_output=True, text=True
        )
        if shutil.which("docker-compose") is None:
            pytest.fail(
                f"could not install docker-compose with apt-get:\n{install.stdout[-2000:]}{install.stderr[-2000:]}"
            )
    return ["docker-compose"]


def compose_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose_command(), "-f", str(path), "config"],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_compose_haproxy_config_is_the_generated_one_and_haproxy_accepts_it() -> None:
    expected = render_haproxy_config(DnsBackends("gateway", 8000), "*:8000")
    assert (COMPOSE / "haproxy.cfg").read_text() == expected, (
        "compose/haproxy.cfg is out of date: regenerate it with\n"
        '.venv/bin/python -c "from gateway.replicas.haproxy_config import *; print(render_haproxy_config('
        "DnsBackends('gateway', 8000), '*:8000'), end='')\" > compose/haproxy.cfg"
    )
    check = subprocess.run(
        [haproxy_executable(), "-c", "-f", str(COMPOSE / "haproxy.cfg")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_compose_validates_the_stack_n_replicas_haproxy_and_one_shared_volume(tmp_path: Path) -> None:
    result = compose_config(COMPOSE / "compose.yaml", {"MLX_GATEWAY_REPLICAS": "4"})
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    gateway, proxy = config["services"]["gateway"], config["services"]["proxy"]
    assert gateway["deploy"]["replicas"] == 4
    assert any(
        str(v).startswith("gateway-data:/data") or (isinstance(v, dict) and v.get("source") == "gateway-data")
        for v in gateway["volumes"]
    )
    assert "gateway-data" in config["volumes"]
    assert proxy["image"].startswith("haproxy:") and any("haproxy.cfg" in str(v) for v in proxy["volumes"])
    # The validation is real: a misspelt key is refused.
    broken = tmp_path / "compose.yaml"
    broken.write_text((COMPOSE / "compose.yaml").read_text().replace("stop_grace_period:", "stop_grace_periode:"))
    shutil.copy(COMPOSE / "haproxy.cfg", tmp_path / "haproxy.cfg")
    refused = compose_config(broken)
    assert refused.returncode != 0 and "stop_grace_periode" in refused.stderr + refused.stdout
