"""A full disk under the prefix caches, for real: the store lives on a size-limited tmpfs that a filler
file fills up. A save that runs out of room is a 507 in OpenAI's shape, leaves no file behind, keeps the
previous version of a replaced cache, and inference goes on; once space is back, the next save works.

Mounting needs root (CI containers are); without it the test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_wire import assert_error
from tests.servers import Server, run_server

PROMPT = " ".join(["self", "value", "the", "return"] * 100)
OTHER = " ".join(["import", "class", "def", "yield"] * 100)


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the file system refuses another byte."""
    with path.open("wb", buffering=0) as fh:
        block = b"\0" * 65536
        try:
            while True:
                fh.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 512)


def files(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("tenant-*/*") if p.is_file())


def answer(server: Server, cache: str | None) -> dict:
    body: dict = {"model": "tiny", "prompt": "and then", "max_tokens": 6, "temperature": 0}
    if cache is not None:
        body["prefix_cache"] = cache
    r = httpx.post(f"{server.v1}/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture()
def full_disk_server(tmp_path: Path, models_dir: Path, log_dir: Path) -> Iterator[tuple[Server, Path]]:
    with (
        small_tmpfs(tmp_path / "caches", "8m") as root,
        run_server(["--model", "tiny", "--cache-dir", str(root)], models_dir=models_dir, log_dir=log_dir) as server,
    ):
        yield server, root


def test_a_full_disk_is_a_507_and_nothing_else_changes(full_disk_server: tuple[Server, Path]) -> None:
    server, root = full_disk_server
    url = f"{server.url}/admin/prefix-caches"
    kept = httpx.post(url, json={"name": "kept", "model": "tiny", "prompt": PROMPT}, timeout=60)
    assert kept.status_code == 201, kept.text
    kept_sha = httpx.get(f"{url}/kept?verify=true", timeout=60).json()["integrity"]["file_sha256"]
    before = answer(server, "kept")
    assert before["usage"]["prompt_tokens_details"]["cached_tokens"] == kept.json()["num_tokens"]
    layout = files(root)
    assert layout == ["kept.json", "kept.safetensors"]

    filler = root / "filler"
    fill(filler)
    new = httpx.post(url, json={"name": "new", "model": "tiny", "prompt": OTHER}, timeout=60)
    err = assert_error(new, 507, "server_error", "insufficient_storage")
    assert "disk is full" in err["message"] and new.headers["x-should-retry"] == "false"
    replaced = httpx.post(url, json={"name": "kept", "model": "tiny", "prompt": OTHER, "replace": True}, timeout=60)
    assert_error(replaced, 507, "server_error", "insufficient_storage")
    streamed = httpx.post(url, json={"name": "new", "model": "tiny", "prompt": OTHER, "stream": True}, timeout=60)
    assert streamed.status_code == 200 and '"code":"insufficient_storage"' in streamed.text.replace(" ", "")

    # No partial file; the replaced cache is its previous version, ready and used as before.
    assert files(root) == layout
    assert_error(httpx.get(f"{url}/new", timeout=30), 404, "invalid_request_error", "prefix_cache_not_found")
    got = httpx.get(f"{url}/kept?verify=true", timeout=60).json()
    assert got["status"] == "ready" and got["integrity"]["ok"] and got["integrity"]["file_sha256"] == kept_sha
    assert got["num_tokens"] == kept.json()["num_tokens"]
    during = answer(server, "kept")
    assert during["choices"][0]["text"] == before["choices"][0]["text"]
    assert during["usage"] == before["usage"]
    assert answer(server, None)["usage"]["completion_tokens"] == 6
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200

    filler.unlink()
    again = httpx.post(url, json={"name": "new", "model": "tiny", "prompt": OTHER}, timeout=60)
    assert again.status_code == 201, again.text
    swapped = httpx.post(url, json={"name": "kept", "model": "tiny", "prompt": OTHER, "replace": True}, timeout=60)
    assert swapped.status_code == 201 and swapped.json()["num_tokens"] == again.json()["num_tokens"]
    assert files(root) == ["kept.json", "kept.safetensors", "new.json", "new.safetensors"]
    assert answer(server, "new")["usage"]["prompt_tokens_details"]["cached_tokens"] == again.json()["num_tokens"]
