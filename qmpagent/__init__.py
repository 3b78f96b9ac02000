"""qmpagent: QMP and QEMU guest-agent clients for asyncio, and quiesced live disk snapshots.

* :class:`Monitor`: QMP client (on ``qemu.qmp``) with per-command timeouts, bounded event
  streams, job helpers and agent-port state.
* :class:`GuestAgent`: native guest-agent client that stays in sync and survives a hostile guest.
* :class:`SnapshotOrchestrator`: atomic, application-consistent external snapshots that freeze
  briefly and never thaw a freeze they did not make; a freeze guard process thaws the guest
  if the orchestrator dies or gets stuck inside the window.
* :func:`recover` -> :class:`RecoveryReport`: settle what a dead operation left (journal in
  ``$XDG_STATE_HOME/qmpagent``).

All errors derive from :class:`QMPAgentError`; see :mod:`qmpagent.errors` for the tree.
"""

from .agent import AgentInfo, CommandInfo, ExecResult, FreezeStatus, GuestAgent
from .errors import (
    AgentCommandError,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
    EventOverflow,
    JobError,
    JournalError,
    MonitorCommandError,
    MonitorError,
    MonitorProtocolError,
    MonitorTimeout,
    MonitorUnavailable,
    QMPAgentError,
    SnapshotError,
    SnapshotRecord,
    ThawError,
    UnsettledOperationError,
    UsageError,
)
from .monitor import (
    AGENT_PORT_NAME,
    BlockDevice,
    BlockNode,
    EventStream,
    JobResult,
    Monitor,
    MonitorState,
    QMPEvent,
    VirtioSerialPort,
)
from .recovery import RecoveryReport, recover
from .snapshot import (
    FreezeOwner,
    FreezeState,
    Phase,
    PhaseTimings,
    Quiesce,
    SnapshotOrchestrator,
    SnapshotResult,
    TransactionState,
)
from .timeouts import USE_CLIENT_DEFAULT, Timeout, UseClientDefault

__version__ = "0.1.0"

__all__ = [
    "AGENT_PORT_NAME",
    "USE_CLIENT_DEFAULT",
    "AgentCommandError",
    "AgentError",
    "AgentInfo",
    "AgentProtocolError",
    "AgentTimeout",
    "AgentUnavailable",
    "BlockDevice",
    "BlockNode",
    "CommandInfo",
    "EventOverflow",
    "EventStream",
    "ExecResult",
    "FreezeOwner",
    "FreezeState",
    "FreezeStatus",
    "GuestAgent",
    "JobError",
    "JobResult",
    "JournalError",
    "Monitor",
    "MonitorCommandError",
    "MonitorError",
    "MonitorProtocolError",
    "MonitorState",
    "MonitorTimeout",
    "MonitorUnavailable",
    "Phase",
    "PhaseTimings",
    "QMPAgentError",
    "QMPEvent",
    "Quiesce",
    "RecoveryReport",
    "SnapshotError",
    "SnapshotOrchestrator",
    "SnapshotRecord",
    "SnapshotResult",
    "ThawError",
    "Timeout",
    "TransactionState",
    "UnsettledOperationError",
    "UsageError",
    "UseClientDefault",
    "VirtioSerialPort",
    "recover",
]
