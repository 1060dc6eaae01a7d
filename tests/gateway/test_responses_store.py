"""The stored responses: per tenant, bounded (least recently used evicted), another tenant's id unknown."""

from __future__ import annotations

import pytest

from gateway.errors import NotFound
from gateway.responses_store import ResponseStore, StoredResponse
from gateway.schemas.responses import Response


def _stored(response_id: str) -> StoredResponse:
    response = Response(id=response_id, created_at=0, status="completed", model="tiny", output=[])
    return StoredResponse(response=response, input_items=(), conversation=())


def test_tenants_are_apart() -> None:
    store = ResponseStore(4)
    store.put("alpha", _stored("resp_a"))
    assert store.get("alpha", "resp_a").response.id == "resp_a"
    with pytest.raises(NotFound) as exc:
        store.get("beta", "resp_a")
    assert exc.value.code == "response_not_found" and exc.value.status_code == 404
    with pytest.raises(NotFound):
        store.delete("beta", "resp_a")
    store.delete("alpha", "resp_a")
    with pytest.raises(NotFound):
        store.get("alpha", "resp_a")


def test_least_recently_used_is_evicted_per_tenant() -> None:
    store = ResponseStore(2)
    for rid in ("resp_1", "resp_2"):
        store.put("alpha", _stored(rid))
    store.put("beta", _stored("resp_b"))
    store.get("alpha", "resp_1")  # now the most recently used
    store.put("alpha", _stored("resp_3"))
    with pytest.raises(NotFound):
        store.get("alpha", "resp_2")
    assert store.get("alpha", "resp_1") and store.get("alpha", "resp_3") and store.get("beta", "resp_b")
    assert len(store) == 3


def test_zero_stores_nothing() -> None:
    store = ResponseStore(0)
    store.put("alpha", _stored("resp_1"))
    assert len(store) == 0
