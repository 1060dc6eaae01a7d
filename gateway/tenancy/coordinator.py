"""Admission and tenants' limits counted once for several API servers (``--api-servers``).

The supervising process (:mod:`gateway.processes.api_servers`) runs one :class:`Coordinator`: the server's one
:class:`~gateway.tenancy.admission.Admission` (and its :class:`~gateway.tenancy.rate_limits.Rates`) behind a ZMQ
ROUTER socket.
Each front-end process reaches it through :class:`SharedAdmission`, which implements
:class:`~gateway.tenancy.admission.Places` as the in-process ``Admission`` does:

- a request asks for a place with one round trip (:class:`Enter`, answered :class:`Entered` once it holds one,
  or :class:`Refused` with the 429 that the coordinator's ``Admission`` raised) and gives it back with one
  message (:class:`Leave`, carrying the tokens it used, which settle its tenant's token window); a client that
  goes away while queued sends ``Leave`` too, which ends its wait in the queue;
- scrapes, ``/health`` and ``/admin/tenants`` ask for the counts (:class:`Survey`);
- responses of a tenant with rate limits ask for its ``x-ratelimit-*`` headers (:class:`Headers`).

So ``max_running``, the queue's limits and timeout, the fair order between tenants, each tenant's concurrency,
queued tokens and per-minute windows are the same objects whichever front end a request reached.

Ownership: in the supervising process the event loop's thread owns the ``Admission``, the ROUTER socket and
``_releases``/``_tasks`` (each held or queued place, by front end and id). In a front end its event loop owns
the DEALER socket, ``_replies`` (the round trips in flight) and ``_survey`` (the last counts, replaced whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Literal

import msgspec
import zmq
import zmq.asyncio

from gateway.config import TenantLimits
from gateway.errors import APIError, RateLimited, ServiceUnavailable, TenantRateLimited
from gateway.tenancy.admission import Admission, Ticket

__all__ = ["Coordinator", "SharedAdmission"]

logger = logging.getLogger(__name__)

# How long a scrape or a response waits for the coordinator's counts or headers before going without.
ANSWER_SECONDS = 1.0
# Beyond the queue timeout (the coordinator answers a queued request by then), how long a front end waits for
# its place before it gives up on the coordinator.
SLACK_SECONDS = 30.0


# ---- front end -> coordinator ---------------------------------------------------------------------


class Enter(msgspec.Struct, frozen=True, tag=True):
    """Ask for a place (see :meth:`Admission.slot` for the fields)."""

    id: int
    tokens: int
    tenant: str | None
    reserve: int


class Leave(msgspec.Struct, frozen=True, tag=True):
    """Give place ``id`` back having used ``used`` tokens, or stop waiting for it."""

    id: int
    used: int


class Survey(msgspec.Struct, frozen=True, tag=True):
    id: int


class Headers(msgspec.Struct, frozen=True, tag=True):
    id: int
    tenant: str


# ---- coordinator -> front end ---------------------------------------------------------------------


class Entered(msgspec.Struct, frozen=True, tag=True):
    id: int


class Refused(msgspec.Struct, frozen=True, tag=True):
    """The 429 the coordinator's admission raised: the server's limits (``server``) or a tenant's."""

    id: int
    kind: Literal["server", "requests", "tokens"]
    message: str
    retry_after: float

    def error(self) -> APIError:
        if self.kind == "server":
            return RateLimited(self.message, self.retry_after)
        return TenantRateLimited(self.message, self.kind, self.retry_after)


class Surveyed(msgspec.Struct, frozen=True, tag=True):
    """The counts: ``Admission.stats()``, and ``tenant_use`` of every tenant that holds or spent anything."""

    id: int
    stats: dict[str, int]
    tenants: dict[str, dict[str, int]]


class HeadersOf(msgspec.Struct, frozen=True, tag=True):
    id: int
    headers: dict[str, str]


_encoder = msgspec.msgpack.Encoder()
_asks = msgspec.msgpack.Decoder(Enter | Leave | Survey | Headers)
_answers = msgspec.msgpack.Decoder(Entered | Refused | Surveyed | HeadersOf)

_EMPTY = Surveyed(id=0, stats={"running": 0, "queued": 0, "queued_tokens": 0}, tenants={})


class Coordinator:
    """The one admission of every front end, served at ``address`` on the running event loop (:meth:`serve`)."""

    def __init__(self, admission: Admission, address: str) -> None:
        self.admission = admission
        self.address = address
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self._releases: dict[tuple[bytes, int], asyncio.Future[int]] = {}

    async def serve(self) -> None:
        """Answer front ends until cancelled."""
        context = zmq.asyncio.Context()
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.address)
        try:
            while True:
                peer, data = await self._socket.recv_multipart()
                try:
                    self._handle(peer, _asks.decode(data))
                except Exception:  # a bad message must not end admission for every front end
                    logger.exception("admission coordinator: a message failed")
        finally:
            for task in list(self._tasks.values()):
                task.cancel()
            self._socket.close(linger=0)
            self._socket = None
            context.term()

    def _send(self, peer: bytes, answer: Entered | Refused | Surveyed | HeadersOf) -> None:
        if self._socket is not None:
            self._socket.send_multipart([peer, _encoder.encode(answer)])

    def _handle(self, peer: bytes, ask: Enter | Leave | Survey | Headers) -> None:
        key = (peer, ask.id)
        if isinstance(ask, Enter):
            self._tasks[key] = asyncio.get_running_loop().create_task(self._hold(peer, ask))
        elif isinstance(ask, Leave):
            release = self._releases.pop(key, None)
            if release is not None:
                release.set_result(ask.used)
            elif (task := self._tasks.get(key)) is not None:
                task.cancel()  # still queued: its client went away (Admission gives a place granted meanwhile on)
        elif isinstance(ask, Survey):
            admission = self.admission
            names = set(admission.tenant_requests) | admission.rates.tenants()
            tenants = {name: admission.tenant_use(name) for name in sorted(names)}
            self._send(peer, Surveyed(ask.id, admission.stats(), tenants))
        else:
            self._send(peer, HeadersOf(ask.id, self.admission.rates.headers(ask.tenant)))

    async def _hold(self, peer: bytes, enter: Enter) -> None:
        """One front end's request, from its Enter to its Leave, inside the one Admission."""
        key = (peer, enter.id)
        try:
            async with self.admission.slot(enter.tokens, enter.tenant, enter.reserve) as ticket:
                release = asyncio.get_running_loop().create_future()
                self._releases[key] = release
                self._send(peer, Entered(enter.id))
                ticket.used = await release
        except RateLimited as exc:
            self._send(peer, Refused(enter.id, "server", exc.message, exc.retry_after))
        except TenantRateLimited as exc:
            kind = "requests" if exc.type == "requests" else "tokens"
            self._send(peer, Refused(enter.id, kind, exc.message, exc.retry_after))
        finally:
            self._tasks.pop(key, None)
            self._releases.pop(key, None)


class SharedAdmission:
    """A front end's :class:`~gateway.tenancy.admission.Places`: the coordinator's admission at ``address``, reached
    from this process's event loop (connected on first use)."""

    def __init__(self, address: str, limits_of: Callable[[str], TenantLimits], queue_timeout: float) -> None:
        self._address = address
        self._limits_of = limits_of
        self._enter_seconds = queue_timeout + SLACK_SECONDS
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[Entered | Refused | Surveyed | HeadersOf]] = {}
        self._survey = _EMPTY
        self._closed = False

    def _connected(self) -> zmq.asyncio.Socket:
        if self._socket is None:
            self._context = zmq.asyncio.Context()
            self._socket = self._context.socket(zmq.DEALER)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.connect(self._address)
            self._reader = asyncio.get_running_loop().create_task(self._read(self._socket))
        return self._socket

    async def _read(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            answer = _answers.decode(await socket.recv())
            future = self._replies.pop(answer.id, None)
            if future is not None and not future.done():
                future.set_result(answer)

    def _tell(self, ask: Enter | Leave | Survey | Headers) -> None:
        if not self._closed:  # a request ending after the app stopped has no place left to give back
            self._connected().send(_encoder.encode(ask))

    async def _ask(self, ask: Enter | Survey | Headers, seconds: float) -> Entered | Refused | Surveyed | HeadersOf:
        future: asyncio.Future[Entered | Refused | Surveyed | HeadersOf] = asyncio.get_running_loop().create_future()
        self._replies[ask.id] = future
        try:
            self._tell(ask)
            async with asyncio.timeout(seconds):
                return await future
        finally:
            self._replies.pop(ask.id, None)

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int, tenant: str | None = None, reserve: int = 0) -> AsyncIterator[Ticket]:
        """Hold one running place of the coordinator's for the body of the ``async with``."""
        ident = next(self._ids)
        try:
            answer = await self._ask(Enter(ident, tokens, tenant, reserve), self._enter_seconds)
        except TimeoutError:
            self._tell(Leave(ident, 0))
            raise ServiceUnavailable("The server's admission did not answer; retry shortly", retry_after=1) from None
        except BaseException:  # the client went away while queued: the coordinator stops holding its place
            self._tell(Leave(ident, 0))
            raise
        if isinstance(answer, Refused):
            raise answer.error()
        ticket = Ticket(None)
        try:
            yield ticket
        finally:
            self._tell(Leave(ident, ticket.used))

    async def refresh(self) -> None:
        with contextlib.suppress(TimeoutError):
            answer = await self._ask(Survey(next(self._ids)), ANSWER_SECONDS)
            if isinstance(answer, Surveyed):
                self._survey = answer

    def stats(self) -> dict[str, int]:
        return dict(self._survey.stats)

    def tenant_use(self, tenant: str) -> dict[str, int]:
        use = self._survey.tenants.get(tenant)
        if use is not None:
            return dict(use)
        return {"requests_in_progress": 0, "queued_tokens": 0, "requests_last_minute": 0, "tokens_last_minute": 0}

    async def rate_headers(self, tenant: str) -> dict[str, str]:
        limits = self._limits_of(tenant)
        if limits.requests_per_minute is None and limits.tokens_per_minute is None:
            return {}  # no window, no headers: no round trip
        with contextlib.suppress(TimeoutError):
            answer = await self._ask(Headers(next(self._ids), tenant), ANSWER_SECONDS)
            if isinstance(answer, HeadersOf):
                return answer.headers
        return {}

    def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
        if self._context is not None:
            self._context.destroy(linger=0)
        self._context = self._socket = self._reader = None
