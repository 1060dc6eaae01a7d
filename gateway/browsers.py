"""What browsers get: the playground's files, Swagger UI's files, and CORS.

Every file a page loads is shipped in the package (``gateway/static``), so the pages work without internet.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from litestar import Router
from litestar.config.cors import CORSConfig
from litestar.static_files import create_static_files_router

__all__ = ["DOCS_ASSETS", "cors_config", "docs_assets_router", "playground_router"]

_STATIC = Path(__file__).resolve().parent / "static"

# Where /docs finds Swagger UI's script, preset, stylesheet and icon (absolute: /docs and /docs/ are one page).
DOCS_ASSETS = "/docs/assets"

# Response headers a page on another origin may read: the browser hides all but a few unless listed.
_EXPOSED = ["x-prefix-cache", "x-request-id", "x-should-retry", "retry-after"]


def playground_router() -> Router:
    """``/playground``: one page of plain HTML, JavaScript and CSS that talks to this server's API."""
    return create_static_files_router(
        "/playground", [_STATIC / "playground"], html_mode=True, name="playground", include_in_schema=False
    )


def docs_assets_router() -> Router:
    """Swagger UI's files (vendored from ``swagger-ui-dist``; ``static/swagger-ui/VENDORED.md`` says why)."""
    return create_static_files_router(
        DOCS_ASSETS, [_STATIC / "swagger-ui"], name="docs-assets", include_in_schema=False
    )


def cors_config(allowed_origins: Sequence[str]) -> CORSConfig | None:
    """CORS for these origins (``"*"`` for any), or None (no CORS headers at all) when there are none.

    Litestar's middleware wraps the exception handlers, so error responses carry the headers too (a browser
    shows a page the error's body only then).
    """
    if not allowed_origins:
        return None
    return CORSConfig(allow_origins=list(allowed_origins), expose_headers=_EXPOSED)
