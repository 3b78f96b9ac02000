"""The types an operation and its collaborators share: :class:`OrchestratorView` (what an
operation reads of the orchestrator that runs it), :class:`Timeouts` (the orchestrator's timeouts
as one run uses them), and one disk's :class:`Overlay` with the :class:`Step` its preparation got
to (re-exported by :mod:`qmpagent.operation`, where they always were).

Here, below :mod:`qmpagent.operation` and the collaborators it holds (:mod:`qmpagent.preflight`,
:mod:`qmpagent.thaw`, :mod:`qmpagent.agent_link`), so that each of them can import them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from .agent import AgentAddress, GuestAgent
from .journal import Journal
from .monitor import BlockNode, Monitor

__all__ = ["OrchestratorView", "Overlay", "Step", "Timeouts"]


class OrchestratorView(Protocol):
    """What an operation reads of the :class:`~qmpagent.SnapshotOrchestrator` that runs it,
    read when it is needed (the orchestrator's attributes are public, and may change)."""

    @property
    def monitor(self) -> Monitor:
        """The VM's monitor."""

    @property
    def agent(self) -> GuestAgent | None:
        """The agent connection the orchestrator was given, if it was given one."""

    @property
    def agent_address(self) -> AgentAddress | None:
        """The agent's address the orchestrator was given, if it was given one."""

    @property
    def has_agent(self) -> bool:
        """Whether an agent (connection or address) was given."""

    @property
    def agent_chardev(self) -> str | None:
        """The agent's chardev label, if not the usual one."""

    @property
    def journal(self) -> Journal:
        """Where each operation's journal entry is written."""

    @property
    def guard(self) -> bool:
        """Whether to start the freeze guard before each freeze."""

    def timeouts(self) -> Timeouts:
        """The orchestrator's timeouts, validated now (UsageError)."""


class Step(enum.IntEnum):
    """How far one overlay's preparation got. Each step counts as (maybe) done as soon as it
    is sent: a lost reply or a caller that gives up must not hide a file or a node from the
    cleanup, which checks what really exists before it removes anything."""

    NONE = 0
    FILE = 1  # blockdev-create of the file sent: a file of ours may exist
    FILE_NODE = 2  # blockdev-add of the file node sent
    NODE = 3  # blockdev-add of the qcow2 node sent


@dataclass
class Overlay:
    """One disk's overlay while it is being prepared (internal bookkeeping)."""

    node: str  # the disk's format node
    path: str  # the overlay file
    base: BlockNode
    node_name: str  # the overlay's qcow2 node
    file_node_name: str  # the overlay's file node
    step: Step = Step.NONE


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The orchestrator's timeouts, validated, as one run uses them."""

    agent: float
    thaw: float
    command: float
    job: float
