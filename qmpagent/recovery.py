"""``recover``: settle what a dead snapshot operation left on a VM (issue 13).

For each journal entry of *this* VM (:class:`~qmpagent.journal.VMIdentity`) whose process is
gone:

1. **The freeze.** Only an entry whose freeze was about to be sent and that was not recorded
   settled can have left a freeze of ours. If the freeze guard recorded that it thawed (or that
   nothing was frozen), nothing more is done about it. Otherwise ``guest-fsfreeze-status`` is
   read: frozen means the dead operation's freeze (its preflight saw the guest thawed, and
   nobody recorded a thaw since): it is thawed. Every other entry (a freeze of someone else's,
   a freeze that froze nothing and said so, no freeze) never causes a thaw.
2. **The transaction** is asked of QEMU, not of the journal: an overlay added with
   ``backing: null`` has a backing file only once ``blockdev-snapshot`` attached it. Applied:
   the overlays are the VM's active layers; they stay. Not applied: our overlay nodes (qcow2
   node, then file node) are detached and our overlay files removed, once no node holds them.
   Our ``blockdev-create`` jobs still in QEMU are waited for and dismissed first.
3. The entry (and the guard's record) is removed once nothing of it is left unsettled.

An entry of another VM, or of an operation still running (its process alive), is left alone.
A torn or foreign file in the journal directory is reported (``unresolved``) and left alone.
Running it when nothing is wrong changes nothing; running it twice is the same as once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from ._shield import run_to_completion
from .agent import AgentAddress, FreezeStatus, GuestAgent, check_address
from .errors import AgentError, JournalError, MonitorCommandError, MonitorError
from .journal import Entry, Journal, VMIdentity, identify_vm
from .monitor import Monitor

__all__ = ["RecoveryReport", "recover"]

log = logging.getLogger(__name__)

_UNSETTLED_FREEZE = ("sent-unresolved", "ours", "thaw-failed", "not-tried")


@dataclass
class RecoveryReport:
    """What :func:`recover` did and what it could not do.

    Attributes:
        thawed: filesystems thawed because a freeze of ours was still in place (0 otherwise).
        removed_nodes: block nodes of ours that a dead operation had left attached, now detached.
        removed_files: overlay files of ours it had left behind, now removed.
        unresolved: what could not be settled, and why (empty when all is clean); includes
            torn or foreign journal files and operations still running in another process.
        thawed_by_guard: filesystems the freeze guard had already thawed for a dead operation.
        kept_overlays: overlay nodes left in place because the dead operation's transaction was
            applied (they are the VM's active layers: a consistent chain).
        settled: ids of the operations settled (their journal entries removed).
        in_progress: ids of operations on this VM that are still running (left alone).
        journal_errors: the torn or foreign journal files (also in ``unresolved``).
        vm: the VM, as identified.
        guest_may_be_frozen: a freeze of ours may still be in place (the agent could not be
            reached, or the thaw failed).
        other_vms: journal entries of other VMs (left alone; an entry of a VM that no longer
            runs stays until removed by hand: its files may be that VM's images).
    """

    thawed: int = 0
    removed_nodes: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)
    thawed_by_guard: int = 0
    kept_overlays: list[str] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)
    journal_errors: list[str] = field(default_factory=list)
    vm: str = ""
    guest_may_be_frozen: bool = False
    other_vms: int = 0

    @property
    def clean(self) -> bool:
        """Nothing of ours is left on the VM (after what was done), and nothing unreadable."""
        return not self.unresolved

    @property
    def changed(self) -> bool:
        """Whether anything was done."""
        return bool(self.thawed or self.removed_nodes or self.removed_files or self.settled)

    @property
    def exit_code(self) -> int:
        """What ``qmpagent recover`` exits with: 0 nothing of ours left (also: nothing was
        wrong), 8 a freeze of ours may still be in place (the CLI's ``thaw-failed``), 1
        something else is unresolved (nodes or files left, a torn or foreign journal file, an
        operation still running)."""
        if self.guest_may_be_frozen:
            return 8
        return 0 if self.clean else 1

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-able dict (``--json``)."""
        return {
            "vm": self.vm,
            "clean": self.clean,
            "thawed": self.thawed,
            "thawed_by_guard": self.thawed_by_guard,
            "removed_nodes": list(self.removed_nodes),
            "removed_files": list(self.removed_files),
            "kept_overlays": list(self.kept_overlays),
            "settled": list(self.settled),
            "in_progress": list(self.in_progress),
            "journal_errors": list(self.journal_errors),
            "unresolved": list(self.unresolved),
            "guest_may_be_frozen": self.guest_may_be_frozen,
            "other_vms": self.other_vms,
            "exit_code": self.exit_code,
        }

    def render(self) -> str:
        """The report for humans, a few lines."""
        lines = []
        if not self.changed and self.clean:
            lines.append(f"nothing to recover ({self.vm})" if self.vm else "nothing to recover")
        else:
            lines.append(f"recovered {len(self.settled)} operation(s) on {self.vm}")
        if self.thawed:
            lines.append(f"  thawed {self.thawed} filesystem(s) a dead operation left frozen")
        if self.thawed_by_guard:
            lines.append(f"  the freeze guard had thawed {self.thawed_by_guard} filesystem(s)")
        for n in self.removed_nodes:
            lines.append(f"  detached block node {n}")
        for f in self.removed_files:
            lines.append(f"  removed file {f}")
        for n in self.kept_overlays:
            lines.append(f"  kept overlay {n} (the snapshot had been taken: it is the active layer)")
        for u in self.unresolved:
            lines.append(f"  UNRESOLVED: {u}")
        if self.other_vms:
            lines.append(f"  ({self.other_vms} journal entr{'y' if self.other_vms == 1 else 'ies'} "
                         "of other VMs left alone)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


async def recover(
    mon: Monitor,
    agent: GuestAgent | AgentAddress | None = None,
    journal_dir: str | os.PathLike[str] | None = None,
    *,
    timeout: float = 30.0,
    agent_chardev: str | None = None,
) -> RecoveryReport:
    """Settle what dead snapshot operations left on the VM behind ``mon`` (see the module
    docstring): thaw a freeze of theirs still in place, find out from QEMU whether their
    transaction was applied, detach their nodes and remove their files that are not part of the
    VM's chain, and remove their journal entries. Idempotent; changes nothing when nothing is
    wrong.

    Args:
        mon: a connected :class:`~qmpagent.Monitor` of the VM.
        agent: a connected :class:`~qmpagent.GuestAgent`, its address (connected only if a
            freeze may have to be thawed), or None (then a freeze that may be ours is reported
            in ``unresolved``).
        journal_dir: the journal directory (default ``$XDG_STATE_HOME/qmpagent``).
        timeout: bound of each QMP and agent command and of waiting for a leftover job.
        agent_chardev: the agent's chardev label, if not the usual one.

    Returns:
        A :class:`RecoveryReport` (``report.exit_code`` is what the CLI exits with).

    Raises:
        MonitorUnavailable: the connection to QEMU is lost.
        UsageError: a malformed agent address.
    """
    if agent is not None and not isinstance(agent, GuestAgent):
        agent = check_address(agent)
    journal = Journal(journal_dir)
    identity = await identify_vm(mon, timeout=timeout)
    report = await settle_journal(mon, agent, journal, identity, timeout=timeout,
                                  agent_chardev=agent_chardev)
    for err in report.journal_errors:
        report.unresolved.append(err)
    return report


class _AgentHandle:
    """The agent for recovery: connected lazily (only if a freeze may have to be thawed)."""

    def __init__(self, agent: GuestAgent | AgentAddress | None, mon: Monitor, timeout: float,
                 chardev: str | None) -> None:
        self.given = agent if isinstance(agent, GuestAgent) else None
        self.address = None if agent is None or isinstance(agent, GuestAgent) else agent
        self.mon = mon
        self.timeout = timeout
        self.chardev = chardev
        self.own: GuestAgent | None = None
        self.own_given = False

    async def get(self) -> GuestAgent:
        """Raises AgentError when it cannot be had."""
        from .errors import AgentUnavailable

        if self.own is not None:
            return self.own
        if self.own_given and self.given is not None:
            return self.given
        if self.given is None and self.address is None:
            raise AgentUnavailable("no guest agent was given")
        # Invariant 2 holds here too: the port first, then a sync, before any command.
        try:
            port_open = await self.mon.agent_port_open(self.chardev)
        except MonitorError as exc:
            raise AgentUnavailable(f"cannot read the agent port state: {exc}") from exc
        if not port_open:
            raise AgentUnavailable("the guest agent's port is closed in the guest")
        if self.given is not None:
            await self.given.sync(timeout=self.timeout)
            self.own_given = True
            return self.given
        assert self.address is not None
        self.own = await GuestAgent.connect(self.address, timeout=self.timeout)
        return self.own

    async def close(self) -> None:
        if self.own is not None:
            await self.own.close()
            self.own = None


async def settle_journal(
    mon: Monitor,
    agent: GuestAgent | AgentAddress | None,
    journal: Journal,
    identity: VMIdentity,
    *,
    timeout: float = 30.0,
    agent_chardev: str | None = None,
    skip_op: str | None = None,
    may_thaw: bool = True,
) -> RecoveryReport:
    """The work of :func:`recover` for a known VM identity (the snapshot's preflight calls
    it too, with ``may_thaw=False``: a freeze that may be a dead operation's is then reported
    as unresolved rather than thawed, since only an explicit recover may act on that guess).
    Journal errors are in ``report.journal_errors`` only."""
    report = RecoveryReport(vm=identity.describe())
    handle = _AgentHandle(agent, mon, timeout, agent_chardev)
    try:
        for item in journal.scan():
            if isinstance(item, JournalError):
                report.journal_errors.append(str(item))
                continue
            if item.op == skip_op:
                continue
            if not item.vm.matches(identity):
                report.other_vms += 1
                continue
            if item.owner_alive:
                report.in_progress.append(item.op)
                report.unresolved.append(
                    f"operation {item.op} on this VM is still running (pid {item.owner_pid}): left alone"
                )
                continue
            await _settle_entry(mon, handle, journal, item, report, timeout, may_thaw)
    finally:
        await run_to_completion(handle.close())
    return report


async def _settle_entry(mon: Monitor, handle: _AgentHandle, journal: Journal, entry: Entry,
                        report: RecoveryReport, timeout: float, may_thaw: bool) -> None:
    before = len(report.unresolved)
    op = entry.op
    try:
        if entry.kind == "commit":
            # A commit froze nothing: its job and its merged nodes (qmpagent.commit).
            from .commit import settle_commit_entry

            nodes, files, unresolved = await settle_commit_entry(
                mon, entry, timeout=timeout, may_finish=may_thaw)
            report.removed_nodes.extend(nodes)
            report.removed_files.extend(files)
            report.unresolved.extend(unresolved)
        else:
            await _settle_freeze(handle, journal, entry, report, timeout, may_thaw)
            if len(report.unresolved) > before:
                return  # the freeze first: nothing else of this entry is touched meanwhile
            if entry.kind == "backup":
                # Its copy jobs first (they hold the targets open): qmpagent.backup.
                from .backup import settle_backup_entry

                report.unresolved.extend(await settle_backup_entry(mon, entry, timeout=timeout))
            await _settle_jobs(mon, entry, report, timeout)
            await _settle_nodes(mon, entry, report, timeout)
    except MonitorError as exc:
        from .errors import MonitorUnavailable

        if isinstance(exc, MonitorUnavailable):
            raise
        report.unresolved.append(f"operation {op}: QEMU did not answer as expected: {exc}")
    if len(report.unresolved) == before:
        try:
            journal.remove(op)
        except JournalError as exc:
            report.unresolved.append(str(exc))
            return
        report.settled.append(op)
        log.info("recovered operation %s", op)


async def _settle_freeze(handle: _AgentHandle, journal: Journal, entry: Entry,
                         report: RecoveryReport, timeout: float, may_thaw: bool) -> None:
    if entry.step != "freeze" or entry.freeze not in _UNSETTLED_FREEZE:
        return  # no freeze of ours can be in place
    try:
        record = journal.guard_record(entry.op)
    except JournalError as exc:
        report.unresolved.append(f"{exc}; whether the guest is still frozen by operation "
                                 f"{entry.op} is not settled")
        return
    if record is not None and record.result == "thawed":
        report.thawed_by_guard += record.thawed
        return
    if record is not None and record.result == "not-frozen":
        return
    try:
        agent = await handle.get()
        status = await agent.fsfreeze_status(timeout=timeout)
        if status is FreezeStatus.FROZEN and not may_thaw:
            report.guest_may_be_frozen = True
            report.unresolved.append(
                f"operation {entry.op} died with a freeze that may be ours in place and the "
                "guest is frozen: run qmpagent recover (it thaws it) unless someone else froze "
                "it since"
            )
            return
        if status is FreezeStatus.FROZEN:
            n = await agent.fsfreeze_thaw(timeout=timeout)
            report.thawed += n
            log.warning("recover: thawed %d filesystem(s) operation %s left frozen", n, entry.op)
    except AgentError as exc:
        report.guest_may_be_frozen = True
        report.unresolved.append(
            f"operation {entry.op} died with a freeze that may be ours in place, and the agent "
            f"cannot tell ({exc}): THE GUEST MAY BE FROZEN; check guest-fsfreeze-status"
        )


async def _settle_jobs(mon: Monitor, entry: Entry, report: RecoveryReport, timeout: float) -> None:
    ours = {jid for o in entry.overlays for jid in o.job_ids()}
    deadline = time.monotonic() + timeout
    while True:
        jobs = await mon.execute("query-jobs", timeout=timeout)
        pending = []
        for job in jobs if isinstance(jobs, list) else []:
            if not isinstance(job, dict) or job.get("id") not in ours:
                continue
            if job.get("status") in ("concluded", "null"):
                with contextlib.suppress(MonitorCommandError):
                    await mon.execute("job-dismiss", {"id": job["id"]}, timeout=timeout)
            else:
                pending.append(str(job.get("id")))
        if not pending:
            return
        if time.monotonic() > deadline:
            report.unresolved.append(f"operation {entry.op}: job(s) {', '.join(pending)} did not finish")
            return
        await anyio.sleep(0.1)


async def _settle_nodes(mon: Monitor, entry: Entry, report: RecoveryReport, timeout: float) -> None:
    nodes = {n.node_name: n for n in await mon.named_block_nodes()}
    # (A backup's targets, fleecing images included, are never the VM's layers.)
    applied = [] if entry.kind == "backup" else [
        o for o in entry.overlays if o.node in nodes and nodes[o.node].backing_file]
    if applied:
        # The transaction is atomic: it was applied, the overlays are the active layers.
        report.kept_overlays.extend(o.node for o in applied)
        return
    for o in reversed(entry.overlays):
        detached = True
        for name in (o.node, o.file_node):
            if name not in nodes:
                continue
            try:
                await mon.execute("blockdev-del", {"node-name": name}, timeout=timeout)
            except MonitorCommandError as exc:
                detached = False
                report.unresolved.append(f"operation {entry.op}: cannot detach node {name}: {exc}")
                break
            report.removed_nodes.append(name)
        if not detached:
            continue
    remaining = await mon.named_block_nodes()
    in_use = {n.filename for n in remaining}
    for o in entry.overlays:
        if o.path in in_use:
            if o.node not in {n.node_name for n in remaining}:
                report.unresolved.append(
                    f"operation {entry.op}: {o.path} is open in QEMU by a node not of ours: left alone"
                )
            continue
        try:
            os.unlink(o.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            report.unresolved.append(f"operation {entry.op}: cannot remove {o.path}: {exc}")
            continue
        report.removed_files.append(o.path)

