"""Test tools for code that drives QEMU: a real throwaway guest, fakes, a pytest plugin.

Nothing in the library imports this package.

* :func:`boot_guest` / :class:`Guest`: a real QEMU guest (TCG) with the real ``qemu-ga``, built
  from a peer's Debian packages by :func:`build_guest_image` and cached. The peer
  (:func:`get_peer`) is the host's own packages (``"host"``) or a Debian 13 root with QEMU 10.0 and
  qemu-ga 10.0 that qmpagent provisions itself (``"debian13"``); ``$QMPAGENT_PEER`` chooses.
* :class:`FakeAgent` and :class:`FakeQMPServer`: fault-injecting fakes of ``qemu-ga`` and of
  QEMU's QMP (with a block graph: ``blockdev-create``, ``blockdev-add``, ``blockdev-del``,
  ``transaction``), real socket servers that behave like the real peers byte for byte where
  it was checked (``tests/test_conformance.py`` runs the same scenarios on both), for tests
  that need no VM.
* :class:`Fault` and ``inject(command, fault, call=None, times=1)``: one fault vocabulary for
  both fakes (:class:`AgentFault` is the agent's former name, with its former defaults).
* :class:`FakeVM`: the two wired together like QEMU and its guest (agent port state and
  ``VSERPORT_CHANGE``, shutdown, reboot, pause, disks as real qcow2 files), so
  :class:`qmpagent.SnapshotOrchestrator` runs against it unchanged.
* :func:`check_backup_chain` and :func:`read_backup_file`: check a backup chain with
  ``qemu-img`` (opens, ``qemu-img check``, one format and size) and read a file (the writer's
  log) out of a backup of the test guest's ext4 disk.
* The pytest plugin (:mod:`qmpagent.testing.pytest_plugin`), loaded automatically when qmpagent
  is installed: fixtures ``fake_vm`` and ``fake_vm_factory`` (fakes), ``qemu_guest`` and
  ``qemu_guest_factory`` (a real guest), marker ``real_vm``.

See ``docs/testing.md``.
"""

from .backup_check import BackupChainReport, check_backup_chain, read_backup_file
from .fake_agent import (
    AgentFault,
    AgentFaultKind,
    AgentInjection,
    AgentMessage,
    FakeAgent,
    FakeAgentError,
    FakeExecResult,
    QEMUJSONEvent,
    QEMUJSONStreamParser,
    qemu_json,
)
from .fake_qmp import (
    FakeBackupJob,
    FakeBackups,
    FakeBitmap,
    FakeBlockDevice,
    FakeBlockNode,
    FakeCall,
    FakeCommitJob,
    FakeJob,
    FakeQMPConnection,
    FakeQMPError,
    FakeQMPServer,
    FakeQOMObject,
    Fault,
    FaultKind,
    Injection,
    Qcow2Header,
    ReceivedCommand,
    create_qcow2_image,
    read_qcow2_header,
)
from .fake_vm import FakeDisk, FakeVM, TransactionRecord
from .guest import (
    AGENT_PORT_NAME,
    CommandResult,
    Guest,
    GuestDisk,
    GuestError,
    WriterLog,
    boot_guest,
)
from .image import APT_PACKAGES, GuestBuildError, GuestImage, build_guest_image, default_cache_dir
from .peer import PEERS, Peer, PeerError, default_peer_name, get_peer

__all__ = [
    "AGENT_PORT_NAME",
    "APT_PACKAGES",
    "PEERS",
    "AgentFault",
    "AgentFaultKind",
    "AgentInjection",
    "AgentMessage",
    "BackupChainReport",
    "CommandResult",
    "FakeAgent",
    "FakeAgentError",
    "FakeBackupJob",
    "FakeBackups",
    "FakeBitmap",
    "FakeBlockDevice",
    "FakeBlockNode",
    "FakeCall",
    "FakeCommitJob",
    "FakeDisk",
    "FakeExecResult",
    "FakeJob",
    "FakeQMPConnection",
    "FakeQMPError",
    "FakeQMPServer",
    "FakeQOMObject",
    "FakeVM",
    "Fault",
    "FaultKind",
    "Guest",
    "GuestBuildError",
    "GuestDisk",
    "GuestError",
    "GuestImage",
    "Injection",
    "Peer",
    "PeerError",
    "QEMUJSONEvent",
    "QEMUJSONStreamParser",
    "Qcow2Header",
    "ReceivedCommand",
    "TransactionRecord",
    "WriterLog",
    "boot_guest",
    "build_guest_image",
    "check_backup_chain",
    "create_qcow2_image",
    "default_cache_dir",
    "default_peer_name",
    "get_peer",
    "qemu_json",
    "read_backup_file",
    "read_qcow2_header",
]
