"""How a setting is declared and read: the :class:`Setting` put beside a config field's type, the fields of a
config Struct with their declarations (:func:`declared`), and sizes written as text (:func:`parse_size`).

``gateway.config`` declares the settings with these; ``gateway.cli.options`` makes ``serve``'s options from them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, get_args, get_origin

import msgspec

__all__ = ["ConfigError", "Declared", "Setting", "declared", "parse_size"]


class ConfigError(ValueError):
    """The configuration cannot be used; the message says why."""


@dataclass(frozen=True)
class Setting:
    """How one setting is given besides the TOML file, and how it is explained: put beside a field's type
    (``Annotated[int, Setting(...)]``). A field without one is read from the TOML file only.

    Attributes:
        help: one or two sentences for ``--help``; the default and the environment variable are added to it.
        env: the ``MLX_GATEWAY_*`` variable that sets it (an empty one counts as unset, as compose passes
            unset variables).
        flag: the ``serve`` option, e.g. ``--max-running``; ``--x/--no-x`` for a switch.
        metavar: how ``--help`` names the flag's value, where its type does not say it.
        size: bytes, also written as text (``2GiB``, see :func:`parse_size`) in flags, environment and file.
        items: for a list: turns the items (the environment's comma-separated parts, or the repeated flag's
            values) into the field's value.
        secret: shown redacted by ``--print-config``.
        default_help: the default in words, where the value alone does not say it (None, a computed default).
    """

    help: str = ""
    env: str | None = None
    flag: str | None = None
    metavar: str | None = None
    size: bool = False
    items: Callable[[list[str]], object] | None = None
    secret: bool = False
    default_help: str | None = None


@dataclass(frozen=True)
class Declared:
    """One field of a config Struct with what is declared on it.

    Attributes:
        name: the field's name (its TOML key, and the name flags are passed to ``load_config`` under).
        setting: its :class:`Setting` (an empty one where none is declared).
        type: its type without ``Annotated`` (``int | None``, ``Literal[...]``).
        constraints: its ``msgspec.Meta`` bounds (``ge``, ``le``, ...).
        default: its default value.
    """

    name: str
    setting: Setting
    type: object
    constraints: tuple[msgspec.Meta, ...]
    default: object


def declared(struct: type[msgspec.Struct]) -> tuple[Declared, ...]:
    """The fields of ``struct`` with their declarations, in the order they are written."""
    fields: list[Declared] = []
    for info in msgspec.structs.fields(struct):
        tp, extras = info.type, ()
        if get_origin(tp) is Annotated:
            tp, *extras = get_args(tp)
        setting = next((e for e in extras if isinstance(e, Setting)), Setting())
        metas = tuple(e for e in extras if isinstance(e, msgspec.Meta))
        default = info.default if info.default_factory is msgspec.NODEFAULT else info.default_factory()
        fields.append(Declared(info.name, setting, tp, metas, default))
    return tuple(fields)


_SIZE_TEXT = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(text: str) -> int:
    """Bytes from ``2GiB``, ``512MiB``, ``1.5G`` or ``1000000``: ``Ki``/``Mi``/``Gi``/``Ti`` are powers of
    1024, ``K``/``M``/``G``/``T`` powers of 1000 (as Kubernetes reads them); a trailing ``B`` is optional.

    Raises:
        ConfigError: not a size.
    """
    match = _SIZE_TEXT.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"{text!r} is not a size (examples: 2GiB, 512MiB, 1G, 1000000)")
    number, unit = match.group(1), (match.group(2) or "").lower()
    scale = 1024 ** (" kmgt".index(unit[0])) if unit.endswith("i") else _UNITS[unit]
    return int(float(number) * scale)
