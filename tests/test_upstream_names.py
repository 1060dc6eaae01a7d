"""Upstream private names are used in one module only (adapters/upstream.py), and that module warns when
the installed versions are not the ones it was written against. Nowhere are classes swapped
(``x.__class__ = ...``), recognised by name (``type(x).__name__ == ...``), or subclassed to override an
upstream private method.

The check is syntactic (``ast``), so it cannot know an object's type; an access ``x._name`` (``x`` not
``self``/``cls``) fails unless ``_name`` is one of ours: defined somewhere in this code base *and* not a
private name of the upstream code whose objects we hold (so that ``wrapper._tokenizer`` fails even though
our own classes also have a ``_tokenizer``).
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOMES = {Path("adapters/upstream.py")}  # the modules allowed to touch upstream private names
# Packages whose private modules and names are off limits elsewhere: the ones we depend on and wrap.
UPSTREAM = {"mlx", "mlx_lm", "llguidance", "transformers", "tokenizers", "huggingface_hub", "litestar"}
# Where the private names of the upstream objects we hold are defined: mlx-lm's and mlx's Python code,
# llguidance's and tokenizers' stubs, and transformers' tokenizer classes (not the rest of it: thousands of
# model files, objects we never hold).
SOURCES = {
    "mlx": ("",),
    "mlx_lm": ("",),
    "llguidance": ("",),
    "tokenizers": ("",),
    "transformers": ("tokenization_utils_base.py", "tokenization_utils_tokenizers.py", "tokenization_python.py"),
}
# Public despite the underscore: namedtuple's API (``_replace`` ...) and the stdlib's documented ones.
PUBLIC = {"_replace", "_asdict", "_fields", "_make", "_field_defaults", "_exit", "_getframe"}


def project_files() -> list[Path]:
    """The project's own files: what git tracks or would (ignored folders such as a venv or a build are not ours)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return sorted(Path(p) for p in listed if (ROOT / p).exists())


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def defined_names(tree: ast.AST) -> set[str]:
    """Every name a module defines: functions, classes, variables, attributes it sets, arguments, imports."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


@cache
def parsed() -> dict[Path, ast.Module]:
    return {p: ast.parse((ROOT / p).read_text(), str(p)) for p in project_files()}


@cache
def ours() -> frozenset[str]:
    names: set[str] = set()
    for path, tree in parsed().items():
        if path not in HOMES:
            names |= defined_names(tree)
    return frozenset(names)


@cache
def our_classes() -> frozenset[str]:
    return frozenset(n.name for tree in parsed().values() for n in ast.walk(tree) if isinstance(n, ast.ClassDef))


def overrides_upstream_private(node: ast.ClassDef) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Methods of a class with an upstream base that override one of upstream's private names."""
    bases = [b.attr if isinstance(b, ast.Attribute) else b.id if isinstance(b, ast.Name) else "" for b in node.bases]
    if all(b in our_classes() for b in bases):
        return []
    return [
        f
        for f in node.body
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and private(f.name) and f.name in upstream_privates()
    ]


@cache
def upstream_privates() -> frozenset[str]:
    names: set[str] = set()
    for package, parts in SOURCES.items():
        spec = importlib.util.find_spec(package)  # finds, without importing it (no mlx in this test)
        assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
        root = Path(next(iter(spec.submodule_search_locations)))
        for part in parts:
            files = (root / part).rglob("*.py*") if part == "" else [root / part]
            for file in files:
                if file.suffix in (".py", ".pyi"):
                    names |= {n for n in defined_names(ast.parse(file.read_bytes())) if private(n)}
    return frozenset(names)


def stdlib_modules(tree: ast.Module) -> set[str]:
    """The names this module binds to standard-library modules (``import os`` -> ``os``)."""
    return {
        alias.asname or alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.split(".")[0] in sys.stdlib_module_names
    }


def class_name(node: ast.expr) -> bool:
    """``type(x).__name__`` or ``x.__class__.__name__``."""
    if not (isinstance(node, ast.Attribute) and node.attr == "__name__"):
        return False
    inner = node.value
    is_type_call = isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id == "type"
    return is_type_call or (isinstance(inner, ast.Attribute) and inner.attr == "__class__")


def upstream_private_uses(path: Path, tree: ast.Module) -> list[str]:
    found: list[str] = []
    stdlib = stdlib_modules(tree)

    def where(node: ast.AST) -> str:
        return f"{path}:{getattr(node, 'lineno', 0)}: {ast.unparse(node)[:100]}"

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "__class__" and isinstance(node.ctx, ast.Store):
            found.append(where(node))  # a class swap: overriding an upstream class's private methods from outside
        elif isinstance(node, ast.Compare) and any(class_name(e) for e in [node.left, *node.comparators]):
            found.append(where(node))  # which upstream class, by its name: use isinstance on the public class
        elif isinstance(node, ast.ClassDef):
            found += [f"{path}:{f.lineno}: {node.name}.{f.name}" for f in overrides_upstream_private(node)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] in UPSTREAM and (any(private(p) for p in parts) or any(private(a.name) for a in node.names)):
                found.append(where(node))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in UPSTREAM and any(private(p) for p in parts):
                    found.append(where(node))
        elif isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in PUBLIC:
            base = node.value
            if isinstance(base, ast.Name) and (base.id in ("self", "cls") or base.id in stdlib):
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                continue
            if node.attr not in ours() or node.attr in upstream_privates():
                found.append(where(node))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and private(node.args[1].value)
            and (node.args[1].value not in ours() or node.args[1].value in upstream_privates())
        ):
            found.append(where(node))
    return found


def test_no_module_but_the_home_touches_upstream_private_names() -> None:
    found = [use for path, tree in parsed().items() if path not in HOMES for use in upstream_private_uses(path, tree)]
    assert not found, "upstream private names outside adapters/upstream.py (wrap them there):\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "from mlx_lm.tokenizer_utils import _byte_decoder",
        "from mlx_lm.utils import _download as fetch",
        "from llguidance._lib import JsonCompileOptions",
        "import litestar._openapi.schema_generation",
        "n = len(wrapper._tokenizer)",  # a name our classes use too: still upstream's
        "wrapper._detokenizer.__class__ = X",
        "detok.__class__ = Exact",
        "byte_level = type(d).__name__ == 'BPEStreamingDetokenizer'",
        "byte_level = d.__class__.__name__ in ('A', 'B')",
        "f = getattr(detok, '_maybe_trim_space')",
        "x = obj._a_name_nobody_here_defines",
        "class Exact(BPEStreamingDetokenizer):\n    def _maybe_trim_space(self, text): return text",
    ],
)
def test_the_check_catches(source: str) -> None:
    assert upstream_private_uses(Path("example.py"), ast.parse(source))


@pytest.mark.parametrize(
    "source",
    [
        "self._tokenizer = t",
        "import os\nos._exit(0)",
        "from bench.decode_ceiling import _prompts",  # our own private names are ours to use
        "p = point._replace(x=1)",
        "n = stats._requests",  # defined by our code (adapters/stats.py) and not upstream's
        "message = f'{type(exc).__name__}: {exc}'",
        "class Detok(StreamingDetokenizer):\n    def _our_own_step(self): pass",  # a private name of our own
    ],
)
def test_the_check_lets_pass(source: str) -> None:
    assert not upstream_private_uses(Path("example.py"), ast.parse(source))


def test_the_home_warns_naming_itself_when_versions_differ(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from adapters import upstream

    installed = {"mlx": "0.32.4", "mlx-lm": "0.33.0"}

    def version(dist: str) -> str:
        if dist not in installed:
            raise upstream.importlib.metadata.PackageNotFoundError(dist)
        return installed[dist]

    monkeypatch.setattr(upstream.importlib.metadata, "version", version)
    with caplog.at_level(logging.WARNING, logger="adapters.upstream"):
        found = upstream.check_versions()
    assert found == {"mlx-lm": ("0.32.2", "0.33.0"), "llguidance": ("1.9.1", None)}
    (record,) = caplog.records
    message = record.getMessage()
    assert "adapters.upstream" in message and "pyproject.toml" in message
    assert "mlx-lm 0.33.0 (written against 0.32.2)" in message and "llguidance not installed" in message


def test_the_home_is_quiet_on_the_pinned_versions(caplog: pytest.LogCaptureFixture) -> None:
    from adapters import upstream

    with caplog.at_level(logging.WARNING, logger="adapters.upstream"):
        assert upstream.check_versions() == {}
    assert not caplog.records


def test_the_home_imports_no_mlx() -> None:
    # The front end process may import it; it must not bring mlx (or mlx_lm) in.
    code = (
        "import sys, adapters.upstream; print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
