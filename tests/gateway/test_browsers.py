"""gateway.browsers' CORS settings, read from a TOML file, on a minimal Litestar app (the real server's CORS,
from the environment, is tested in tests/integration/test_cors.py)."""

from __future__ import annotations

from pathlib import Path

from litestar import Litestar, get
from litestar.testing import TestClient

from gateway.browsers import cors_config
from gateway.config import load_config


@get("/ping", sync_to_thread=False)
def ping() -> dict[str, str]:
    return {"pong": "yes"}


def test_origins_from_the_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('cors_allowed_origins = ["https://app.example.com", "https://other.example"]\n')
    config = load_config({"config": str(path)}, environ={})
    assert config.cors_allowed_origins == ("https://app.example.com", "https://other.example")
    assert load_config({}, environ={}).cors_allowed_origins == ()
    assert cors_config(()) is None


def test_a_star_allows_any_origin() -> None:
    app = Litestar([ping], cors_config=cors_config(["*"]))
    with TestClient(app) as client:
        preflight = client.options(
            "/ping", headers={"origin": "https://any.example", "access-control-request-method": "GET"}
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "*"
        r = client.get("/ping", headers={"origin": "https://any.example"})
        assert r.json() == {"pong": "yes"}
        assert r.headers["access-control-allow-origin"] == "*"
