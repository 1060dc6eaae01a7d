"""The one home for upstream private names: every use of an underscore name of mlx, mlx-lm, llguidance,
transformers or litestar that the gateway makes is here, each a small documented function (or a type
re-exported for annotations), and nowhere else (``tests/test_upstream_names.py`` fails on any other module
that reaches for one).

Private names change without notice between releases; the version pins in ``pyproject.toml`` are what
keeps them working. So that an upgrade (or an install that ignored the pins) does not break them
silently, importing this module compares the installed versions with :data:`WRITTEN_AGAINST` and logs a
warning naming this module when they differ: re-check each function below against the new release, then
update :data:`WRITTEN_AGAINST`.

Nothing here imports mlx at import time (only :mod:`importlib.metadata`): the front end process, which
must never import mlx, may import this module, so one module serves both processes. Each function imports
what it wraps when called. litestar and transformers are not version-checked: litestar's names here are
types only, and transformers' is used by the tests only.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Types only: a rename breaks the type check, never a running process.
    # litestar: the types in the signatures of the AbstractDTO methods gateway/body.py overrides, which
    # litestar keeps in private modules. llguidance: what ``LLMatcher.grammar_from_json_schema(defaults=...)``
    # takes, a TypedDict declared only in its private extension module's stub (``llguidance`` does not export it).
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.dto._backend import DTOBackend
    from llguidance._lib import JsonCompileOptions
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "WRITTEN_AGAINST",
    "DTOBackend",
    "JsonCompileOptions",
    "SchemaCreator",
    "check_versions",
    "compile_chat_template",
    "hf_tokenizer",
    "snapshot_download",
    "version_mismatches",
]

logger = logging.getLogger(__name__)

# The distributions whose private names this module uses, at the versions each function was checked against
# (mlx is here for mlx-lm's sake: the two are released together and mlx-lm 0.32 wants mlx 0.32).
WRITTEN_AGAINST: dict[str, str] = {"mlx": "0.32.4", "mlx-lm": "0.32.2", "llguidance": "1.9.1"}


def version_mismatches() -> dict[str, tuple[str, str | None]]:
    """The distributions whose installed version differs from :data:`WRITTEN_AGAINST`.

    Returns:
        ``{distribution: (written against, installed or None when not installed)}``; empty when all match.
    """
    found: dict[str, tuple[str, str | None]] = {}
    for dist, expected in WRITTEN_AGAINST.items():
        try:
            installed: str | None = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != expected:
            found[dist] = (expected, installed)
    return found


def check_versions() -> dict[str, tuple[str, str | None]]:
    """Log one warning naming this module when installed versions differ from :data:`WRITTEN_AGAINST`.

    Called once at import; returns :func:`version_mismatches`.
    """
    found = version_mismatches()
    if found:
        differ = ", ".join(
            f"{dist} {got or 'not installed'} (written against {want})" for dist, (want, got) in found.items()
        )
        logger.warning(
            "%s uses private names of these packages and was written against other versions: %s. "
            "Re-check its functions against the installed versions (the pins are in pyproject.toml).",
            __name__,
            differ,
        )
    return found


def hf_tokenizer(wrapper: TokenizerWrapper) -> PreTrainedTokenizerFast:
    """The Hugging Face tokenizer inside mlx-lm's ``TokenizerWrapper`` (``wrapper._tokenizer``).

    The wrapper forwards attribute reads to it but has no public accessor for the object itself, which
    ``TextTokenizer`` and the grammar compiler need (they must share it, not load a second one).
    """
    return wrapper._tokenizer


def snapshot_download(repo: str) -> Path:
    """The local snapshot directory of Hugging Face ``repo``, downloaded if not cached
    (``mlx_lm.utils._download``).

    mlx-lm's own download, so that the files fetched are exactly those ``mlx_lm.load`` would fetch (its
    ``allow_patterns``): the model fingerprint then covers the same files the model is loaded from.
    """
    from mlx_lm.utils import _download

    return Path(_download(repo))


def compile_chat_template(source: str) -> Any:
    """``source`` compiled as transformers compiles chat templates
    (``transformers.utils.chat_template_utils._compile_jinja_template``): its sandbox, filters and globals.

    A ``jinja2.Template``; the tests render a model's own template with it to compare with ours.
    """
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(source)


check_versions()
