"""Adapters in the config: ``--adapter NAME=PATH`` / ``NAME=BASE:PATH``, ``[[adapters]]`` tables and ``[[models]]``
entries with ``adapter =``, each checked against the served models when the config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import AdapterConfig, load_config
from gateway.settings import ConfigError

TWO_MODELS = """
[[models]]
name = "llama"
path = "tiny"

[[models]]
name = "org/model:v2"
path = "tiny"
"""


def config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return str(path)


def test_a_flag_names_its_base_when_several_models_are_served(tmp_path: Path) -> None:
    config = load_config(
        {"config": config_file(tmp_path, TWO_MODELS), "adapters": ["sql=org/model:v2:/a/b:c", "chat=llama:rel"]}, {}
    )
    assert config.adapters == (
        AdapterConfig(name="sql", path="/a/b:c", base="org/model:v2"),
        AdapterConfig(name="chat", path=str(Path("rel").resolve()), base="llama"),
    )
    with pytest.raises(ConfigError, match="several models are served .* name its base"):
        load_config({"config": config_file(tmp_path, TWO_MODELS), "adapters": ["sql=/a"]}, {})


def test_the_file_takes_adapters_tables_and_models_entries(tmp_path: Path) -> None:
    text = (
        TWO_MODELS
        + """
[[models]]
name = "support"
base = "llama"
adapter = "/adapters/support"
tenant = "acme"

[[adapters]]
name = "sql"
base = "org/model:v2"
path = "/adapters/sql"
"""
    )
    config = load_config({"config": config_file(tmp_path, text)}, {})
    assert [m.name for m in config.models] == ["llama", "org/model:v2"]
    assert config.adapters == (
        AdapterConfig(name="sql", path="/adapters/sql", base="org/model:v2"),
        AdapterConfig(name="support", path="/adapters/support", base="llama", tenant="acme"),
    )


@pytest.mark.parametrize(
    ("adapters", "words"),
    [
        (["x"], "NAME=PATH or NAME=BASE:PATH"),
        (["tiny=/a"], "must be unique"),
        (["a=/x", "a=/y"], "must be unique"),
    ],
)
def test_bad_adapters_are_config_errors(adapters: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config({"model": "tiny", "adapters": adapters}, {})


def test_an_unknown_base_is_a_config_error(tmp_path: Path) -> None:
    text = TWO_MODELS + '\n[[adapters]]\nname = "a"\nbase = "nope"\npath = "/a"\n'
    with pytest.raises(ConfigError, match="its base 'nope' is not a served model"):
        load_config({"config": config_file(tmp_path, text)}, {})
