"""Every setting is declared once, on its Config field: the environment variables, the ``serve`` flags, the help
and ``--print-config`` are all generated from those declarations, and cover every setting that had one."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, get_args, get_origin

import msgspec
import pytest

from adapters.setup import ModelSpec
from gateway.cli.engine_setup import SHARED_MODEL_FIELDS, engine_setup
from gateway.cli.main import main
from gateway.cli.options import help_text, shown_default
from gateway.config import (
    DEFAULT_MODEL,
    LOAD_SETTINGS,
    SETTINGS,
    AdapterConfig,
    Config,
    Declared,
    ModelConfig,
    TenantLimits,
    declared,
    load_config,
)

# Before settings were declared on Config's fields, config.py listed these by hand: they must all stay.
ENV_BEFORE = {
    "MLX_GATEWAY_ADAPTERS": "adapters",
    "MLX_GATEWAY_ADAPTERS_DIR": "adapters_dir",
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
    "MLX_GATEWAY_CORS_ALLOWED_ORIGINS": "cors_allowed_origins",
    "MLX_GATEWAY_API_KEYS": "api_keys",
}
FLAGS_BEFORE = {
    "adapters": "--adapter",
    "adapters_dir": "--adapters-dir",
    "host": "--host",
    "port": "--port",
    "cache_dir": "--cache-dir",
    "models_dir": "--models-dir",
    "admin_key": "--admin-key",
    "api_keys": "--api-key",
    "log_level": "--log-level",
    "log_format": "--log-format",
    "isolation_mode": "--isolation-mode",
    "max_running": "--max-running",
    "max_running_kv_bytes": "--max-running-kv-bytes",
    "max_queued": "--max-queued",
    "max_queued_tokens": "--max-queued-tokens",
    "queue_timeout_seconds": "--queue-timeout",
    "shutdown_timeout_seconds": "--shutdown-timeout",
    "prefix_caches": "--prefix-caches/--no-prefix-caches",
    "prefix_cache_memory_bytes": "--prefix-cache-memory-bytes",
    "prefix_cache_sync_seconds": "--prefix-cache-sync-seconds",
    "replica_id": "--replica-id",
    "max_body_bytes": "--max-body-bytes",
    "cors_allowed_origins": "--cors-allowed-origins",
    "blas": "--blas",
    "engine_layout": "--engine-layout",
    "api_servers": "--api-servers",
}


def test_the_declared_env_names_and_flags_are_the_ones_there_were() -> None:
    assert {d.setting.env: d.name for d in SETTINGS if d.setting.env} == ENV_BEFORE
    assert {d.name: d.setting.flag for d in SETTINGS if d.setting.flag} == FLAGS_BEFORE
    assert {name: (s.env, s.flag) for name, s in LOAD_SETTINGS.items()} == {
        "model": ("MLX_GATEWAY_MODEL", "--model"),
        "model_name": ("MLX_GATEWAY_MODEL_NAME", "--model-name"),
        "config": ("MLX_GATEWAY_CONFIG", "--config"),
    }


def test_every_byte_count_reads_sizes() -> None:
    for struct in (Config, TenantLimits):
        for d in declared(struct):
            assert d.setting.size == d.name.endswith("_bytes"), d.name


def sample(d: Declared) -> tuple[str, Any]:
    """A value for the setting as text (flag or environment) unlike its default, and the field it gives."""
    if d.name == "adapters":
        given = [
            AdapterConfig(name="a", path="/x", base=DEFAULT_MODEL),
            AdapterConfig(name="b", path="/y", base=DEFAULT_MODEL),
        ]
        return f"a=/x,b={DEFAULT_MODEL}:/y", given
    if d.setting.items:
        return ("k1:t1,k2", {"k1": "t1", "k2": "default"}) if d.name == "api_keys" else ("a,b", ["a", "b"])
    if d.setting.size:
        return "3MiB", 3 * 1024**2
    tp = next((a for a in get_args(d.type) if a is not type(None)), d.type) if get_args(d.type) else d.type
    if get_origin(d.type) is Literal:
        choice = next(c for c in get_args(d.type) if c != d.default)
        return str(choice), choice
    if tp is bool:
        return "false", False
    if tp is int:
        return ("2", 2) if d.name == "api_servers" else ("7", 7)
    if tp is float:
        return "2.5", 2.5
    return "/x/y", "/x/y"


WITH_ENV = [d for d in SETTINGS if d.setting.env]
WITH_FLAG = [d for d in SETTINGS if d.setting.flag]


@pytest.mark.parametrize("d", WITH_ENV, ids=[d.name for d in WITH_ENV])
def test_every_declared_variable_sets_its_field(d: Declared) -> None:
    assert d.setting.env is not None
    text, value = sample(d)
    got = getattr(load_config(environ={d.setting.env: text}), d.name)
    assert (list(got) if isinstance(got, tuple) else got) == value and value != d.default
    # Set but empty is "not set", as compose passes unset variables.
    assert getattr(load_config(environ={d.setting.env: ""}), d.name) == getattr(load_config(environ={}), d.name)


@pytest.mark.parametrize("d", WITH_FLAG, ids=[d.name for d in WITH_FLAG])
def test_every_generated_flag_sets_its_field(d: Declared, capsys: pytest.CaptureFixture[str]) -> None:
    assert d.setting.flag is not None
    text, value = sample(d)
    if d.setting.flag.startswith("--prefix-caches/"):
        args = ["--no-prefix-caches"]
    elif d.setting.items:
        args = [a for item in text.split(",") for a in (d.setting.flag, item)]  # repeated
    else:
        args = [d.setting.flag, text]
    assert main(["serve", "--print-config", *args]) == 0
    shown = json.loads(capsys.readouterr().out)
    if d.setting.secret:
        assert text not in json.dumps(shown)
        value = {"<key 1>": "t1", "<key 2>": "default"} if d.name == "api_keys" else "<redacted>"
    assert shown[d.name] == msgspec.to_builtins(value)


def test_help_names_each_flag_its_variable_and_its_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for d in WITH_FLAG:
        assert d.setting.flag is not None
        assert d.setting.flag.split("/")[0] in text
        part = help_text(d.setting, shown_default(d))
        assert " ".join(part.split()) in text and part.count("Default:") <= 1
        assert text.count(f"[env var: {d.setting.env}]") == 1
    assert "Default: 32." in text and "Default: 2GiB." in text and "Default: 120." in text  # max_running, sizes, s
    assert "--print-config" in text


def test_print_config_shows_the_effective_config_with_secrets_redacted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [*ENV_BEFORE, "MLX_GATEWAY_MODEL", "MLX_GATEWAY_MODEL_NAME", "MLX_GATEWAY_CONFIG"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLX_GATEWAY_ADMIN_KEY", "admin-secret")
    monkeypatch.setenv("MLX_GATEWAY_API_KEYS", "key-a:alpha")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert main(["serve", "--print-config", "--model", "tiny", "--max-running", "3"]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out)
    assert "admin-secret" not in out and "key-a" not in out
    assert shown["admin_key"] == "<redacted>" and shown["api_keys"] == {"<key 1>": "alpha"}
    assert shown["max_running"] == 3 and set(shown) == set(Config.__struct_fields__)
    # Defaults resolved at load are shown resolved.
    assert shown["cache_dir"] == "/xdg/mlx-gateway/prefix-caches" and shown["models_dir"] == "/xdg/mlx-gateway/models"
    assert shown["models"][0]["isolation_mode"] == "balanced"


def test_cache_directories_honour_xdg_cache_home_unless_set() -> None:
    c = load_config(environ={"XDG_CACHE_HOME": "/xdg"})
    assert (c.cache_dir, c.models_dir) == ("/xdg/mlx-gateway/prefix-caches", "/xdg/mlx-gateway/models")
    assert str(c.cache_path) == "/xdg/mlx-gateway/prefix-caches"
    env = {"XDG_CACHE_HOME": "/xdg", "MLX_GATEWAY_CACHE_DIR": "/c", "MLX_GATEWAY_MODELS_DIR": "/m"}
    assert (load_config(environ=env).cache_dir, load_config(environ=env).models_dir) == ("/c", "/m")
    c = load_config(environ={})
    assert c.cache_dir is not None and c.cache_dir.endswith("/.cache/mlx-gateway/prefix-caches")


def test_every_model_setting_reaches_the_engine(tmp_path: Any) -> None:
    # The fields only the gateway reads, and the one the spec names otherwise.
    assert set(ModelConfig.__struct_fields__) - set(SHARED_MODEL_FIELDS) == {"path", "default_max_tokens"}
    f = tmp_path / "c.toml"
    f.write_text(
        'isolation_mode = "strict"\nmax_running = 5\n[[models]]\nname = "a"\npath = "tiny"\nseed = 3\nkv_bits = 8\n'
        'prefill_step_size = 64\ncontext_length = 100\n[[models]]\nname = "b"\npath = "small"\n'
        'isolation_mode = "performance"\n'
    )
    config = load_config({"config": str(f), "models_dir": "/m"}, environ={})
    a, b = engine_setup(config).models
    assert a == ModelSpec(
        "a",
        "tiny",
        seed=3,
        kv_bits=8,
        prefill_step_size=64,
        context_length=100,
        isolation_mode="strict",
        max_running=5,
        models_dir="/m",
    )
    assert (b.source, b.isolation_mode, b.max_running) == ("small", "performance", 5)
    spec_only = {f.name for f in dataclasses.fields(ModelSpec)} - set(SHARED_MODEL_FIELDS)
    assert spec_only == {"source", "models_dir", "max_running", "max_running_kv_bytes"}
