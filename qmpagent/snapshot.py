"""``SnapshotOrchestrator``: atomic, application-consistent external snapshots.

The order, and why (docs/design.md section 2):

1. **Preflight**, before anything is changed: the VM is running; the block nodes exist; and,
   unless ``quiesce="off"``, the agent's virtio-serial port is open in the guest (QMP
   ``query-chardev``), the channel is in sync (``guest-sync-delimited`` with a fresh random id),
   the agent answers ``guest-ping``, ``guest-fsfreeze-status`` says ``thawed`` (``frozen`` means
   someone else froze it: we snapshot without freezing and never thaw), and ``guest-info`` lists
   the freeze commands as enabled. Any failure: no freeze is attempted.
2. **Prepare**: every overlay is created (``blockdev-create`` jobs, qcow2 with the current image
   recorded as its backing file) and attached (``blockdev-add``, ``backing: null``) *before* the
   freeze, so the freeze window holds nothing that can wait.
3. **Freeze** (``guest-fsfreeze-freeze``). Only a freeze that returned a count > 0 is ours. A
   freeze whose reply timed out is resolved by resync + ``guest-fsfreeze-status``: frozen (it was
   thawed at preflight) means ours.
4. **Transaction**: one QMP ``transaction`` of ``blockdev-snapshot`` actions, atomic across all
   disks, bounded by what is left of ``freeze_timeout``.
5. **Thaw**, if and only if this operation froze something, on every exit path (error, deadline,
   cancellation of the caller), shielded from cancellation and bounded by its own timeout. A thaw
   that fails raises :class:`~qmpagent.ThawError`: the guest may still be frozen.

A failed snapshot leaves the VM on its original images and detaches the overlays it attached and
removes the files it created.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import anyio

from ._shield import run_to_completion
from .agent import AgentAddress, FreezeStatus, GuestAgent
from .errors import (
    AgentCommandError,
    AgentError,
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
from .monitor import BlockNode, Monitor

__all__ = [
    "FreezeOwner",
    "PhaseCallback",
    "PhaseTimings",
    "Quiesce",
    "SnapshotOrchestrator",
    "SnapshotResult",
]

log = logging.getLogger(__name__)

#: Agent commands the freeze path needs; ``guest-info`` must list them as enabled.
FREEZE_COMMANDS: Final = ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-fsfreeze-status")


#: ``on_phase(name, seconds)``: ``seconds`` is None when the phase starts, its duration at the end.
PhaseCallback = Callable[[str, float | None], None]


class Quiesce(str, enum.Enum):
    """How hard to try for an application-consistent snapshot."""

    #: Freeze the guest's filesystems or take no snapshot at all (raise).
    REQUIRED = "required"
    #: Freeze if possible; otherwise take a crash-consistent snapshot and say why.
    PREFERRED = "preferred"
    #: Never talk to the agent: a crash-consistent snapshot.
    OFF = "off"


class FreezeOwner(str, enum.Enum):
    """Who froze the guest's filesystems while the snapshot was taken."""

    #: This operation froze them (and thawed them).
    SELF = "self"
    #: They were frozen beforehand by someone else; they were left frozen.
    EXTERNAL = "external"


@dataclass(frozen=True, slots=True)
class PhaseTimings:
    """Seconds spent in each phase of a snapshot (0.0 for phases that did not run)."""

    preflight: float = 0.0
    prepare: float = 0.0
    freeze: float = 0.0
    transaction: float = 0.0
    thaw: float = 0.0
    cleanup: float = 0.0
    total: float = 0.0


@dataclass(frozen=True)
class SnapshotResult:
    """What :meth:`SnapshotOrchestrator.snapshot` did.

    Attributes:
        quiesced: the filesystems were frozen while the transaction ran.
        freeze_owner: ``"self"``, ``"external"`` (a :class:`FreezeOwner`) or None.
        frozen: filesystems this operation froze (0 if it froze none).
        thawed: filesystems this operation thawed (0 unless it froze some).
        freeze_window: seconds from the freeze reply to the thaw reply, or None.
        overlays: block node name -> node name of its new overlay (now the active layer).
        reason: why the snapshot is not quiesced, when it is not.
        files: block node name -> the new overlay's file.
        timings: per-phase durations.
        freeze_resolved: a freeze whose reply was lost was found (by its status) to be ours.
        warnings: things the caller should know although the snapshot succeeded, e.g. that
            the freeze froze fewer filesystems than the guest has (another tool may have frozen
            one, and qemu-ga's thaw thaws every frozen filesystem, that one included).
    """

    quiesced: bool
    freeze_owner: str | None
    frozen: int
    thawed: int
    freeze_window: float | None
    overlays: dict[str, str]
    reason: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    timings: PhaseTimings = field(default_factory=PhaseTimings)
    freeze_resolved: bool = False
    warnings: tuple[str, ...] = ()


@dataclass
class _Overlay:
    """One disk's overlay while it is being prepared (internal bookkeeping)."""

    node: str  # the disk's format node
    path: str  # the overlay file
    base: BlockNode
    node_name: str  # the overlay's qcow2 node
    file_node_name: str  # the overlay's file node
    file_created: bool = False
    file_node_added: bool = False
    node_added: bool = False


class _Unquiescable(Exception):
    """Preflight found that no freeze can be attempted (internal)."""


class SnapshotOrchestrator:
    """Takes quiesced external snapshots of a running VM's disks.

    Args:
        monitor: a connected :class:`~qmpagent.Monitor` of the VM.
        agent: a connected :class:`~qmpagent.GuestAgent`, the agent's address (connected when
            needed, after its port is seen open, and closed afterwards), or None (no agent:
            only ``quiesce="preferred"`` or ``"off"`` can succeed).
        agent_timeout: timeout of each agent command (sync, ping, status, info, freeze).
        thaw_timeout: how long the thaw may take, retries and resyncs included, before
            :class:`~qmpagent.ThawError` is raised.
        command_timeout: timeout of each QMP command outside the freeze window.
        job_timeout: timeout of each overlay-creating job.
        agent_chardev: the agent's chardev label, if the port is not the usual
            ``org.qemu.guest_agent.0``.
    """

    def __init__(
        self,
        monitor: Monitor,
        agent: GuestAgent | AgentAddress | None = None,
        *,
        agent_timeout: float = 10.0,
        thaw_timeout: float = 30.0,
        command_timeout: float = 30.0,
        job_timeout: float = 120.0,
        agent_chardev: str | None = None,
    ) -> None:
        self.monitor = monitor
        self._agent: GuestAgent | None = agent if isinstance(agent, GuestAgent) else None
        self._agent_address: AgentAddress | None = (
            None if agent is None or isinstance(agent, GuestAgent) else agent
        )
        self.agent_timeout = agent_timeout
        self.thaw_timeout = thaw_timeout
        self.command_timeout = command_timeout
        self.job_timeout = job_timeout
        self.agent_chardev = agent_chardev
        # One snapshot at a time through this orchestrator: two interleaved freeze/thaw
        # sequences on one guest would thaw each other's freeze.
        self._busy = asyncio.Lock()

    @property
    def has_agent(self) -> bool:
        """Whether an agent (connection or address) was given."""
        return self._agent is not None or self._agent_address is not None

    async def snapshot(
        self,
        disks: Mapping[str, str | os.PathLike[str]],
        quiesce: Quiesce | str = Quiesce.REQUIRED,
        freeze_timeout: float = 10.0,
        *,
        on_phase: PhaseCallback | None = None,
    ) -> SnapshotResult:
        """Take one atomic external snapshot of ``disks``.

        Args:
            disks: block node name (or the qdev id of its device) -> the new overlay file, which
                must not exist yet; it is created as qcow2 with the current image as backing file.
            quiesce: ``"required"``, ``"preferred"`` or ``"off"`` (see :class:`Quiesce`).
            freeze_timeout: the longest allowed freeze window, in seconds. If the transaction has
                not completed by then, the guest is thawed and the snapshot is not quiesced.
            on_phase: called as ``on_phase(name, None)`` when a phase starts and
                ``on_phase(name, seconds)`` when it ends (``preflight``, ``prepare``, ``freeze``,
                ``transaction``, ``thaw``), e.g. for progress output. It must not block; an
                exception it raises is logged and ignored.

        Returns:
            A :class:`SnapshotResult`.

        Raises:
            UsageError: bad arguments (unknown quiesce mode, empty ``disks``, an existing file).

        Concurrent calls on one orchestrator run one after the other.
            SnapshotError: no snapshot was taken, or (``quiesce="required"``) it could not be
                quiesced; ``.record`` says what was done and undone.
            ThawError: this operation froze the guest and could not thaw it: THE GUEST MAY STILL
                BE FROZEN.
        """
        mode = _quiesce_mode(quiesce)
        if isinstance(freeze_timeout, bool) or not isinstance(freeze_timeout, (int, float)):
            raise UsageError("freeze_timeout must be a number of seconds")
        if not freeze_timeout > 0:
            raise UsageError("freeze_timeout must be positive")
        if not isinstance(disks, Mapping) or not disks:
            raise UsageError("disks must be a non-empty mapping of node name to overlay path")
        for key, path in disks.items():
            if not isinstance(key, str) or not isinstance(path, (str, os.PathLike)):
                raise UsageError(f"bad disk entry {key!r}: {path!r} (expected str: path)")
        async with self._busy:
            op = _Operation(self, mode, freeze_timeout, on_phase)
            return await op.run({str(k): os.fspath(v) for k, v in disks.items()})


async def _keeping_thaw_error(failure: BaseException | None, step: Coroutine[Any, Any, None]) -> None:
    """Run a clean-up step to completion while ``failure`` propagates. If that failure is a
    ThawError, nothing that happens meanwhile (a late cancellation, a timeout of the caller)
    may replace it: the caller must learn that the guest may still be frozen."""
    try:
        await run_to_completion(step)
    except BaseException as late:
        if isinstance(failure, ThawError):
            log.warning("ignored during clean-up after a failed thaw: %r", late)
            return
        raise


def _quiesce_mode(value: Quiesce | str) -> Quiesce:
    try:
        return Quiesce(value)
    except ValueError:
        raise UsageError(f"quiesce must be one of required, preferred, off; not {value!r}") from None


class _Operation:
    """One snapshot run: its state, its record, and the phases in order."""

    def __init__(
        self,
        orch: SnapshotOrchestrator,
        mode: Quiesce,
        freeze_timeout: float,
        on_phase: PhaseCallback | None,
    ) -> None:
        self.orch = orch
        self.on_phase = on_phase
        self.mon = orch.monitor
        self.mode = mode
        self.freeze_timeout = freeze_timeout
        self.record = SnapshotRecord()
        self.agent: GuestAgent | None = None
        self.own_agent = False  # we connected it, we close it
        self.overlays: list[_Overlay] = []
        self.reason: str | None = None
        self.owner: FreezeOwner | None = None
        self.frozen = 0
        self.thawed = 0
        self.freeze_resolved = False
        self.times: dict[str, float] = {}
        self.token = secrets.token_hex(4)
        self.window: float | None = None
        self.vm_running = False
        self.owns_freeze = False
        # A freeze that was sent but whose outcome is not known yet (the error that hid it).
        self.freeze_unresolved: BaseException | None = None
        self.frozen_at: float | None = None
        self.warnings: list[str] = []
        self.filesystems: int | None = None  # what guest-get-fsinfo lists, if it answers
        self.thaw_done = False
        self.thawed_at: float | None = None
        self.transaction_sent = False

    # --- driver ---------------------------------------------------------------------------

    async def run(self, disks: dict[str, str]) -> SnapshotResult:
        started = time.monotonic()
        try:
            with self._phase("preflight"):
                await self._preflight_vm(disks)
                if self.mode is not Quiesce.OFF:
                    await self._preflight_agent()
                else:
                    self.reason = "quiesce is off"
            with self._phase("prepare"):
                await self._prepare()
            await self._freeze_snapshot_thaw()
        except BaseException as exc:
            await _keeping_thaw_error(exc, self._cleanup(exc))
            raise
        finally:
            if self.own_agent and self.agent is not None:
                await _keeping_thaw_error(sys.exc_info()[1], self.agent.close())
        self.times["total"] = time.monotonic() - started
        quiesced = self.owner is not None
        return SnapshotResult(
            quiesced=quiesced,
            freeze_owner=self.owner.value if self.owner is not None else None,
            frozen=self.frozen,
            thawed=self.thawed,
            freeze_window=self.window,
            overlays={o.node: o.node_name for o in self.overlays},
            reason=None if quiesced else self.reason,
            files={o.node: o.path for o in self.overlays},
            timings=PhaseTimings(**self.times),
            freeze_resolved=self.freeze_resolved,
            warnings=tuple(self.warnings),
        )

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Time a phase and name it in the record. A phase run while another one's failure is
        propagating (the thaw in a ``finally``) leaves the failed phase named, unless it fails
        itself."""
        failing = sys.exc_info()[1] is not None
        previous = self.record.phase
        self.record.phase = name
        self._notify(name, None)
        t = time.monotonic()
        try:
            yield
        except BaseException:
            raise
        else:
            if failing:
                self.record.phase = previous
        finally:
            elapsed = time.monotonic() - t
            self.times[name] = self.times.get(name, 0.0) + elapsed
            self._notify(name, elapsed)

    def _notify(self, name: str, seconds: float | None) -> None:
        if self.on_phase is None:
            return
        try:
            self.on_phase(name, seconds)
        except Exception:
            log.exception("on_phase callback failed (ignored)")

    def _fail(self, message: str, cause: BaseException | None = None) -> SnapshotError:
        err = SnapshotError(message, self.record)
        err.__cause__ = cause
        return err

    # --- preflight ------------------------------------------------------------------------

    async def _preflight_vm(self, disks: dict[str, str]) -> None:
        timeout = self.orch.command_timeout
        try:
            status = await self.mon.execute("query-status", timeout=timeout)
            nodes = {n.node_name: n for n in await self.mon.named_block_nodes()}
        except MonitorError as exc:
            raise self._fail(f"preflight: cannot query QEMU: {exc}", exc) from exc
        self.vm_running = isinstance(status, dict) and status.get("status") == "running"
        seen_paths: set[str] = set()
        for i, (key, path) in enumerate(disks.items()):
            node = key
            if node not in nodes:
                try:
                    node = await self.mon.device_node_name(key)
                except MonitorCommandError as exc:
                    raise UsageError(f"no block node or device named {key!r}") from exc
                except MonitorError as exc:
                    raise self._fail(f"preflight: cannot resolve device {key!r}: {exc}", exc) from exc
            base = nodes.get(node)
            if base is None:
                raise UsageError(f"no block node named {node!r}")
            if not os.path.isabs(path):
                raise UsageError(f"overlay path must be absolute: {path!r}")
            if path in seen_paths or any(o.node == node for o in self.overlays):
                raise UsageError(f"disk {key!r} or overlay {path!r} given twice")
            if os.path.lexists(path):  # noqa: ASYNC240 - one stat of a local path
                raise UsageError(f"overlay file {path} already exists; refusing to overwrite it")
            if base.virtual_size is None:
                raise UsageError(f"block node {node!r} reports no virtual size")
            seen_paths.add(path)
            self.overlays.append(
                _Overlay(
                    node=node,
                    path=path,
                    base=base,
                    node_name=f"qa{self.token}o{i}",
                    file_node_name=f"qa{self.token}f{i}",
                )
            )

    async def _preflight_agent(self) -> None:
        try:
            await self._check_agent()
        except _Unquiescable as exc:
            self.reason = str(exc)
            log.info("snapshot cannot be quiesced: %s", exc)
            if self.mode is Quiesce.REQUIRED:
                raise self._fail(f"quiesce required but not possible: {exc}", exc.__cause__) from exc

    async def _check_agent(self) -> None:
        orch = self.orch
        if not orch.has_agent:
            raise _Unquiescable("no guest agent was given")
        if not self.vm_running:
            raise _Unquiescable("the VM is not running")
        # Invariant 2: the port first; a request written to a closed port would be queued and
        # answered much later, to whoever is connected then.
        try:
            port_open = await self.mon.agent_port_open(orch.agent_chardev)
        except (AgentError, MonitorError) as exc:
            raise _Unquiescable(f"cannot read the agent port state: {exc}") from exc
        if not port_open:
            raise _Unquiescable("the guest agent's port is closed in the guest (agent not running)")
        t = orch.agent_timeout
        try:
            if orch._agent is not None:
                self.agent = orch._agent
                await self.agent.sync(timeout=t)
            else:
                assert orch._agent_address is not None
                self.agent = await GuestAgent.connect(orch._agent_address, timeout=t)
                self.own_agent = True
            await self.agent.ping(timeout=t)
            status = await self.agent.fsfreeze_status(timeout=t)
        except AgentError as exc:
            raise _Unquiescable(f"the guest agent does not answer: {exc}") from exc
        if status is FreezeStatus.FROZEN:
            # Invariant 3: frozen by someone else. Quiescent, but not ours: never thaw it.
            self.owner = FreezeOwner.EXTERNAL
            self.record.freeze_owner = FreezeOwner.EXTERNAL.value
            log.info("guest already frozen by someone else: snapshot without freeze or thaw")
            return
        try:
            info = await self.agent.info(timeout=t)
        except AgentError as exc:
            raise _Unquiescable(f"guest-info failed: {exc}") from exc
        disabled = [c for c in FREEZE_COMMANDS if not info.is_enabled(c)]
        if disabled:
            raise _Unquiescable(f"the guest agent has {', '.join(disabled)} disabled")
        if info.is_enabled("guest-get-fsinfo"):
            # To notice a freeze that freezes fewer filesystems than there are (see _freeze).
            try:
                fsinfo = await self.agent.get_fsinfo(timeout=t)
                self.filesystems = len({fs.get("mountpoint") for fs in fsinfo})
            except AgentError as exc:
                log.info("guest-get-fsinfo failed (%s); freeze counts are not cross-checked", exc)

    # --- prepare --------------------------------------------------------------------------

    async def _prepare(self) -> None:
        results = await asyncio.gather(
            *(self._prepare_one(o) for o in self.overlays), return_exceptions=True
        )
        for res in results:
            if isinstance(res, BaseException):
                if isinstance(res, QMPAgentError):
                    raise self._fail(f"preparing the overlays failed: {res}", res) from res
                raise res

    async def _prepare_one(self, ov: _Overlay) -> None:
        # Each step is marked as (maybe) done *before* it is sent: a reply that is lost or a
        # caller that gives up must not hide a file or a node from the cleanup, which checks
        # what really exists before it removes anything.
        mon, jt, ct = self.mon, self.orch.job_timeout, self.orch.command_timeout
        ov.file_created = True  # preflight saw no file there: whatever is there now is ours
        await mon.run_job(
            "blockdev-create",
            {
                "job-id": f"{ov.node_name}-cf",
                "options": {"driver": "file", "filename": ov.path, "size": 0},
            },
            timeout=jt,
        )
        self.record.files_created.append(ov.path)
        ov.file_node_added = True
        await mon.execute(
            "blockdev-add",
            {"driver": "file", "filename": ov.path, "node-name": ov.file_node_name},
            timeout=ct,
        )
        options: dict[str, Any] = {
            "driver": "qcow2",
            "file": ov.file_node_name,
            "size": ov.base.virtual_size,
            "backing-file": ov.base.filename,
        }
        if ov.base.driver in ("qcow2", "raw", "qed", "vmdk", "vpc", "vdi", "luks"):
            options["backing-fmt"] = ov.base.driver
        await mon.run_job(
            "blockdev-create", {"job-id": f"{ov.node_name}-cq", "options": options}, timeout=jt
        )
        ov.node_added = True
        await mon.execute(
            "blockdev-add",
            {"driver": "qcow2", "node-name": ov.node_name, "file": ov.file_node_name, "backing": None},
            timeout=ct,
        )
        self.record.overlays_added.append(ov.node_name)

    # --- the window -----------------------------------------------------------------------

    async def _freeze_snapshot_thaw(self) -> None:
        try:
            if self.agent is not None and self.owner is None and self.reason is None:
                # Port state again, right before the freeze: prepare may have taken a while.
                await self._check_port_still_open()
            if self.agent is not None and self.owner is None and self.reason is None:
                with self._phase("freeze"):
                    await self._freeze()
            with self._phase("transaction"):
                if self.owns_freeze:
                    assert self.frozen_at is not None
                    await self._transaction(self.freeze_timeout, self.frozen_at)
                else:
                    await self._transaction(self.orch.command_timeout, None)
        finally:
            # Whatever happened above (an error, the deadline, the caller cancelled, once or
            # more): a freeze that was sent and not yet known to be ours or not is resolved
            # now, and ours is thawed. Both run to completion.
            if self.freeze_unresolved is not None:
                await run_to_completion(self._resolve_and_own(self.freeze_unresolved))
            if self.owns_freeze:
                with self._phase("thaw"):
                    await run_to_completion(self._thaw())
                if self.thawed_at is not None and self.frozen_at is not None:
                    self.window = self.thawed_at - self.frozen_at

    async def _check_port_still_open(self) -> None:
        try:
            port_open = await self.mon.agent_port_open(self.orch.agent_chardev)
        except (AgentError, MonitorError) as exc:
            self._no_freeze(f"cannot read the agent port state before the freeze: {exc}", exc)
            return
        if not port_open:
            self._no_freeze("the guest agent's port closed before the freeze (agent stopped)")

    async def _freeze(self) -> None:
        """Freeze; sets ``owns_freeze`` as soon as this operation owns a freeze to thaw, and
        ``freeze_unresolved`` while a freeze was sent but its outcome is not known."""
        assert self.agent is not None
        agent = self.agent
        written_before = agent.requests_written
        sent_at = time.monotonic()
        try:
            n = await agent.fsfreeze_freeze(timeout=self.orch.agent_timeout)
        except AgentCommandError as exc:
            # The agent answered: it thaws by itself when a freeze fails part-way, and a
            # CommandNotFound here means someone froze it since preflight. Not ours either way.
            self._no_freeze(f"the freeze failed: {exc}", exc)
            return
        except BaseException as exc:
            sent = agent.requests_written > written_before and agent.last_written in (
                "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list"
            )
            if not sent:
                # Timed out or cancelled before the request left (waiting for the channel):
                # nothing of ours can be frozen, and a frozen status would be somebody else's.
                if isinstance(exc, AgentError):
                    self._no_freeze(f"the freeze could not be sent: {exc}", exc)
                    return
                raise
            # Invariant 5: a timeout, a lost connection, garbage instead of the reply, or the
            # caller cancelled while the freeze was in flight: it may or may not have frozen
            # the guest. Note it first (the finally resolves it whatever comes next), then
            # resolve it now; a cancellation goes on once it is resolved.
            self.frozen_at = sent_at  # if ours, frozen since about then: the window counts it
            self.freeze_unresolved = exc
            await run_to_completion(self._resolve_and_own(exc))
            if isinstance(exc, AgentError):
                if not self.owns_freeze:
                    self._no_freeze(f"the freeze got no reply ({exc}) and did not freeze", exc)
                return
            raise
        self.frozen_at = time.monotonic()
        if n == 0:
            # Invariant 1: a freeze that froze nothing is not ours (another tool may hold a
            # freeze the agent would otherwise thaw on our behalf).
            self._no_freeze("the freeze froze no filesystems (none, or frozen by another tool)")
            return
        self._own_freeze(n)
        if self.filesystems is not None and n < self.filesystems:
            # qemu-ga skips a filesystem that is already frozen (EBUSY) without a word, and its
            # thaw thaws every frozen filesystem: nothing can keep ours from thawing it too.
            self.warnings.append(
                f"the freeze froze {n} of the guest's {self.filesystems} filesystems: the others "
                "may be frozen by another tool in the guest, and qemu-ga's thaw thaws them too"
            )
            log.warning("%s", self.warnings[-1])

    def _own_freeze(self, count: int | None) -> None:
        """Record that this operation froze the guest (``count`` None: a lost reply resolved
        by the status; the thaw's count will tell how many)."""
        self.owns_freeze = True
        self.owner = FreezeOwner.SELF
        self.record.freeze_owner = FreezeOwner.SELF.value
        if count is None:
            self.freeze_resolved = True
        else:
            self.frozen = count
            self.record.frozen = count

    def _no_freeze(self, reason: str, cause: BaseException | None = None) -> None:
        self.reason = reason
        if self.mode is Quiesce.REQUIRED:
            raise self._fail(f"quiesce required but not possible: {reason}", cause)

    async def _resolve_and_own(self, exc: BaseException) -> None:
        """Resolve a freeze that was sent but not answered, and record the answer in this
        same step, so that no cancellation between the two can lose it."""
        if self.freeze_unresolved is None:
            return  # resolved already
        try:
            if await self._resolve_lost_freeze(exc):
                self._own_freeze(None)
        finally:
            self.freeze_unresolved = None

    async def _resolve_lost_freeze(self, exc: BaseException) -> bool:
        """After a freeze with no reply: resync and read the status. True if frozen (ours, since
        it was thawed at preflight). If the status cannot be read at all, the guest may be
        frozen by us: raise ThawError rather than guess."""
        assert self.agent is not None
        deadline = time.monotonic() + self.orch.thaw_timeout
        last: BaseException = exc
        pause = 0.05
        while time.monotonic() < deadline:
            try:
                # Resyncs first: the late freeze reply, if any, is dropped as stale.
                status = await self.agent.fsfreeze_status(timeout=self._attempt_timeout(deadline))
            except AgentError as e:
                last = e
                if not self.agent.is_connected and await self._reconnect_agent() is None:
                    break
                await anyio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(pause * 2, 1.0)
                continue
            log.warning("freeze reply lost; status is %s", status.value)
            return status is FreezeStatus.FROZEN
        raise ThawError(
            f"a freeze got no reply and its outcome cannot be read ({last}): "
            "the guest MAY BE FROZEN; check guest-fsfreeze-status and thaw it",
            self.record,
        ) from last

    async def _transaction(self, budget: float, frozen_at: float | None) -> None:
        actions = [
            {"type": "blockdev-snapshot", "data": {"node": o.node, "overlay": o.node_name}}
            for o in self.overlays
        ]
        timeout = budget if frozen_at is None else frozen_at + budget - time.monotonic()
        if timeout <= 0:
            # Frozen longer than allowed already (a lost freeze reply waited for): no
            # transaction inside this window.
            await self._window_exceeded(None)
            return
        self.transaction_sent = True
        try:
            await self.mon.execute("transaction", {"actions": actions}, timeout=timeout)
        except MonitorTimeout as exc:
            if frozen_at is not None:
                await self._window_exceeded(exc)
                return
            # Nothing of ours is frozen: take the time to find out what QEMU did.
            if await self._transaction_applied():
                self.record.snapshot_taken = True
                return
            raise self._fail(f"the transaction got no answer and was not applied: {exc}", exc) from exc
        except MonitorUnavailable as exc:
            self.record.snapshot_taken = None
            raise self._fail(
                "the connection to QEMU was lost after the transaction was sent: the outcome is "
                "unknown (the VM may run on the overlays or on its original images)",
                exc,
            ) from exc
        except MonitorError as exc:
            raise self._fail(f"the transaction failed: {exc}", exc) from exc
        self.record.snapshot_taken = True

    async def _window_exceeded(self, exc: MonitorTimeout | None) -> None:
        """The transaction did not complete within ``freeze_timeout`` (``exc``), or there was
        no time left to send it (None): thaw now, then find out whether a sent transaction was
        applied (QMP runs commands in order, so a query answers after it)."""
        self.reason = f"the freeze window exceeded freeze_timeout ({self.freeze_timeout:g}s)"
        with self._phase("thaw"):
            await run_to_completion(self._thaw())
        applied = exc is not None and await self._transaction_applied()
        if applied:
            self.record.snapshot_taken = True
            # The snapshot exists but may have been taken after the thaw.
            self.owner = None
            if self.mode is Quiesce.REQUIRED:
                raise self._fail(
                    f"{self.reason}; the snapshot was taken after all but is not guaranteed "
                    "quiesced: the VM now runs on the overlays",
                    exc,
                )
            return
        if self.mode is Quiesce.REQUIRED:
            raise self._fail(f"{self.reason}; no snapshot was taken", exc)
        # preferred: a crash-consistent snapshot, unfrozen.
        self.owner = None
        await self._transaction(self.orch.command_timeout, None)

    async def _transaction_applied(self) -> bool:
        """Whether a transaction whose reply was not seen was applied. QMP runs commands in
        order, so the query is answered after it. Raises SnapshotError (outcome unknown,
        ``record.snapshot_taken`` None) if QEMU cannot tell us."""
        try:
            with anyio.fail_after(self.orch.command_timeout):
                nodes = {n.node_name: n for n in await self.mon.named_block_nodes()}
        except (TimeoutError, MonitorError) as exc:
            self.record.snapshot_taken = None
            raise self._fail(
                "the transaction got no answer and its outcome cannot be read: the VM may run "
                "on the overlays or on its original images",
                exc,
            ) from exc
        # The transaction is atomic: the first overlay tells for all. It was added with
        # backing: null, so it reports a backing file only once blockdev-snapshot attached it.
        # (Not backing_file_depth: with flat=true QEMU reports 0 for every node.)
        ov = nodes.get(self.overlays[0].node_name)
        return ov is not None and ov.backing_file is not None

    async def _thaw(self) -> None:
        """Thaw our freeze: shielded from cancellation, bounded by thaw_timeout, resyncing and
        re-reading the status after a failure. Raises ThawError if it cannot be confirmed."""
        if self.thaw_done:
            return
        self.thaw_done = True
        assert self.agent is not None
        agent = self.agent
        last: BaseException | None = None
        pause = 0.05
        with anyio.CancelScope(shield=True):
            deadline = time.monotonic() + self.orch.thaw_timeout
            while time.monotonic() < deadline:
                try:
                    n = await agent.fsfreeze_thaw(timeout=self._attempt_timeout(deadline))
                    self.thawed_at = time.monotonic()
                    self.thawed = n
                    self.record.thawed = n
                    if self.freeze_resolved:
                        self.frozen = n
                        self.record.frozen = n
                    return
                except AgentError as exc:
                    last = exc
                    log.warning("thaw failed: %s", exc)
                # Did it thaw anyway (a lost reply)? The status decides.
                try:
                    status = await agent.fsfreeze_status(timeout=self._attempt_timeout(deadline))
                    if status is FreezeStatus.THAWED:
                        # The thaw went through; its count was lost with the reply: it thawed
                        # (at least) what we froze.
                        self.thawed_at = time.monotonic()
                        self.thawed = self.record.thawed = self.frozen
                        log.warning("thaw reply lost, but the guest is thawed")
                        return
                except AgentError as exc:
                    last = exc
                if not agent.is_connected:
                    agent = await self._reconnect_agent() or agent
                    if not agent.is_connected:
                        break
                await anyio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(pause * 2, 1.0)
        raise ThawError(
            f"thawing the guest failed ({last}): THE GUEST MAY STILL BE FROZEN; check "
            "guest-fsfreeze-status and thaw it (qmpagent agent fsfreeze thaw)",
            self.record,
        ) from last

    def _attempt_timeout(self, deadline: float) -> float:
        """One thaw or status attempt may take the agent timeout, or half of what is left of
        the thaw budget if that is longer, but leaves time to check and retry."""
        remaining = deadline - time.monotonic()
        return max(0.1, min(remaining, max(self.orch.agent_timeout, remaining / 2)))

    async def _reconnect_agent(self) -> GuestAgent | None:
        address = self.orch._agent_address
        if address is None:
            return None
        # Invariant 2 holds for a reconnect too: never write to a port nobody reads.
        try:
            if not await self.mon.agent_port_open(self.orch.agent_chardev):
                return None
        except (AgentError, MonitorError):
            return None
        with contextlib.suppress(AgentError):
            agent = await GuestAgent.connect(address, timeout=self.orch.agent_timeout)
            if self.own_agent and self.agent is not None:
                await self.agent.close()
            self.agent = agent
            self.own_agent = True
            return agent
        return None

    # --- cleanup --------------------------------------------------------------------------

    async def _cleanup(self, exc: BaseException) -> None:
        """After a failure: detach the overlays and remove their files, unless the snapshot
        was taken (then they are the VM's active layers)."""
        t = time.monotonic()
        try:
            await run_to_completion(self._undo())
        finally:
            self.times["cleanup"] = time.monotonic() - t
        log.info("snapshot failed (%s); record: %s", exc, self.record)

    async def _undo(self) -> None:
        with anyio.CancelScope(shield=True):
            if self.transaction_sent and self.record.snapshot_taken is False:
                # E.g. cancelled while the transaction was in flight: QEMU may have applied it.
                with contextlib.suppress(SnapshotError):
                    self.record.snapshot_taken = await self._transaction_applied()
            if self.record.snapshot_taken is not False:
                return  # the overlays are the VM's active layers now, or may be
            with anyio.move_on_after(self.orch.command_timeout * 2):
                try:
                    existing: set[str] | None = {n.node_name for n in await self.mon.named_block_nodes()}
                except MonitorError as exc:
                    log.warning("cleanup: cannot list the block nodes (%s)", exc)
                    existing = None
                for ov in reversed(self.overlays):
                    await self._remove_overlay(ov, existing)

    async def _remove_overlay(self, ov: _Overlay, existing: set[str] | None) -> None:
        """Detach the overlay's nodes that exist, then remove its file, but only once no node
        of ours can hold it open (``existing``: the node names QEMU has, None if unknown)."""
        t = self.orch.command_timeout
        for added, name in ((ov.node_added, ov.node_name), (ov.file_node_added, ov.file_node_name)):
            if not added or (existing is not None and name not in existing):
                continue  # never sent, or sent and not applied
            if name == ov.node_name and name not in self.record.overlays_added:
                self.record.overlays_added.append(name)  # its reply was lost, but it is there
            try:
                await self.mon.execute("blockdev-del", {"node-name": name}, timeout=t)
            except MonitorError as exc:
                log.warning("cleanup: blockdev-del %s failed: %s", name, exc)
                return  # the file may still be open in QEMU: leave it
            if name == ov.node_name:
                self.record.overlays_removed.append(name)
        if ov.file_created:
            try:
                os.unlink(ov.path)
            except FileNotFoundError:
                return  # the job never made it
            except OSError as exc:
                log.warning("cleanup: cannot remove %s: %s", ov.path, exc)
                return
            if ov.path not in self.record.files_created:
                self.record.files_created.append(ov.path)
            self.record.files_removed.append(ov.path)
