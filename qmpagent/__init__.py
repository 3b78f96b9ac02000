"""qmpagent: QMP and QEMU guest-agent clients for asyncio, and quiesced live disk snapshots.

* :class:`Monitor`: QMP client (on ``qemu.qmp``) with per-command timeouts, bounded event
  streams, job helpers and agent-port state.
* :class:`GuestAgent`: native guest-agent client that stays in sync and survives a hostile guest.
* :class:`SnapshotOrchestrator`: atomic, application-consistent external snapshots that freeze
  briefly and never thaw a freeze they did not make.

All errors derive from :class:`QMPAgentError`; see :mod:`qmpagent.errors` for the tree.
"""

from .agent import DEFAULT, AgentInfo, CommandInfo, ExecResult, FreezeStatus, GuestAgent
from .errors import (
    AgentCommandError,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
    EventOverflow,
    JobError,
    MonitorCommandError,
    MonitorError,
    MonitorTimeout,
    MonitorUnavailable,
    QMPAgentError,
    SnapshotError,
    SnapshotRecord,
    ThawError,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT",
    "AgentCommandError",
    "AgentError",
    "AgentInfo",
    "AgentProtocolError",
    "AgentTimeout",
    "AgentUnavailable",
    "CommandInfo",
    "EventOverflow",
    "ExecResult",
    "FreezeStatus",
    "GuestAgent",
    "JobError",
    "MonitorCommandError",
    "MonitorError",
    "MonitorTimeout",
    "MonitorUnavailable",
    "QMPAgentError",
    "SnapshotError",
    "SnapshotRecord",
    "ThawError",
    "UsageError",
]
