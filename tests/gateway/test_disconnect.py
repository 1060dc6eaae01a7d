"""The disconnect watcher alone, on a fake ASGI ``receive`` (the integration tests drive real clients away)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import cast

import pytest
from litestar import Request

from gateway.disconnect import unless_client_leaves
from gateway.errors import ClientLeft, InvalidRequest


def fake_request(left: asyncio.Event) -> Request:
    """A request whose client leaves when ``left`` is set (uvicorn's ``receive()`` after the body)."""

    async def receive() -> dict[str, str]:
        await left.wait()
        return {"type": "http.disconnect"}

    return cast(Request, SimpleNamespace(receive=receive, method="POST", url=SimpleNamespace(path="/v1/x")))


def test_work_that_ends_first_answers() -> None:
    async def main() -> str:
        async def work() -> str:
            await asyncio.sleep(0)
            return "answer"

        return await unless_client_leaves(fake_request(asyncio.Event()), work())

    assert asyncio.run(main()) == "answer"


def test_an_error_of_the_work_is_raised_as_it_is() -> None:
    async def main() -> None:
        async def work() -> None:
            raise InvalidRequest("no")

        await unless_client_leaves(fake_request(asyncio.Event()), work())

    with pytest.raises(InvalidRequest, match="no"):
        asyncio.run(main())


def test_a_client_that_leaves_cancels_the_work_and_its_cleanup_is_done_first() -> None:
    steps: list[str] = []

    async def main() -> None:
        left = asyncio.Event()

        async def work() -> None:
            try:
                steps.append("started")
                left.set()
                await asyncio.sleep(60)
                steps.append("finished")  # never
            finally:
                await asyncio.sleep(0)  # cleanup that awaits (closing the engine's generators does)
                steps.append("cleaned up")

        await unless_client_leaves(fake_request(left), work())

    with pytest.raises(ClientLeft) as raised:
        asyncio.run(main())
    assert raised.value.status_code == 499
    assert steps == ["started", "cleaned up"]
