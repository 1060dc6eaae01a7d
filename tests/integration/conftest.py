"""Fixtures shared by the integration tests that drive the session's tiny-model server."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.closers import closing_bias
from tests.servers import Server


@pytest.fixture()
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.fixture()
def bias(models_dir: Path) -> dict[str, float]:
    """A logit_bias that lets the random-weight model finish JSON (tests/closers.py)."""
    return closing_bias(models_dir)
