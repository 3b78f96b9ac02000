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


@pytest.fixture(autouse=True)
def _private_journal(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's snapshot journal (``$XDG_STATE_HOME/qmpagent``) in a directory of its own,
    never the user's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
