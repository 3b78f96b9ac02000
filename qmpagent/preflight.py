"""What an operation checks before it changes anything: each disk's format node
(:func:`resolve_node`, QEMU's node checked by :func:`checked_node`), and whether a freeze can be
attempted (:class:`AgentPreflight`): the agent's checks at preflight (port state, sync, ping,
freeze status, the freeze commands enabled, the guest's filesystems or the chosen mountpoints),
and again later (the port right before the freeze, someone else's freeze right before the
transaction).

An :class:`~qmpagent.operation.Operation` holds one as ``agent_preflight``. A check that finds no
freeze possible raises :class:`Unquiescable`, whose message is the reason the operation records
(and whose ``__cause__`` is the error behind it, if any); what that means (a crash-consistent
snapshot, or a failure when quiesce is required) is the operation's policy, not this module's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from .agent import FreezeStatus
from .agent_link import AgentLink
from .errors import AgentError, MonitorCommandError, MonitorError, MonitorProtocolError, UsageError
from .monitor import BlockNode, Monitor
from .mountpoints import require_known
from .operation_types import OrchestratorView
from .snapshot_state import SnapshotState

__all__ = ["FREEZE_COMMANDS", "AgentPreflight", "Unquiescable", "checked_node", "resolve_node"]

log = logging.getLogger("qmpagent.snapshot")  # the logger these messages always had

#: Agent commands the freeze path needs; ``guest-info`` must list them as enabled.
FREEZE_COMMANDS: Final = ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-fsfreeze-status")


def checked_node(node: BlockNode) -> BlockNode:
    """A node from ``query-named-block-nodes`` whose members an operation uses have the right
    types (QEMU's replies are checked, not trusted), else MonitorProtocolError."""
    raw = node.raw
    if (
        not isinstance(raw, Mapping)
        or not isinstance(raw.get("node-name"), str)
        or not isinstance(raw.get("drv"), str)
        or not isinstance(raw.get("file", ""), str)
        or not isinstance(raw.get("backing_file") or "", str)
        or isinstance(node.virtual_size, bool)
        or (node.virtual_size is not None and node.virtual_size < 0)
    ):
        raise MonitorProtocolError(
            f"query-named-block-nodes: an entry with members of the wrong type: {raw!r:.300}"
        )
    return node


async def resolve_node(
    mon: Monitor, key: str, nodes: Mapping[str, BlockNode],
    fail: Callable[[str, BaseException | None], BaseException],
) -> str:
    """The format node of ``key``: a node name, or a device's qdev id (``nodes``: the VM's
    block nodes by name). UsageError if there is none; what QEMU cannot tell is raised as
    ``fail(message, cause)``, the operation's error (:meth:`Operation.fail
    <qmpagent.operation.Operation.fail>`)."""
    if key in nodes:
        return key
    try:
        node = await mon.device_node_name(key)
    except MonitorCommandError as exc:
        raise UsageError(f"no block node or device named {key!r}") from exc
    except MonitorError as exc:
        raise fail(f"preflight: cannot resolve device {key!r}: {exc}", exc) from exc
    except (AttributeError, KeyError, TypeError) as exc:
        # query-block members of the wrong type, met while the monitor parsed them
        err = MonitorProtocolError(f"query-block: a malformed entry ({exc!r})")
        err.__cause__ = exc
        raise fail(f"preflight: cannot resolve device {key!r}: {err}", err) from err
    if not isinstance(node, str):
        err = MonitorProtocolError(f"query-block: node-name of {key!r} is not a string: {node!r:.100}")
        raise fail(f"preflight: {err}", err)
    return node


class Unquiescable(Exception):
    """A check found that no freeze can be attempted; the message says why."""


class AgentPreflight:
    """The agent checks of one operation (see the module docstring). It chooses the operation's
    connection in ``link`` and records in ``state`` a freeze found to be someone else's; it
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
