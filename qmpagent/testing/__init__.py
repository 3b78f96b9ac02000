"""Test tools for code that drives QEMU: a real throwaway guest, fakes, a pytest plugin.

Nothing in the library imports this package.

* :func:`boot_guest` / :class:`Guest`: a real QEMU guest (TCG) with the real ``qemu-ga``, built
  from the host's Debian packages by :func:`build_guest_image` and cached.
* :class:`FakeAgent` and :class:`FakeQMPServer`: fault-injecting fakes of ``qemu-ga`` and of
  QEMU's QMP, real socket servers that behave like the real peers byte for byte where it was
  checked, for tests that need no VM.
* The pytest plugin (:mod:`qmpagent.testing.pytest_plugin`), loaded automatically when qmpagent
  is installed: fixtures ``qemu_guest`` and ``qemu_guest_factory``, marker ``real_vm``.
"""

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
    FakeCall,
    FakeJob,
    FakeQMPConnection,
    FakeQMPError,
    FakeQMPServer,
    FakeQOMObject,
    Fault,
    FaultKind,
    ReceivedCommand,
)
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

__all__ = [
    "AgentFault",
    "AgentFaultKind",
    "AgentInjection",
    "AgentMessage",
    "FakeAgent",
    "FakeAgentError",
    "FakeCall",
    "FakeExecResult",
    "FakeJob",
    "FakeQMPConnection",
    "FakeQMPError",
    "FakeQMPServer",
    "FakeQOMObject",
    "Fault",
    "FaultKind",
    "QEMUJSONEvent",
    "QEMUJSONStreamParser",
    "ReceivedCommand",
    "qemu_json",
    "AGENT_PORT_NAME",
    "APT_PACKAGES",
    "CommandResult",
    "Guest",
    "GuestBuildError",
    "GuestDisk",
    "GuestError",
    "GuestImage",
    "WriterLog",
    "boot_guest",
    "build_guest_image",
    "default_cache_dir",
]
