"""qmpagent: QMP and QEMU guest-agent clients for asyncio, and quiesced live disk snapshots.

* :class:`Monitor`: QMP client (on ``qemu.qmp``) with per-command timeouts, bounded event
  streams, job helpers and agent-port state.
* :class:`GuestAgent`: native guest-agent client that stays in sync and survives a hostile guest.
* :class:`SnapshotOrchestrator`: atomic, application-consistent external snapshots that freeze
  briefly and never thaw a freeze they did not make; a freeze guard process thaws the guest
  if the orchestrator dies or gets stuck inside the window; and their lifecycle: the
  backing chain (:meth:`SnapshotOrchestrator.chain`) and merging overlays back
  (:meth:`SnapshotOrchestrator.commit`, on the two-phase jobs of :meth:`Monitor.block_job`);
  and backups whose freeze holds only the transaction that starts them
  (:meth:`SnapshotOrchestrator.backup`: full and incremental), or that export the frozen
  view over NBD for an external reader (:meth:`SnapshotOrchestrator.export`: pull mode).
* :func:`recover` -> :class:`RecoveryReport`: settle what a dead operation left (journal in
  ``$XDG_STATE_HOME/qmpagent``).

All errors derive from :class:`QMPAgentError`; see :mod:`qmpagent.errors` for the tree.
"""

from .agent import AgentInfo, CommandInfo, ExecResult, FreezeStatus, GuestAgent
from .backup import BackupProgressCallback, BackupResult
from .chain import ChainNode
from .commit import CommitResult
from .errors import (
    AgentCommandError,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
    BackupChainError,
    BackupError,
    CommitError,
    CommitRecord,
    CommitTimeout,
    EventOverflow,
    JobError,
    JobReadyTimeout,
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
    UnknownMountpointError,
    UnsettledOperationError,
    UsageError,
)
from .fleece import Fleece, FleeceResult
from .monitor import (
    AGENT_PORT_NAME,
    BlockDevice,
    BlockJob,
    BlockNode,
    EventStream,
    JobProgress,
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
    "BackupChainError",
    "BackupError",
    "BackupProgressCallback",
    "BackupResult",
    "BlockDevice",
    "BlockJob",
    "BlockNode",
    "ChainNode",
    "CommandInfo",
    "CommitError",
    "CommitRecord",
    "CommitResult",
    "CommitTimeout",
    "EventOverflow",
    "EventStream",
    "ExecResult",
    "Fleece",
    "FleeceResult",
    "FreezeOwner",
    "FreezeState",
    "FreezeStatus",
    "GuestAgent",
    "JobError",
    "JobProgress",
    "JobReadyTimeout",
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
    "UnknownMountpointError",
    "UnsettledOperationError",
    "UsageError",
    "UseClientDefault",
    "VirtioSerialPort",
    "recover",
]
