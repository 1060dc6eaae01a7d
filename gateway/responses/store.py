"""Stored responses (``/v1/responses`` with ``store``): per tenant, in memory and in the cache directory.

A record keeps the response as answered, its own input items, the conversation a continuation renders (the
chain's messages, this input and this output; ``instructions`` are not carried over, as on OpenAI) and the
token ids the model saw and wrote, which a continuation starts with (``gateway.responses.continuation``).

Disk. Each record is one JSON file, ``<cache dir>/responses/tenant-<digest>/<id>.json``, written atomically
(temporary file, fsync, rename) before the response's last event or body leaves, so that it survives a restart
and a replica sharing the directory finds it (a replica that does not hold an id reads the file before it
answers 404, and one that holds it checks that the file is still there: another may have deleted it). Records
expire ``ttl_seconds`` after they were made; each tenant keeps at most ``per_tenant``, the least recently used
deleted first. Only this process's records count toward that cap (a replica's are counted by that replica).
Without a usable directory records live in memory only, and the log says so.

Threads. The event loop owns the index (``_tenants``): only the routes touch it, between awaits. Disk reads
and writes run in worker threads on immutable records; the file system orders them (a rename is atomic).
A tenant sees only its own responses; another tenant's id is as unknown as one never made (a 404).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import anyio.to_thread
import msgspec

from gateway.errors import NotFound
from gateway.schemas.openai import ChatMessage
from gateway.schemas.responses import InputItemOut, Response
from prefix_caches.durable import atomic_write
from prefix_caches.errors import PrefixCacheStorageFull
from prefix_caches.names import tenant_dir

__all__ = ["ResponseStore", "StoredResponse", "not_found"]

logger = logging.getLogger(__name__)

# What this server's response ids look like: anything else cannot name a file of the store.
_ID = re.compile(r"resp_[0-9a-f]{32}")


class StoredResponse(msgspec.Struct, frozen=True, kw_only=True):
    """One stored response. ``token_ids``: its prompt's ids, then its output's (the end-of-turn token included
    when the model wrote one); ``text_chars`` and ``text_sha256`` describe the text those ids decode to (the
    rendered prompt, then the output as written), which a continuation's rendered conversation must start with
    for the ids to stand for it. ``conversation``: the chain's messages, this input and this output as chat
    messages (its function calls as the assistant's ``tool_calls``); its tuples share the parent's in memory."""

    response: Response
    input_items: tuple[InputItemOut, ...]
    conversation: tuple[ChatMessage, ...]
    model: str
    token_ids: tuple[int, ...] = ()
    text_chars: int = 0
    text_sha256: str = ""
    stored_at: float = 0.0


def not_found(response_id: str, param: str | None = None) -> NotFound:
    return NotFound(f"No response found with id '{response_id}'", param=param, code="response_not_found")


class ResponseStore:
    """Per-tenant records, at most ``per_tenant`` each (0: nothing is stored), for ``ttl_seconds``."""

    def __init__(
        self,
        per_tenant: int,
        ttl_seconds: float,
        folder: Path | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._per_tenant = per_tenant
        self._ttl = ttl_seconds
        self._folder = folder
        self._clock = clock
        self._tenants: dict[str, OrderedDict[str, StoredResponse]] = {}
        self._memory_only: set[str] = set()  # records whose file could not be written

    def _path(self, tenant: str, response_id: str) -> Path | None:
        if self._folder is None or not _ID.fullmatch(response_id):
            return None
        return tenant_dir(self._folder, tenant) / f"{response_id}.json"

    async def put(self, tenant: str, stored: StoredResponse) -> list[str]:
        """Store a record (on disk first, so that it is never listed here without being there); the ids it
        pushed out of the tenant's cap, whose KV the engine may let go."""
        if self._per_tenant <= 0:
            return []
        path = self._path(tenant, stored.response.id)
        if path is not None:
            try:
                await anyio.to_thread.run_sync(_write, path, msgspec.json.encode(stored))
            except (OSError, PrefixCacheStorageFull) as exc:
                logger.warning("response %s kept in memory only: %s", stored.response.id, exc)
                self._memory_only.add(stored.response.id)
        items = self._tenants.setdefault(tenant, OrderedDict())
        items[stored.response.id] = stored
        items.move_to_end(stored.response.id)
        evicted = []
        while len(items) > self._per_tenant:
            old, _ = items.popitem(last=False)
            evicted.append(old)
        for old in evicted:
            self._memory_only.discard(old)
            await self._unlink(tenant, old)
        return evicted

    async def get(self, tenant: str, response_id: str, param: str | None = None) -> StoredResponse:
        """The tenant's response (now the most recently used), read from the directory if another process
        stored it.

        Raises:
            NotFound: no such response for this tenant (another tenant's reads the same), or it expired.
        """
        items = self._tenants.setdefault(tenant, OrderedDict())
        stored = items.get(response_id)
        path = self._path(tenant, response_id)
        written = stored is not None and path is not None and response_id not in self._memory_only
        if written and path is not None and not await anyio.to_thread.run_sync(path.exists):
            items.pop(response_id, None)  # another replica (or front end) deleted it
            stored = None
        elif stored is None:
            stored = await self._read(tenant, response_id)
        if stored is None:
            raise not_found(response_id, param)
        if self._clock() - stored.stored_at > self._ttl:
            await self.delete(tenant, response_id)
            raise not_found(response_id, param)
        items[response_id] = stored
        items.move_to_end(response_id)
        return stored

    async def delete(self, tenant: str, response_id: str) -> None:
        """Raises:
        NotFound: no such response for this tenant."""
        items = self._tenants.get(tenant)
        here = items is not None and items.pop(response_id, None) is not None
        self._memory_only.discard(response_id)
        if not await self._unlink(tenant, response_id) and not here:
            raise not_found(response_id)

    async def _read(self, tenant: str, response_id: str) -> StoredResponse | None:
        path = self._path(tenant, response_id)
        if path is None:
            return None
        try:
            data = await anyio.to_thread.run_sync(path.read_bytes)
            return msgspec.json.decode(data, type=StoredResponse)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("stored response %s unreadable, treated as absent: %s", response_id, exc)
            return None

    async def _unlink(self, tenant: str, response_id: str) -> bool:
        path = self._path(tenant, response_id)
        if path is None:
            return False
        try:
            await anyio.to_thread.run_sync(path.unlink)
        except FileNotFoundError:
            return False
        except OSError as exc:
            logger.warning("stored response %s not deleted from disk: %s", response_id, exc)
            return False
        return True

    def __len__(self) -> int:
        return sum(len(items) for items in self._tenants.values())


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(path, write)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)  # conversations are the tenant's own
