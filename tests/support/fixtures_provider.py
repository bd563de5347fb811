"""Pytest fixtures for the fake HTTP provider (load with pytest_plugins = ["tests.support.fixtures_provider"])."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fake_provider import FakeProviderServer


@pytest.fixture
def fake_provider() -> Iterator[FakeProviderServer]:
    """A started FakeProviderServer on 127.0.0.1 with the default rate and price tables; stopped after the test."""
    server = FakeProviderServer().start()
    try:
        yield server
    finally:
        server.stop()
