"""The stored responses: per tenant, bounded (least recently used deleted), another tenant's id unknown, kept on
disk (what a restart or another replica reads), expired after their time to live."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from gateway.errors import NotFound
from gateway.responses.store import ResponseStore, StoredResponse
from gateway.schemas.responses import Response


def rid() -> str:
    return f"resp_{uuid.uuid4().hex}"


def stored(response_id: str, at: float = 0.0) -> StoredResponse:
    response = Response(id=response_id, created_at=0, status="completed", model="tiny", output=[])
    return StoredResponse(
        response=response, input_items=(), conversation=(), model="tiny", token_ids=(1, 2, 3), stored_at=at
    )


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.mark.parametrize("on_disk", [True, False])
def test_tenants_are_apart(tmp_path: Path, on_disk: bool) -> None:
    async def go() -> None:
        store = ResponseStore(4, 3600, tmp_path if on_disk else None, Clock())
        a = rid()
        await store.put("alpha", stored(a))
        assert (await store.get("alpha", a)).response.id == a
        with pytest.raises(NotFound) as exc:
            await store.get("beta", a)
        assert exc.value.code == "response_not_found" and exc.value.status_code == 404
        with pytest.raises(NotFound):
            await store.delete("beta", a)
        await store.delete("alpha", a)
        with pytest.raises(NotFound):
            await store.get("alpha", a)

    run(go())


def test_least_recently_used_is_deleted_per_tenant(tmp_path: Path) -> None:
    async def go() -> None:
        store = ResponseStore(2, 3600, tmp_path, Clock())
        one, two, three, other = rid(), rid(), rid(), rid()
        for r in (one, two):
            assert await store.put("alpha", stored(r)) == []
        await store.put("beta", stored(other))
        await store.get("alpha", one)  # now the most recently used
        assert await store.put("alpha", stored(three)) == [two]
        with pytest.raises(NotFound):
            await store.get("alpha", two)
        assert await store.get("alpha", one) and await store.get("alpha", three) and await store.get("beta", other)
        assert len(store) == 3
        assert len(list(tmp_path.rglob("*.json"))) == 3  # the deleted one is gone from disk too

    run(go())


def test_another_process_reads_what_one_stored(tmp_path: Path) -> None:
    """A restart, or a replica sharing the directory: a new store finds the record on disk."""

    async def go() -> None:
        r = rid()
        await ResponseStore(4, 3600, tmp_path, Clock()).put("alpha", stored(r))
        again = ResponseStore(4, 3600, tmp_path, Clock())
        got = await again.get("alpha", r)
        assert got.token_ids == (1, 2, 3) and got.response.id == r
        with pytest.raises(NotFound):
            await again.get("beta", r)
        await again.delete("alpha", r)
        with pytest.raises(NotFound):
            await ResponseStore(4, 3600, tmp_path, Clock()).get("alpha", r)

    run(go())


def test_records_expire(tmp_path: Path) -> None:
    async def go() -> None:
        clock = Clock()
        store = ResponseStore(4, 60, tmp_path, clock)
        r = rid()
        await store.put("alpha", stored(r, at=0.0))
        clock.now = 59
        assert await store.get("alpha", r)
        clock.now = 61
        with pytest.raises(NotFound):
            await store.get("alpha", r)
        assert not list(tmp_path.rglob("*.json"))

    run(go())


@pytest.mark.parametrize("bad", ["../../etc/passwd", "resp_x", "resp_" + "0" * 31 + "/", "resp_" + "A" * 32])
def test_ids_that_cannot_be_ours_name_no_file(tmp_path: Path, bad: str) -> None:
    async def go() -> None:
        store = ResponseStore(4, 3600, tmp_path, Clock())
        with pytest.raises(NotFound):
            await store.get("alpha", bad)
        with pytest.raises(NotFound):
            await store.delete("alpha", bad)

    run(go())


def test_an_unwritable_folder_keeps_records_in_memory(tmp_path: Path) -> None:
    async def go() -> None:
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        store = ResponseStore(4, 3600, blocker, Clock())
        r = rid()
        await store.put("alpha", stored(r))
        assert (await store.get("alpha", r)).response.id == r

    run(go())


def test_zero_stores_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        store = ResponseStore(0, 3600, tmp_path, Clock())
        await store.put("alpha", stored(rid()))
        assert len(store) == 0 and not list(tmp_path.rglob("*.json"))

    run(go())


def test_a_delete_by_another_process_is_seen(tmp_path: Path) -> None:
    async def go() -> None:
        here, there = ResponseStore(4, 3600, tmp_path, Clock()), ResponseStore(4, 3600, tmp_path, Clock())
        r = rid()
        await here.put("alpha", stored(r))
        assert await there.get("alpha", r)
        await there.delete("alpha", r)
        with pytest.raises(NotFound):
            await here.get("alpha", r)

    run(go())
