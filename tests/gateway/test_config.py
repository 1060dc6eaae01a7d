from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config


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
