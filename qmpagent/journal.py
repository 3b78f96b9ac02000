"""The durable journal of snapshot operations: what a dead operation left behind.

One file per operation, ``op-<id>.json`` in the journal directory (default
``$XDG_STATE_HOME/qmpagent``, else ``~/.local/state/qmpagent``), rewritten durably (write a
temporary file, fsync it, rename it over the old one, fsync the directory) *before* each step
it announces:

* ``prepare``: the overlay files and nodes about to be created (names and paths);
* ``freeze``: our freeze request is about to be written (the guest may be frozen by us from
  now on);
* ``settled``: the freeze is over (thawed, or it froze nothing of ours); what is left is
  QEMU's state, which recovery reads from QEMU itself.

When the operation is finished (succeeded, or failed and cleaned up) the file is removed: a
finished operation leaves nothing behind. Nothing is written inside the freeze window (a
durable write costs ~0.7 ms): whether the transaction was applied is asked of QEMU at recovery
(an overlay added with ``backing: null`` has a backing file only once ``blockdev-snapshot``
attached it), and whether our freeze is still in place is asked of the agent.

The freeze guard (:mod:`qmpagent.guard`) writes a second, small file ``op-<id>.guard.json``
when it thawed (or found nothing to thaw) after the orchestrator died or got stuck: one writer
per file.

A file that is torn or foreign (not ours, another format version, wrong types) is a
:class:`~qmpagent.JournalError` naming it: it is reported, never acted on and never removed.
Each entry names its VM (the QMP socket's peer address, QEMU's pid and process start time when
the socket is a unix socket, ``query-name``, ``query-uuid``) and its owner (the orchestrator's
pid and process start time), so that recovery never touches another VM's entry, nor one whose
operation is still running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .durable import fsync_path, write_durably
from .errors import JournalError, MonitorError

if TYPE_CHECKING:
    from .monitor import Monitor

__all__ = [
    "FORMAT",
    "GUARD_FORMAT",
    "VERSION",
    "Entry",
    "GuardRecord",
    "Journal",
    "OverlayRecord",
    "VMIdentity",
    "default_journal_dir",
    "identify_vm",
    "process_alive",
    "process_start_time",
]

FORMAT: Final = "qmpagent-journal"
GUARD_FORMAT: Final = "qmpagent-guard"
VERSION: Final = 1
#: A journal file larger than this is not ours (an entry of 8 disks is ~3 KiB).
MAX_FILE_SIZE: Final = 256 * 1024
#: At most this many files are read from the directory in one scan.
MAX_FILES: Final = 4096

_ENTRY_RE: Final = re.compile(r"^op-([0-9a-f]{16})\.json$")
_GUARD_RE: Final = re.compile(r"^op-([0-9a-f]{16})\.guard\.json$")
_TMP_RE: Final = re.compile(r"^\.op-[0-9a-f]{16}(\.guard)?\.json\.(\d+)\.[0-9a-f]+\.tmp$")

#: The steps of an entry, in order.
STEPS: Final = ("prepare", "freeze", "settled")


def default_journal_dir() -> Path:
    """``$XDG_STATE_HOME/qmpagent``, or ``~/.local/state/qmpagent``."""
    base = os.environ.get("XDG_STATE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "qmpagent"


def new_op_id() -> str:
    """A fresh operation id: 16 hex digits."""
    return secrets.token_hex(8)


# --- processes ---------------------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, ``/proc/PID/stat`` field 22),
    or None if it does not exist or cannot be read. With the pid, it names one process for
    good: a pid reused later has another start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces and parentheses.
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return int(rest[19])  # field 22, counted from field 3
    except (IndexError, ValueError):
        return None


def process_alive(pid: int | None, start: int | None) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs (a zombie counts as
    dead)."""
    if pid is None or pid <= 0:
        return False
    now = process_start_time(pid)
    if now is None or (start is not None and now != start):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return False
    return state not in (b"Z", b"X")


# --- the VM ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VMIdentity:
    """What names a VM in the journal.

    Attributes:
        qmp: the QMP socket's peer address (a unix path, or ``host:port``), or None.
        pid: QEMU's pid (from the unix socket's peer credentials), or None.
        pid_start: QEMU's process start time (see :func:`process_start_time`), or None.
        name: ``query-name``'s name, or None.
        uuid: ``query-uuid``'s UUID, or None.
    """

    qmp: str | None = None
    pid: int | None = None
    pid_start: int | None = None
    name: str | None = None
    uuid: str | None = None

    def matches(self, other: VMIdentity) -> bool:
        """Whether ``other`` is the same VM: the same QMP address, name and UUID, and the same
        QEMU process (pid and start time) when both know it (a QEMU restarted on the same
        socket is another VM)."""
        if self.name != other.name or self.uuid != other.uuid:
            return False
        if self.pid is not None and other.pid is not None:
            if self.pid != other.pid:
                return False
            if self.pid_start is not None and other.pid_start is not None \
                    and self.pid_start != other.pid_start:
                return False
        return self.qmp is not None and self.qmp == other.qmp

    def to_json(self) -> dict[str, Any]:
        return {"qmp": self.qmp, "pid": self.pid, "pid_start": self.pid_start,
                "name": self.name, "uuid": self.uuid}

    @classmethod
    def from_json(cls, raw: object) -> VMIdentity:
        if not isinstance(raw, dict):
            raise ValueError("vm is not an object")
        return cls(
            qmp=_opt(raw, "qmp", str),
            pid=_opt(raw, "pid", int),
            pid_start=_opt(raw, "pid_start", int),
            name=_opt(raw, "name", str),
            uuid=_opt(raw, "uuid", str),
        )

    def describe(self) -> str:
        parts = [f"qmp {self.qmp}" if self.qmp else "qmp ?"]
        if self.pid is not None:
            parts.append(f"pid {self.pid}")
        if self.name:
            parts.append(f"name {self.name}")
        return ", ".join(parts)


def _peer(mon: Monitor) -> tuple[str | None, int | None]:
    """The QMP socket's peer address and, for a unix socket, the peer's pid (QEMU's)."""
    writer = getattr(getattr(mon, "client", None), "_writer", None)
    if writer is None:
        return None, None
    sock = writer.get_extra_info("socket")
    peer = writer.get_extra_info("peername")
    qmp: str | None = None
    if isinstance(peer, str) and peer:
        qmp = os.path.realpath(peer) if os.path.isabs(peer) else peer
    elif isinstance(peer, bytes) and peer:
        qmp = os.fsdecode(peer)
    elif isinstance(peer, tuple) and len(peer) >= 2:
        qmp = f"{peer[0]}:{peer[1]}"
    pid: int | None = None
    if sock is not None and getattr(sock, "family", None) == socket.AF_UNIX:
        with contextlib.suppress(OSError, AttributeError, struct.error):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0] or None
    return qmp, pid


async def identify_vm(mon: Monitor, *, timeout: float = 10.0) -> VMIdentity:
    """The :class:`VMIdentity` of the VM behind ``mon`` (queries QEMU; a command QEMU does
    not know leaves its member None).

    Raises:
        MonitorUnavailable: the connection is lost (other MonitorErrors are ignored).
    """
    from .errors import MonitorUnavailable

    qmp, pid = _peer(mon)
    name = uuid = None
    try:
        got = await mon.execute("query-name", timeout=timeout)
        if isinstance(got, dict) and isinstance(got.get("name"), str):
            name = got["name"]
    except MonitorUnavailable:
        raise
    except MonitorError:
        pass
    try:
        got = await mon.execute("query-uuid", timeout=timeout)
        if isinstance(got, dict) and isinstance(got.get("UUID"), str):
            uuid = got["UUID"]
    except MonitorUnavailable:
        raise
    except MonitorError:
        pass
    return VMIdentity(qmp=qmp, pid=pid, pid_start=None if pid is None else process_start_time(pid),
                      name=name, uuid=uuid)


# --- entries -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OverlayRecord:
    """One overlay an operation creates: the disk's node, the overlay's qcow2 node and file
    node, and its file."""

    disk: str
    node: str
    file_node: str
    path: str

    def job_ids(self) -> tuple[str, str]:
        """The ids of the two ``blockdev-create`` jobs that make it."""
        return (f"{self.node}-cf", f"{self.node}-cq")


@dataclass
class Entry:
    """One operation's journal entry (see the module docstring).

    Attributes:
        op: the operation id.
        vm: the VM it works on.
        owner_pid, owner_start: the orchestrator's process (pid and start time).
        step: ``"prepare"``, ``"freeze"`` or ``"settled"``.
        overlays: the overlays it creates.
        freeze: the freeze state when the entry was written (a ``FreezeState`` value).
        transaction: the transaction state when the entry was written.
        kind: ``"snapshot"``, or ``"commit"`` (then ``overlays`` are the nodes the commit
            merges, top first, removed once it pivoted, and ``commit`` says the rest).
        commit: a commit's job id, device, base node and whether the merged files are deleted
            (``{"job": ..., "device": ..., "base": ..., "delete_files": ...}``), else None.
        backup: a backup's (``kind`` ``"backup"``; ``overlays`` are its targets) bitmap, state
            directory and, per target, its disk's image file and copy job
            (``{"bitmap": ..., "state_dir": ..., "targets": [{"node": ..., "disk_file": ...,
            "job": ...}]}``, see :mod:`qmpagent.backup`), else None.
        created, updated: wall-clock times (seconds since the epoch).
        path: the file it was read from (None before it was written).
    """

    op: str
    vm: VMIdentity
    owner_pid: int
    owner_start: int | None
    step: str = "prepare"
    overlays: list[OverlayRecord] = field(default_factory=list)
    freeze: str = "not-tried"
    transaction: str = "not-sent"
    kind: str = "snapshot"
    commit: dict[str, Any] | None = None
    backup: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    path: Path | None = None

    @property
    def owner_alive(self) -> bool:
        """Whether the operation's process still runs."""
        return process_alive(self.owner_pid, self.owner_start)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "op": self.op,
            "kind": self.kind,
            "vm": self.vm.to_json(),
            "owner": {"pid": self.owner_pid, "start": self.owner_start},
            "step": self.step,
            "freeze": self.freeze,
            "transaction": self.transaction,
            "overlays": [
                {"disk": o.disk, "node": o.node, "file_node": o.file_node, "path": o.path}
                for o in self.overlays
            ],
            **({"commit": dict(self.commit)} if self.commit is not None else {}),
            **({"backup": dict(self.backup)} if self.backup is not None else {}),
            "created": self.created,
            "updated": self.updated,
        }

    @classmethod
    def from_json(cls, raw: object, path: Path) -> Entry:
        """Parse an entry; ValueError for anything that is not a valid entry of ours."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError("not a qmpagent journal entry")
        if raw.get("version") != VERSION:
            raise ValueError(f"journal format version {raw.get('version')!r} is not {VERSION}")
        owner = raw.get("owner")
        if not isinstance(owner, dict):
            raise ValueError("owner is not an object")
        overlays_raw = raw.get("overlays")
        if not isinstance(overlays_raw, list):
            raise ValueError("overlays is not a list")
        overlays = []
        for o in overlays_raw:
            if not isinstance(o, dict):
                raise ValueError("an overlay is not an object")
            overlays.append(OverlayRecord(
                disk=_req(o, "disk", str), node=_req(o, "node", str),
                file_node=_req(o, "file_node", str), path=_req(o, "path", str),
            ))
        step = _req(raw, "step", str)
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}")
        commit = raw.get("commit")
        if commit is not None:
            if not isinstance(commit, dict):
                raise ValueError("commit is not an object")
            for key, kinds in (("job", str), ("device", str), ("base", str), ("delete_files", bool)):
                if not isinstance(commit.get(key), kinds):
                    raise ValueError(f"commit.{key} is missing or of the wrong type")
        backup = raw.get("backup")
        if backup is not None:
            if not isinstance(backup, dict) or not isinstance(backup.get("state_dir"), str):
                raise ValueError("backup is not an object with a state_dir")
            if not isinstance(backup.get("bitmap"), (str, type(None))):
                raise ValueError("backup.bitmap is of the wrong type")
            targets = backup.get("targets")
            if not isinstance(targets, list) or not all(
                isinstance(t, dict) and all(isinstance(t.get(k), str) for k in ("node", "disk_file", "job"))
                for t in targets
            ):
                raise ValueError("backup.targets is missing or of the wrong type")
        op = _req(raw, "op", str)
        if not re.fullmatch(r"[0-9a-f]{16}", op) or path.name != f"op-{op}.json":
            raise ValueError("the op id does not match the file name")
        return cls(
            op=op,
            vm=VMIdentity.from_json(raw.get("vm")),
            owner_pid=_req(owner, "pid", int),
            owner_start=_opt(owner, "start", int),
            step=step,
            overlays=overlays,
            freeze=_req(raw, "freeze", str),
            transaction=_req(raw, "transaction", str),
            kind=_req(raw, "kind", str),
            commit=commit,
            backup=backup,
            created=float(_req(raw, "created", (int, float))),
            updated=float(_req(raw, "updated", (int, float))),
            path=path,
        )


@dataclass(frozen=True)
class GuardRecord:
    """What the freeze guard did after the orchestrator died or got stuck.

    Attributes:
        op: the operation id.
        result: ``"thawed"`` (it thawed ``thawed`` filesystems), ``"not-frozen"`` (the guest
            was not frozen: nothing to thaw) or ``"failed"`` (``detail`` says why).
        thawed: filesystems thawed.
        reason: why it acted (``"orchestrator died"``, ``"deadline"``).
        detail: more text.
    """

    op: str
    result: str
    thawed: int = 0
    reason: str = ""
    detail: str = ""
    at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"format": GUARD_FORMAT, "version": VERSION, "op": self.op, "result": self.result,
                "thawed": self.thawed, "reason": self.reason, "detail": self.detail, "at": self.at}

    @classmethod
    def from_json(cls, raw: object, path: Path) -> GuardRecord:
        if not isinstance(raw, dict) or raw.get("format") != GUARD_FORMAT:
            raise ValueError("not a qmpagent guard record")
        if raw.get("version") != VERSION:
            raise ValueError(f"guard record version {raw.get('version')!r} is not {VERSION}")
        op = _req(raw, "op", str)
        if path.name != f"op-{op}.guard.json":
            raise ValueError("the op id does not match the file name")
        result = _req(raw, "result", str)
        if result not in ("thawed", "not-frozen", "failed"):
            raise ValueError(f"unknown guard result {result!r}")
        return cls(op=op, result=result, thawed=_req(raw, "thawed", int),
                   reason=_req(raw, "reason", str), detail=_req(raw, "detail", str),
                   at=float(_req(raw, "at", (int, float))))


def _req(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{key} is missing or of the wrong type")
    return value


def _opt(raw: Mapping[str, Any], key: str, kind: type) -> Any:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{key} is of the wrong type")
    return value


# --- the directory -----------------------------------------------------------------------------


class Journal:
    """The journal directory (see the module docstring).

    Args:
        directory: where the entries live (None: :func:`default_journal_dir`). Made (mode
            0700) on the first write.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_journal_dir()

    def __repr__(self) -> str:
        return f"<Journal {self.directory}>"

    def entry_path(self, op: str) -> Path:
        return self.directory / f"op-{op}.json"

    def guard_path(self, op: str) -> Path:
        return self.directory / f"op-{op}.guard.json"

    def _ensure_dir(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create the journal directory: {exc}", str(self.directory)) from exc

    def write(self, entry: Entry) -> None:
        """Write ``entry`` durably (before the step it announces is taken).

        Raises:
            JournalError: the directory cannot be written.
        """
        self._ensure_dir()
        entry.updated = time.time()
        data = json.dumps(entry.to_json(), separators=(",", ":")).encode() + b"\n"
        path = self.entry_path(entry.op)
        try:
            write_durably(self.directory, path.name, data)
        except OSError as exc:
            raise JournalError(f"cannot write the journal entry: {exc}", str(path)) from exc
        entry.path = path

    def write_guard(self, record: GuardRecord) -> None:
        """Write the guard's record durably. Raises JournalError."""
        self._ensure_dir()
        path = self.guard_path(record.op)
        data = json.dumps(record.to_json(), separators=(",", ":")).encode() + b"\n"
        try:
            write_durably(self.directory, path.name, data)
        except OSError as exc:
            raise JournalError(f"cannot write the guard record: {exc}", str(path)) from exc

    def remove(self, op: str) -> None:
        """Remove an operation's files (entry and guard record) durably: it is finished.

        Raises:
            JournalError: a file exists and cannot be removed.
        """
        removed = False
        for path in (self.guard_path(op), self.entry_path(op)):
            try:
                os.unlink(path)
                removed = True
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise JournalError(f"cannot remove the journal file: {exc}", str(path)) from exc
        if removed:
            with contextlib.suppress(OSError):
                fsync_path(self.directory, directory=True)

    def _read(self, path: Path) -> object:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise JournalError(f"cannot open the journal file: {exc}", str(path)) from exc
        try:
            st = os.fstat(fd)
            import stat as _stat

            if not _stat.S_ISREG(st.st_mode):
                raise JournalError("not a regular file: not a journal file of ours", str(path))
            data = os.read(fd, MAX_FILE_SIZE + 1)
        except OSError as exc:
            raise JournalError(f"cannot read the journal file: {exc}", str(path)) from exc
        finally:
            os.close(fd)
        if len(data) > MAX_FILE_SIZE:
            raise JournalError(f"larger than {MAX_FILE_SIZE} bytes: not a journal file of ours",
                               str(path))
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise JournalError(f"torn or not JSON ({exc}): left alone", str(path)) from None

    def read_entry(self, path: Path) -> Entry:
        """Read one entry. Raises JournalError (torn, foreign, unreadable)."""
        raw = self._read(path)
        try:
            return Entry.from_json(raw, path)
        except (ValueError, TypeError) as exc:
            raise JournalError(f"not a valid journal entry ({exc}): left alone", str(path)) from None

    def guard_record(self, op: str) -> GuardRecord | None:
        """The guard's record of ``op``, or None. Raises JournalError (torn, foreign)."""
        path = self.guard_path(op)
        if not path.exists():
            return None
        raw = self._read(path)
        try:
            return GuardRecord.from_json(raw, path)
        except (ValueError, TypeError) as exc:
            raise JournalError(f"not a valid guard record ({exc}): left alone", str(path)) from None

    def scan(self) -> Iterator[Entry | JournalError]:
        """Every entry in the directory, and a JournalError for every file that is not a valid
        entry of ours (guard records of a listed entry and temporary files are not listed;
        stale temporary files of dead processes are removed)."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return
        except OSError as exc:
            yield JournalError(f"cannot list the journal directory: {exc}", str(self.directory))
            return
        entries = {m.group(1) for n in names if (m := _ENTRY_RE.match(n))}
        for count, name in enumerate(names):
            if count >= MAX_FILES:
                yield JournalError(f"more than {MAX_FILES} files: the rest were not read",
                                   str(self.directory))
                return
            path = self.directory / name
            if _ENTRY_RE.match(name):
                try:
                    yield self.read_entry(path)
                except JournalError as exc:
                    yield exc
                continue
            guard = _GUARD_RE.match(name)
            if guard and guard.group(1) in entries:
                continue
            tmp = _TMP_RE.match(name)
            if tmp:
                if not process_alive(int(tmp.group(2)), None):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                continue
            if guard:
                yield JournalError("a guard record without its entry: left alone", str(path))
                continue
            yield JournalError("not a journal file of qmpagent: left alone", str(path))
