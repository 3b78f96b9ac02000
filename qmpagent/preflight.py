"""Whether a freeze can be attempted (:class:`AgentPreflight`): the agent's checks at preflight
(port state, sync, ping, freeze status, the freeze commands enabled, the guest's filesystems or
the chosen mountpoints), and again later (the port right before the freeze, someone else's freeze
right before the transaction).

An :class:`~qmpagent.operation.Operation` holds one as ``agent_preflight``. A check that finds no
freeze possible raises :class:`Unquiescable`, whose message is the reason the operation records
(and whose ``__cause__`` is the error behind it, if any); what that means (a crash-consistent
snapshot, or a failure when quiesce is required) is the operation's policy, not this module's.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from .agent import FreezeStatus
from .agent_link import AgentLink
from .errors import AgentError, MonitorError
from .monitor import Monitor
from .mountpoints import require_known
from .operation_types import OrchestratorView
from .snapshot_state import SnapshotState

__all__ = ["FREEZE_COMMANDS", "AgentPreflight", "Unquiescable"]

log = logging.getLogger("qmpagent.snapshot")  # the logger these messages always had

#: Agent commands the freeze path needs; ``guest-info`` must list them as enabled.
FREEZE_COMMANDS: Final = ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-fsfreeze-status")


class Unquiescable(Exception):
    """A check found that no freeze can be attempted; the message says why."""


class AgentPreflight:
    """The agent checks of one operation (see the module docstring). It chooses the operation's
    connection in ``link`` and writes ``state`` (someone else's freeze found, or ended); it
    changes nothing in the guest."""

    def __init__(
        self, orch: OrchestratorView, mon: Monitor, link: AgentLink, state: SnapshotState,
        agent_timeout: float,
    ) -> None:
        self.orch = orch
        self.mon = mon
        self.link = link
        self.state = state
        self.agent_timeout = agent_timeout

    async def check(self, vm_running: bool, mountpoints: tuple[str, ...] | None) -> int | None:
        """At preflight: whether a freeze can be attempted (else Unquiescable); someone else's
        freeze is recorded in ``state`` (never ours to thaw). Returns how many filesystems the
        freeze should freeze (the chosen ``mountpoints``, or what ``guest-get-fsinfo`` lists;
        None if unknown). An unknown mountpoint is an UnknownMountpointError."""
        orch = self.orch
        if not orch.has_agent:
            raise Unquiescable("no guest agent was given")
        if not vm_running:
            raise Unquiescable("the VM is not running")
        # Invariant 2: the port first; a request written to a closed port would be queued and
        # answered much later, to whoever is connected then.
        try:
            port_open = await self.mon.agent_port_open(orch.agent_chardev)
        except (AgentError, MonitorError) as exc:
            raise Unquiescable(f"cannot read the agent port state: {exc}") from exc
        if not port_open:
            raise Unquiescable("the guest agent's port is closed in the guest (agent not running)")
        t = self.agent_timeout
        try:
            if orch.agent is not None:
                agent = self.link.use(orch.agent)
                await agent.sync(timeout=t)
            else:
                assert orch.agent_address is not None
                agent = await self.link.connect(orch.agent_address, timeout=t)
            await agent.ping(timeout=t)
            status = await agent.fsfreeze_status(timeout=t)
        except AgentError as exc:
            raise Unquiescable(f"the guest agent does not answer: {exc}") from exc
        if status is FreezeStatus.FROZEN:
            # Invariant 3: frozen by someone else. Quiescent, but not ours: never thaw it.
            self.state.external()
            log.info("guest already frozen by someone else: snapshot without freeze or thaw")
            return None
        try:
            info = await agent.info(timeout=t)
        except AgentError as exc:
            raise Unquiescable(f"guest-info failed: {exc}") from exc
        disabled = [c for c in FREEZE_COMMANDS if not info.is_enabled(c)]
        if disabled:
            raise Unquiescable(f"the guest agent has {', '.join(disabled)} disabled")
        if mountpoints is not None:
            return await self._check_mountpoints(info, mountpoints)
        if info.is_enabled("guest-get-fsinfo"):
            # To notice a freeze that freezes fewer filesystems than there are (see the
            # operation's freeze).
            try:
                fsinfo = await agent.get_fsinfo(timeout=t)
                return len({fs.get("mountpoint") for fs in fsinfo})
            except AgentError as exc:
                log.info("guest-get-fsinfo failed (%s); freeze counts are not cross-checked", exc)
        return None

    async def _check_mountpoints(self, info: Any, mountpoints: tuple[str, ...]) -> int:
        """Every chosen mountpoint is one the guest has (before anything is frozen or made):
        qemu-ga would skip an unknown one silently. UnknownMountpointError otherwise."""
        agent = self.link.agent
        assert agent is not None
        for command in ("guest-fsfreeze-freeze-list", "guest-get-fsinfo"):
            if not info.is_enabled(command):
                raise Unquiescable(f"mountpoints= needs {command}, which the agent has disabled")
        try:
            fsinfo = await agent.get_fsinfo(timeout=self.agent_timeout)
        except AgentError as exc:
            raise Unquiescable(f"guest-get-fsinfo failed, the mountpoints cannot be checked: {exc}") from exc
        require_known(mountpoints, fsinfo)
        return len(mountpoints)

    async def check_port_still_open(self) -> None:
        """Right before the freeze (prepare may have taken a while): the agent's port is still
        open, else Unquiescable."""
        try:
            port_open = await self.mon.agent_port_open(self.orch.agent_chardev)
        except (AgentError, MonitorError) as exc:
            raise Unquiescable(f"cannot read the agent port state before the freeze: {exc}") from exc
        if not port_open:
            raise Unquiescable("the guest agent's port closed before the freeze (agent stopped)")

    async def check_still_frozen(self) -> None:
        """Someone else's freeze may have ended since preflight: read the status right before
        the transaction; if it is not frozen (or cannot be read), Unquiescable (the operation
        records that it ended: the snapshot is not quiesced)."""
        agent = self.link.agent
        assert agent is not None
        try:
            status = await agent.fsfreeze_status(timeout=self.agent_timeout)
        except AgentError as exc:
            raise Unquiescable(
                f"the guest was frozen by someone else at preflight, and whether it still is "
                f"cannot be read before the transaction: {exc}"
            ) from exc
        if status is not FreezeStatus.FROZEN:
            raise Unquiescable(
                "the guest was frozen by someone else at preflight, but was thawed before "
                "the transaction"
            )
