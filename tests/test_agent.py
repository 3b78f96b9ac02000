"""GuestAgent without a VM: addresses, and (with the fake agent) every fault."""

from __future__ import annotations

import pytest

from qmpagent import AgentUnavailable, GuestAgent, UsageError


async def test_bad_addresses() -> None:
    with pytest.raises(UsageError):
        await GuestAgent.connect(("host",))  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        await GuestAgent.connect(("vsock", "x", 1))  # type: ignore[arg-type]
    with pytest.raises(AgentUnavailable):
        await GuestAgent.connect("/nonexistent/qga.sock", timeout=2)
    with pytest.raises(AgentUnavailable):
        # No guest with this CID: the vsock path is taken and fails with a typed error.
        await GuestAgent.connect(("vsock", 4242, 1234), timeout=2)
