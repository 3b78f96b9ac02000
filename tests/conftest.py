"""Fixtures shared by the test modules (pytest loads this file itself)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from qmpagent import Monitor
from qmpagent.testing.fake_qmp import FakeQMPServer


@pytest.fixture
async def fake() -> AsyncIterator[FakeQMPServer]:
    """A started fake QMP server (no VM), closed after the test."""
    async with FakeQMPServer() as server:
        yield server


@pytest.fixture
async def mon(fake: FakeQMPServer) -> AsyncIterator[Monitor]:
    """A Monitor connected to ``fake``, closed after the test."""
    monitor = await Monitor.connect(fake.address, command_timeout=5.0)
    try:
        yield monitor
    finally:
        await monitor.close()
