"""Adapters registered at run time are recorded in the cache directory replicas share: two real servers on the
tiny model (random weights, random adapter factors: this is about the records, not the answers) see one
another's registrations, deletions and restarts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import Server, run_server


@pytest.fixture(scope="module")
def adapters_dir(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapters.mlx_lm.blas import load_optimised_blas

    load_optimised_blas()
    from adapters.mlx_lm.models import ModelSpec, load_model
    from bench.random_adapters import make_random_adapter

    root = tmp_path_factory.mktemp("replica-adapters")
    model = load_model(ModelSpec("tiny", "tiny", models_dir=str(models_dir))).model
    make_random_adapter(model, root / "one", rank=4, seed=7, magnitude=0.05)
    return root


@pytest.fixture(scope="module")
def pair(
    models_dir: Path, log_dir: Path, adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server, list[str]]]:
    shared = str(tmp_path_factory.mktemp("shared"))
    args = ["--model", "tiny", "--cache-dir", shared, "--adapters-dir", str(adapters_dir)]
    with (
        run_server(args, models_dir=models_dir, log_dir=log_dir) as a,
        run_server(args, models_dir=models_dir, log_dir=log_dir) as b,
    ):
        yield a, b, args


def chat(server: Server, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    return httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)


def test_a_registration_on_one_replica_serves_on_the_other(
    pair: tuple[Server, Server, list[str]], models_dir: Path, log_dir: Path
) -> None:
    a, b, args = pair
    assert chat(b, "one").status_code == 404
    r = httpx.post(f"{a.url}/admin/adapters", json={"name": "one", "path": "one"}, timeout=60)
    assert r.status_code == 201, r.text
    on_b = chat(b, "one")
    assert on_b.status_code == 200 and on_b.json()["model"] == "one"
    assert chat(a, "one").json()["choices"][0]["message"] == on_b.json()["choices"][0]["message"]
    with run_server(args, models_dir=models_dir, log_dir=log_dir) as restarted:  # a replica started later
        assert "one" in [m["id"] for m in httpx.get(f"{restarted.v1}/models").json()["data"]]
    assert httpx.delete(f"{a.url}/admin/adapters/one", timeout=60).status_code == 200
    gone = chat(b, "one")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert "one" not in [m["id"] for m in httpx.get(f"{b.v1}/models").json()["data"]]
