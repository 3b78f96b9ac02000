"""The guest-agent connection one operation uses (:class:`AgentLink`): the orchestrator's, or
one the operation connected itself; a reconnect after it was lost; and, at the end, the close
of every connection that is the operation's own.

An :class:`~qmpagent.operation.Operation` holds one as ``agent_link`` (its ``agent`` is this
link's): preflight (:mod:`qmpagent.preflight`) chooses the connection, the thaw
(:mod:`qmpagent.thaw`) reconnects when it has lost it, and the operation closes it.
"""

from __future__ import annotations

import time

import anyio

from .agent import AgentAddress, GuestAgent
from .errors import AgentError, MonitorError
from .monitor import Monitor
from .operation_types import OrchestratorView

__all__ = ["AgentLink"]


class AgentLink:
    """Which agent connection an operation speaks on, and whether it is its own to close.

    Attributes:
        agent: the connection in use (None: none chosen yet, e.g. quiesce is off).
        own: the operation connected ``agent`` itself, so it closes it.
        replaced: connections of the operation's own that a reconnect replaced (closed at the
            end of the run, with the rest, by :meth:`close`).
    """

    def __init__(self, orch: OrchestratorView, mon: Monitor, agent_timeout: float) -> None:
        self.orch = orch
        self.mon = mon
        self.agent_timeout = agent_timeout
        self.agent: GuestAgent | None = None
        self.own = False
        self.replaced: list[GuestAgent] = []

    def use(self, agent: GuestAgent) -> GuestAgent:
        """Speak on ``agent``, the orchestrator's connection (not ours to close)."""
        self.agent = agent
        return agent

    async def connect(self, address: AgentAddress, timeout: float) -> GuestAgent:
        """Connect to the agent at ``address`` and speak on that connection (ours to close).
        Raises AgentError."""
        self.agent = await GuestAgent.connect(address, timeout=timeout)
        self.own = True
        return self.agent

    async def reconnect(self, deadline: float) -> GuestAgent | None:
        """Connect to the agent's address again (if we have one and its port is open), within
        ``deadline``; the connection replaced is closed at the end of the run."""
        address = self.orch.agent_address
        if address is None:
            return None
        # Invariant 2 holds for a reconnect too: never write to a port nobody reads.
        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                port_open = await self.mon.agent_port_open(self.orch.agent_chardev)
        except (AgentError, MonitorError, TimeoutError):
            return None
        left = deadline - time.monotonic()
        if not port_open or left <= 0:
            return None
        try:
            agent = await GuestAgent.connect(address, timeout=min(self.agent_timeout, left))
        except AgentError:
            return None
        agent.timeout = self.agent_timeout
        if self.own and self.agent is not None:
            self.replaced.append(self.agent)
        self.agent = agent
        self.own = True
        return agent

    async def close(self) -> None:
        """Close every connection of ours: the replaced ones, and ``agent`` if it is ours."""
        agents = list(self.replaced)
        if self.own and self.agent is not None:
            agents.append(self.agent)
        self.replaced.clear()
        for agent in agents:
            await agent.close()
