"""``mlx-gateway serve``'s options, made from the settings' declarations (``gateway.config``).

Every Config field that declares a flag becomes one option here, named, typed and explained by its
declaration: the value's type gives click's type (a ``Literal`` its choices, ``msgspec.Meta`` bounds its
range), the field's default is shown once at the end of the help, then the environment variable. Options
default to None ("not given"), so that ``load_config`` can let the environment and the file stand.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import click

from gateway.config import LOAD_SETTINGS, SETTINGS, Declared, Setting

__all__ = ["LIST_OPTIONS", "help_text", "serve_options", "shown_default"]

F = TypeVar("F", bound=Callable[..., Any])

# The options that are lists: click gives () for "not given", load_config wants None.
LIST_OPTIONS: tuple[str, ...] = tuple(d.name for d in SETTINGS if d.setting.flag and d.setting.items)

_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def _size(n: int) -> str:
    return next((f"{n // scale}{unit}" for unit, scale in _UNITS if n % scale == 0), str(n))


def shown_default(d: Declared) -> str | None:
    """The default as ``--help`` says it, or None where there is nothing to say (no value, no words)."""
    value = d.default
    if d.setting.default_help is not None:
        return d.setting.default_help
    if value is None or value in ((), {}):
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if d.setting.size and isinstance(value, int):
        return _size(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def help_text(setting: Setting, default: str | None) -> str:
    """The help, the default (if any) and the environment variable (if any), in that order."""
    text = setting.help + (f" Default: {default}." if default else "")
    return text + (f"  [env var: {setting.env}]" if setting.env else "")


def _without_none(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _click_type(d: Declared) -> Any:
    """click's type for the flag's value: text where load_config parses it (a size, list items)."""
    tp = _without_none(d.type)
    if d.setting.size or d.setting.items:
        return str
    if get_origin(tp) is Literal:
        # Case-insensitive: click then passes on the choice as declared ("DEBUG" gives "debug").
        return click.Choice([str(a) for a in get_args(tp)], case_sensitive=False)
    lo = next((m.ge for m in d.constraints if m.ge is not None), None)
    hi = next((m.le for m in d.constraints if m.le is not None), None)
    bounded = lo is not None or hi is not None
    if tp is int:
        # An int field's bounds are ints (msgspec types them int | float for every numeric field).
        return (
            click.IntRange(min=None if lo is None else int(lo), max=None if hi is None else int(hi)) if bounded else int
        )
    if tp is float:
        return click.FloatRange(min=lo, max=hi) if bounded else float
    return str


def _option(name: str, setting: Setting, default: str | None, declared: Declared | None) -> Callable[[F], F]:
    assert setting.flag is not None
    kwargs: dict[str, Any] = {"help": help_text(setting, default), "default": None}
    if declared is not None and _without_none(declared.type) is bool:
        kwargs["is_flag"] = True  # "--x/--no-x": a switch whose None means "not given"
    elif declared is not None:
        kwargs["type"] = _click_type(declared)
    if setting.items:
        kwargs.update(multiple=True, default=())
    if setting.metavar or (declared is not None and declared.setting.size):
        kwargs["metavar"] = setting.metavar or "SIZE"
    return click.option(setting.flag, name, **kwargs)


def serve_options(command: F) -> F:
    """Add an option for each of ``LOAD_SETTINGS`` (the model, its name, the file) and each Config field that
    declares a flag, in that order, to a click command function."""
    options = [_option(name, s, s.default_help, None) for name, s in LOAD_SETTINGS.items()]
    options += [_option(d.name, d.setting, shown_default(d), d) for d in SETTINGS if d.setting.flag]
    # Applied innermost first, as stacked decorators are, so that --help lists them in declaration order.
    for option in reversed(options):
        command = option(command)
    return command
