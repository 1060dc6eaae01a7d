"""A client of the admin API's prefix-cache routes, for the CLI.

Answers decode into the server's own Structs (``gateway.schemas.admin``). A refusal becomes an
:class:`AdminError` carrying the server's OpenAI-shaped message; a server that cannot be reached, one naming
the URL that failed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import msgspec

from gateway.schemas.admin import DeletedPrefixCache, PrefixCacheList, PrefixCacheOut, WarmedPrefixCache

__all__ = ["AdminClient", "AdminError"]

T = TypeVar("T")

# A build sends nothing until it is done unless streamed; a streamed one pings every few seconds.
_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
_BUILD_TIMEOUT = httpx.Timeout(None, connect=10.0)


class AdminError(Exception):
    """The server refused a request (``status`` and ``code`` as it sent them), or could not be reached."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    def __str__(self) -> str:
        detail = ", ".join(str(p) for p in (self.status, self.code) if p is not None)
        return f"{self.message} ({detail})" if detail else self.message


def _refusal(response: httpx.Response) -> AdminError:
    try:
        error = response.json()["error"]
        return AdminError(str(error["message"]), response.status_code, error.get("code"))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:300] or response.reason_phrase
        return AdminError(f"HTTP {response.status_code} from {response.url}: {text}", response.status_code)


class AdminClient:
    """The prefix-cache routes of the gateway at ``url``, with ``key`` (admin or tenant) as bearer token."""

    def __init__(self, url: str, key: str | None = None, tenant: str | None = None) -> None:
        self.url = url.rstrip("/")
        self._tenant = tenant
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=_TIMEOUT)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _params(self, **extra: str) -> dict[str, str]:
        return {**({"tenant": self._tenant} if self._tenant else {}), **extra}

    def _send(self, method: str, path: str, answer: type[T], **kwargs: Any) -> T:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.is_error:
            raise _refusal(response)
        return msgspec.json.decode(response.content, type=answer)

    def _unreachable(self, exc: httpx.TransportError) -> AdminError:
        reason = str(exc) or type(exc).__name__
        return AdminError(f"cannot reach the gateway at {self.url}: {reason}")

    def caches(self) -> PrefixCacheList:
        return self._send("GET", "/admin/prefix-caches", PrefixCacheList, params=self._params())

    def get(self, name: str, verify: bool = False) -> PrefixCacheOut:
        params = self._params(**({"verify": "true"} if verify else {}))
        return self._send("GET", f"/admin/prefix-caches/{name}", PrefixCacheOut, params=params)

    def delete(self, name: str) -> DeletedPrefixCache:
        return self._send("DELETE", f"/admin/prefix-caches/{name}", DeletedPrefixCache, params=self._params())

    def warm(self, name: str) -> WarmedPrefixCache:
        return self._send("POST", f"/admin/prefix-caches/{name}/warm", WarmedPrefixCache, params=self._params())

    def models(self) -> list[str]:
        """The served models' ids (``GET /v1/models``)."""
        try:
            response = self._http.get("/v1/models")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.is_error:
            raise _refusal(response)
        return [m["id"] for m in response.json()["data"]]

    def create(self, body: dict[str, object], progress: Callable[[int, int], None] | None = None) -> PrefixCacheOut:
        """Build a cache from ``body`` (the ``POST /admin/prefix-caches`` fields). With ``progress``, the build
        is streamed and ``progress(done, total)`` called after each prefilled chunk."""
        body = {**body, **({"tenant": self._tenant} if self._tenant else {})}
        if progress is None:
            return self._send("POST", "/admin/prefix-caches", PrefixCacheOut, json=body, timeout=_BUILD_TIMEOUT)
        try:
            with self._http.stream(
                "POST", "/admin/prefix-caches", json={**body, "stream": True}, timeout=_BUILD_TIMEOUT
            ) as response:
                if response.is_error:
                    response.read()
                    raise _refusal(response)
                for event in _events(response.iter_lines()):
                    if "error" in event:
                        error = event["error"]
                        raise AdminError(str(error.get("message")), response.status_code, error.get("code"))
                    if event.get("object") == "prefix_cache.progress":
                        progress(int(event["done"]), int(event["total"]))
                    elif event.get("object") == "prefix_cache":
                        return msgspec.convert(event, PrefixCacheOut)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        raise AdminError(f"the build's stream from {self.url} ended without the cache")


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream (comments, pings and ``[DONE]`` skipped)."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data and data != "[DONE]":
            yield json.loads(data)
