from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_size


def test_defaults_serve_the_real_default_model() -> None:
    c = load_config({}, environ={})
    assert c.host == "127.0.0.1" and c.port == 8000
    assert [(m.name, m.path) for m in c.models] == [("smollm2-135m", "smollm2-135m")] and not c.auth_enabled


def test_flags_over_env_over_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('port = 1111\nhost = "0.0.0.0"\n[[models]]\nname = "a"\npath = "tiny"\nkv_bits = 8\n')
    assert load_config({"config": str(f)}, environ={}).port == 1111
    env = {"MLX_GATEWAY_PORT": "2222", "MLX_GATEWAY_API_KEYS": "k1:t1,k2"}
    c = load_config({"config": str(f)}, environ=env)
    assert c.port == 2222 and c.host == "0.0.0.0" and c.api_keys == {"k1": "t1", "k2": "default"}
    assert c.models[0].kv_bits == 8
    c = load_config({"config": str(f), "port": 3333, "model": "small"}, environ=env)
    assert c.port == 3333 and [m.name for m in c.models] == ["small"]
    env_file = {"MLX_GATEWAY_CONFIG": str(f)}
    assert load_config({}, environ=env_file).port == 1111


@pytest.mark.parametrize(
    "text",
    [
        'port = "many"',
        "port = 70000",  # the OS would take it modulo 65536
        '[[models]]\nname = "a"\npath = "tiny"\nunknown = 1',
        '[[models]]\nname = "a"\npath = "x"\n[[models]]\nname = "a"\npath = "y"',
        "not toml [",
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError):
        load_config({"config": str(f)}, environ={})


def test_prefix_caches_can_be_switched_off_by_env() -> None:
    assert load_config(environ={}).prefix_caches is True
    assert load_config(environ={"MLX_GATEWAY_PREFIX_CACHES": "false"}).prefix_caches is False
    assert load_config(environ={"MLX_GATEWAY_PREFIX_CACHES": "0"}).prefix_caches is False


def test_every_serve_flag_reaches_the_config() -> None:
    flags = {
        "host": "0.0.0.0",
        "port": 9001,
        "api_keys": ["k1", "k2:beta"],
        "admin_key": "adm",
        "log_level": "debug",
        "log_format": "json",
        "isolation_mode": "strict",
        "max_running": 4,
        "max_queued": 7,
        "max_queued_tokens": 1000,
        "queue_timeout_seconds": 2.5,
        "shutdown_timeout_seconds": 3.0,
        "prefix_caches": False,
        "prefix_cache_memory_bytes": "512MiB",
        "max_body_bytes": "1MB",
        "cors_allowed_origins": ["https://a.example", " https://b.example "],
        "cache_dir": "/tmp/c",
        "models_dir": "/tmp/m",
        "blas": "none",
        "model": "tiny",
        "model_name": "my-tiny",
    }
    c = load_config(flags, environ={})
    assert (c.host, c.port, c.admin_key, c.log_level, c.log_format) == ("0.0.0.0", 9001, "adm", "debug", "json")
    assert c.api_keys == {"k1": "default", "k2": "beta"}
    assert (c.isolation_mode, c.max_running, c.max_queued, c.max_queued_tokens) == ("strict", 4, 7, 1000)
    assert (c.queue_timeout_seconds, c.shutdown_timeout_seconds) == (2.5, 3.0)
    assert c.prefix_caches is False and c.prefix_cache_memory_bytes == 512 * 1024**2 and c.max_body_bytes == 10**6
    assert c.cors_allowed_origins == ("https://a.example", "https://b.example")
    assert (c.cache_dir, c.models_dir, c.blas) == ("/tmp/c", "/tmp/m", "none")
    assert [(m.name, m.path) for m in c.models] == [("my-tiny", "tiny")]


def test_flags_override_env_and_file_field_by_field(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('admin_key = "file"\nmax_running = 2\nlog_level = "error"\napi_keys = { "fk" = "f" }\n')
    env = {"MLX_GATEWAY_ADMIN_KEY": "env", "MLX_GATEWAY_API_KEYS": "ek:e", "MLX_GATEWAY_PREFIX_CACHES": "false"}
    c = load_config({"config": str(f)}, environ=env)
    assert (c.admin_key, c.max_running, c.log_level, c.api_keys) == ("env", 2, "error", {"ek": "e"})
    assert c.prefix_caches is False
    c = load_config({"config": str(f), "admin_key": "flag", "api_keys": ["xk"], "prefix_caches": True}, environ=env)
    assert (c.admin_key, c.max_running, c.api_keys, c.prefix_caches) == ("flag", 2, {"xk": "default"}, True)
    # None is "not given": the environment's value stands.
    assert load_config({"admin_key": None, "prefix_caches": None}, environ=env).admin_key == "env"


def test_model_name_flag_names_the_env_model_and_needs_a_model() -> None:
    env = {"MLX_GATEWAY_MODEL": "tiny", "MLX_GATEWAY_MODEL_NAME": "env-name"}
    assert [m.name for m in load_config({}, environ=env).models] == ["env-name"]
    assert [m.name for m in load_config({"model_name": "flag-name"}, environ=env).models] == ["flag-name"]
    # A --model flag is named by --model-name only, never by the environment's name for another model.
    assert [m.name for m in load_config({"model": "small"}, environ=env).models] == ["small"]
    with pytest.raises(ConfigError, match="--model-name"):
        load_config({"model_name": "x"}, environ={})


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("2GiB", 2 * 1024**3),
        ("2gib", 2 * 1024**3),
        ("512 MiB", 512 * 1024**2),
        ("1.5Gi", int(1.5 * 1024**3)),
        ("4G", 4 * 10**9),
        ("4GB", 4 * 10**9),
        ("10k", 10_000),
        ("1000000", 1_000_000),
        ("64B", 64),
    ],
)
def test_sizes_are_read_from_flags_env_and_file(tmp_path: Path, text: str, size: int) -> None:
    assert parse_size(text) == size
    assert load_config({"prefix_cache_memory_bytes": text}, environ={}).prefix_cache_memory_bytes == size
    env = {"MLX_GATEWAY_PREFIX_CACHE_MEMORY_BYTES": text, "MLX_GATEWAY_MAX_BODY_BYTES": text}
    c = load_config({}, environ=env)
    assert c.prefix_cache_memory_bytes == size and c.max_body_bytes == size
    f = tmp_path / "c.toml"
    f.write_text(f'prefix_cache_memory_bytes = "{text}"\n')
    assert load_config({"config": str(f)}, environ={}).prefix_cache_memory_bytes == size


@pytest.mark.parametrize("text", ["", "GiB", "2XB", "-1", "2 GiB extra", "1e9"])
def test_bad_sizes_are_a_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="not a size"):
        load_config({"prefix_cache_memory_bytes": text}, environ={})


def test_api_servers_from_flag_env_and_file_and_not_with_the_thread_layout(tmp_path: Path) -> None:
    assert load_config(environ={}).api_servers == 1
    assert load_config({"api_servers": 4}, environ={}).api_servers == 4
    assert load_config(environ={"MLX_GATEWAY_API_SERVERS": "2"}).api_servers == 2
    f = tmp_path / "c.toml"
    f.write_text("api_servers = 3\n")
    assert load_config({"config": str(f)}, environ={}).api_servers == 3
    with pytest.raises(ConfigError, match="api_servers"):
        load_config({"api_servers": 0}, environ={})
    with pytest.raises(ConfigError, match="engine_layout 'thread'"):
        load_config({"api_servers": 2, "engine_layout": "thread"}, environ={})
    assert load_config({"api_servers": 2, "engine_layout": "auto"}, environ={}).engine_layout == "auto"
