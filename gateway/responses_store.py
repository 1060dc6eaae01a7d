"""Stored responses (``/v1/responses`` with ``store: true``): in memory, per tenant, least recently used evicted.

Owned by the event loop: only the routes touch it, between awaits, so it takes no lock. A tenant sees only its
own responses; another tenant's id is as unknown as one never made (a 404). Nothing survives a restart, and
under ``--api-servers N`` each front end keeps its own (a follow-up: the engine's store).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from gateway.errors import NotFound
from gateway.schemas.openai import ChatMessage
from gateway.schemas.responses import InputItemOut, Response

__all__ = ["ResponseStore", "StoredResponse", "not_found"]


@dataclass(frozen=True)
class StoredResponse:
    """A response as it was answered, its own input items (as ``input_items`` lists them), and the
    conversation a continuation starts from: the chain's messages, this input and this output as chat messages
    (its function calls as the assistant's ``tool_calls``; ``instructions`` are not carried over, as on OpenAI).
    Tuples share the parent's messages rather than copying them."""

    response: Response
    input_items: tuple[InputItemOut, ...]
    conversation: tuple[ChatMessage, ...]


def not_found(response_id: str, param: str | None = None) -> NotFound:
    return NotFound(f"No response found with id '{response_id}'", param=param, code="response_not_found")


class ResponseStore:
    """Per-tenant LRU of stored responses, at most ``per_tenant`` each (0: nothing is stored)."""

    def __init__(self, per_tenant: int) -> None:
        self._per_tenant = per_tenant
        self._tenants: dict[str, OrderedDict[str, StoredResponse]] = {}

    def put(self, tenant: str, stored: StoredResponse) -> None:
        if self._per_tenant <= 0:
            return
        items = self._tenants.setdefault(tenant, OrderedDict())
        items[stored.response.id] = stored
        items.move_to_end(stored.response.id)
        while len(items) > self._per_tenant:
            items.popitem(last=False)

    def get(self, tenant: str, response_id: str, param: str | None = None) -> StoredResponse:
        """The tenant's response (now the most recently used).

        Raises:
            NotFound: no such response for this tenant (another tenant's reads the same).
        """
        items = self._tenants.get(tenant)
        if items is None or response_id not in items:
            raise not_found(response_id, param)
        items.move_to_end(response_id)
        return items[response_id]

    def delete(self, tenant: str, response_id: str) -> None:
        """Raises:
        NotFound: no such response for this tenant."""
        items = self._tenants.get(tenant)
        if items is None or items.pop(response_id, None) is None:
            raise not_found(response_id)

    def __len__(self) -> int:
        return sum(len(items) for items in self._tenants.values())
