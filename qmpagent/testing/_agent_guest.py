"""The fake agent's guest: what the commands act on, without the agent's protocol.

Filesystems (mount order) frozen by the agent or by another tool in the guest, the agent's own
frozen state (the only one ``guest-fsfreeze-status`` reports), in-memory files for
``guest-file-*``, scripted programs for ``guest-exec``, and the power state a command asked
for. Each command's effect is a method here returning the command's result or raising
:class:`FakeAgentError` with the real agent's error text.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ._agent_profiles import AgentProfile
from ._agent_qapi import FakeAgentError

__all__ = ["ExecProgram", "FakeExecResult", "GuestModel"]

_FILE_MODES: Final = frozenset(
    {"r", "rb", "w", "wb", "a", "ab", "r+", "rb+", "r+b", "w+", "wb+", "w+b", "a+", "ab+", "a+b"}
)
_FILE_READ_DEFAULT: Final = 4096
_FILE_READ_MAX: Final = 48 << 20
_FIRST_HANDLE: Final = 1000
_MAX_OPEN: Final = 1024  # open file handles, and unreaped guest-exec processes
_MAX_FILE_SIZE: Final = 64 << 20  # a file written through guest-file-write
_B64_RE: Final = re.compile(r"[A-Za-z0-9+/=]*\Z")

_DEFAULT_OSINFO: Final[Mapping[str, Any]] = {
    "kernel-release": "6.1.0-13-amd64",
    "kernel-version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.55-1 (2023-09-29)",
    "machine": "x86_64",
    "id": "debian",
    "name": "Debian GNU/Linux",
    "pretty-name": "Debian GNU/Linux 12 (bookworm)",
    "version": "12 (bookworm)",
    "version-id": "12",
}



@dataclass(frozen=True, slots=True)
class FakeExecResult:
    """How a program run with ``guest-exec`` ends (see :meth:`FakeAgent.set_exec_result`).

    Attributes:
        exitcode: the exit status (ignored if ``signal`` is set).
        signal: the signal that killed it, or ``None``.
        stdout: what it writes to stdout (reported only with ``capture-output``).
        stderr: what it writes to stderr (reported only with ``capture-output``).
        polls: how many ``guest-exec-status`` calls answer ``{"exited": false}`` first.
        duration: seconds after ``guest-exec`` before it has exited.
    """

    exitcode: int = 0
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    polls: int = 0
    duration: float = 0.0



#: A program of the fake guest: an :class:`FakeExecResult`, or a function of ``(args, input bytes)``
#: returning one.
ExecProgram = FakeExecResult | Callable[[list[str], bytes], FakeExecResult]



@dataclass(eq=False)
class _OpenFile:
    path: str
    readable: bool
    writable: bool
    append: bool
    position: int = 0
    eof: bool = False


@dataclass(eq=False)
class _Process:
    result: FakeExecResult
    capture: bool
    started: float
    polls_left: int


def _b64decode(text: str) -> bytes:
    if not _B64_RE.match(text):
        raise FakeAgentError("Base64 data contains invalid characters")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        raise FakeAgentError("Base64 data contains invalid characters") from None




class GuestModel:
    """The guest behind a fake agent.

    Args:
        mountpoints: the freezable filesystems, in mount order.
        files: the files for ``guest-file-*`` (path -> content).
        programs: programs for ``guest-exec`` (path -> :data:`ExecProgram`), on top of the
            built-in ``true``, ``false``, ``echo`` and ``cat`` (in ``/bin`` and ``/usr/bin``).
        osinfo: the ``guest-get-osinfo`` result.
        host_name: the ``guest-get-host-name`` result.
        profile: how the agent version words what differs (errors, ``guest-get-fsinfo``).
        on_frozen_change: called with the agent's new frozen state when it changes (the
            agent disables and enables its commands then).
    """

    def __init__(
        self,
        *,
        mountpoints: Sequence[str],
        files: Mapping[str, bytes] | None,
        programs: Mapping[str, ExecProgram] | None,
        osinfo: Mapping[str, Any] | None,
        host_name: str,
        profile: AgentProfile,
        on_frozen_change: Callable[[bool], None],
    ) -> None:
        #: The freezable filesystems, in mount order.
        self.mounts = list(dict.fromkeys(mountpoints))
        #: The files for ``guest-file-*``: path -> content. Change it freely.
        self.files: dict[str, bytes] = dict(files or {})
        #: Programs for ``guest-exec`` set by the test: path -> :data:`ExecProgram`.
        self.programs: dict[str, ExecProgram] = dict(programs or {})
        #: The ``guest-get-osinfo`` result.
        self.osinfo: dict[str, Any] = dict(osinfo if osinfo is not None else _DEFAULT_OSINFO)
        #: The ``guest-get-host-name`` result.
        self.host_name = host_name
        self.profile = profile
        self._on_frozen_change = on_frozen_change
        #: The agent's frozen state: what ``guest-fsfreeze-status`` reports.
        self.frozen = False
        self._owner: dict[str, str] = {}  # mountpoint -> "agent" | "foreign"
        self._freeze_errors: dict[str, str] = {}
        self._handles: dict[int, _OpenFile] = {}
        self._next_handle = _FIRST_HANDLE
        self._processes: dict[int, _Process] = {}
        self._next_pid = 1000
        #: Filesystems frozen by the agent's freeze commands, added up.
        self.total_frozen = 0
        #: Filesystems thawed by the agent's thaw command (and failed freezes), added up.
        self.total_thawed = 0
        #: The suspend mode while suspended (``"disk"``, ``"ram"``, ``"hybrid"``), else ``None``.
        self.suspended: str | None = None
        #: The mode of a ``guest-shutdown`` that succeeded, until the agent acts on it.
        self.pending_shutdown: str | None = None

    @property
    def frozen_mountpoints(self) -> list[str]:
        """Mountpoints frozen now, by the agent or by another tool, in mount order."""
        return [mp for mp in self.mounts if mp in self._owner]

    @property
    def foreign_frozen(self) -> list[str]:
        """Mountpoints frozen now by another tool in the guest."""
        return [mp for mp in self.mounts if self._owner.get(mp) == "foreign"]

    def _set_frozen_state(self, frozen: bool) -> None:
        # ga_set_frozen() / ga_unset_frozen(): the agent's command table follows
        if frozen == self.frozen:
            return
        self.frozen = frozen
        self._on_frozen_change(frozen)

    def suspend(self, mode: str) -> None:
        """``guest-suspend-<mode>``: the guest sleeps until woken."""
        self.suspended = mode

    def set_frozen(self, frozen: bool = True) -> None:
        """As if frozen (or thawed) through the agent by someone else (``FakeAgent.set_frozen``)."""
        if frozen:
            for mp in self.mounts:
                self._owner.setdefault(mp, "agent")
            self._set_frozen_state(True)
        else:
            for mp in [m for m, owner in self._owner.items() if owner == "agent"]:
                del self._owner[mp]
            self._set_frozen_state(False)

    def freeze_foreign(self, mountpoint: str) -> None:
        """``fsfreeze -f`` in the guest: unknown to the agent (``FakeAgent.freeze_foreign``).

        Raises:
            ValueError: not a mountpoint.
        """
        self._check_mountpoint(mountpoint)
        self._owner.setdefault(mountpoint, "foreign")

    def thaw_foreign(self, mountpoint: str) -> None:
        """``fsfreeze -u`` in the guest, whoever froze it (``FakeAgent.thaw_foreign``).

        Raises:
            ValueError: not a mountpoint.
        """
        self._check_mountpoint(mountpoint)
        self._owner.pop(mountpoint, None)

    def set_freeze_error(self, mountpoint: str, strerror: str | None = "Input/output error") -> None:
        """Make freezing ``mountpoint`` fail with ``strerror`` (``None``: work again).

        Raises:
            ValueError: not a mountpoint.
        """
        self._check_mountpoint(mountpoint)
        if strerror is None:
            self._freeze_errors.pop(mountpoint, None)
        else:
            self._freeze_errors[mountpoint] = strerror

    def _check_mountpoint(self, mountpoint: str) -> None:
        if mountpoint not in self.mounts:
            raise ValueError(f"{mountpoint!r} is not a mountpoint of this fake guest")

    def freeze(self, only: list[str] | None) -> int:
        """``guest-fsfreeze-freeze`` (``only``: ``-list``): the filesystems it froze, counted."""
        self._set_frozen_state(True)
        count = 0
        try:
            for mp in reversed(self.mounts):
                if only is not None and mp not in only:
                    continue
                error = self._freeze_errors.get(mp)
                if error is not None:
                    raise FakeAgentError(f"failed to freeze {mp}: {error}")
                if mp in self._owner:
                    continue  # EBUSY: frozen already, ignored and not counted
                self._owner[mp] = "agent"
                count += 1
        except FakeAgentError:
            self.total_frozen += count
            self.thaw()
            raise
        self.total_frozen += count
        if count == 0:
            self._set_frozen_state(False)
        return count

    def thaw(self) -> int:
        """``guest-fsfreeze-thaw``: thaw every filesystem, whoever froze it; how many."""
        count = 0
        for mp in self.mounts:
            if self._owner.pop(mp, None) is not None:
                count += 1
        self._set_frozen_state(False)
        self.total_thawed += count
        return count

    def fsinfo(self, arguments: dict[str, Any]) -> Any:
        """The ``guest-get-fsinfo`` result, one entry per filesystem."""
        # 10.0 adds the size including the blocks reserved for root (5% of ext4's 50 MiB here).
        privileged = {"total-bytes-privileged": 57381888} if self.profile.fsinfo_privileged else {}
        return [
            {
                "name": f"vd{chr(ord('a') + i)}" if i < 26 else f"vd{i}",
                "mountpoint": mp,
                "type": "ext4",
                "used-bytes": 23552,
                "total-bytes": 52685824,
                **privileged,
                "disk": [
                    {
                        "pci-controller": {"domain": 0, "bus": 0, "slot": 2 + i, "function": 0},
                        "bus-type": "virtio",
                        "bus": 0,
                        "target": 0,
                        "unit": 0,
                        "dev": f"/dev/vd{chr(ord('a') + i)}" if i < 26 else f"/dev/vd{i}",
                    }
                ],
            }
            for i, mp in enumerate(self.mounts)
        ]

    def shutdown(self, arguments: dict[str, Any]) -> Any:
        """``guest-shutdown``: check the mode; the agent acts on it after the command."""
        mode = arguments.get("mode", "powerdown")
        if mode not in ("powerdown", "halt", "reboot"):
            # sic: qemu-ga 7.2's message lacks the closing parenthesis
            raise FakeAgentError("mode is invalid (valid values are: halt|powerdown|reboot")
        self.pending_shutdown = mode
        return None

    def _find_program(self, path: str) -> ExecProgram | None:
        candidates = [path] if "/" in path else [f"/usr/bin/{path}", f"/bin/{path}", path]
        for candidate in candidates:
            if candidate in self.programs:
                return self.programs[candidate]
        for candidate in candidates:
            base = candidate.rsplit("/", 1)[-1]
            if candidate in (f"/bin/{base}", f"/usr/bin/{base}"):
                builtin = _BUILTIN_PROGRAMS.get(base)
                if builtin is not None:
                    return builtin
        return None

    def exec(self, arguments: dict[str, Any]) -> Any:
        """``guest-exec``: start a scripted program; its pid."""
        path = arguments["path"]
        stdin = _b64decode(arguments["input-data"]) if "input-data" in arguments else b""
        program = self._find_program(path)
        if len(self._processes) >= _MAX_OPEN:
            raise FakeAgentError(
                self.profile.glib_error("Failed to fork (Resource temporarily unavailable)")
            )
        if program is None:
            raise FakeAgentError(self.profile.glib_error(
                f"Failed to execute child process \u201c{path}\u201d (No such file or directory)"
            ))
        result = program if isinstance(program, FakeExecResult) else program(
            list(arguments.get("arg", [])), stdin
        )
        pid = self._next_pid
        self._next_pid += 1
        self._processes[pid] = _Process(
            result, bool(arguments.get("capture-output", False)), time.monotonic(), result.polls
        )
        return {"pid": pid}

    def exec_status(self, arguments: dict[str, Any]) -> Any:
        """``guest-exec-status``: running, or how the program ended (reaped then)."""
        pid = arguments["pid"]
        process = self._processes.get(pid)
        if process is None:
            raise FakeAgentError("Invalid parameter 'pid'")
        result = process.result
        if process.polls_left > 0 or time.monotonic() < process.started + result.duration:
            process.polls_left = max(0, process.polls_left - 1)
            return {"exited": False}
        del self._processes[pid]
        status: dict[str, Any] = {"exited": True}
        if result.signal is not None:
            status["signal"] = result.signal
        else:
            status["exitcode"] = result.exitcode
        if process.capture and result.stdout:
            status["out-data"] = base64.b64encode(result.stdout).decode()
            status["out-truncated"] = False
        if process.capture and result.stderr:
            status["err-data"] = base64.b64encode(result.stderr).decode()
            status["err-truncated"] = False
        return status

    def file_open(self, arguments: dict[str, Any]) -> Any:
        """``guest-file-open``: a new handle."""
        path = arguments["path"]
        mode = arguments.get("mode", "r")
        if mode not in _FILE_MODES:
            raise FakeAgentError(f"invalid file open mode '{mode}'")
        plus = "+" in mode
        if len(self._handles) >= _MAX_OPEN:
            raise FakeAgentError(
                f"failed to open file '{path}' (mode: '{mode}'): Too many open files"
            )
        if mode[0] == "r" and path not in self.files:
            raise FakeAgentError(
                f"failed to open file '{path}' (mode: '{mode}'): No such file or directory"
            )
        if mode[0] == "w":
            self.files[path] = b""
        elif mode[0] == "a":
            self.files.setdefault(path, b"")
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = _OpenFile(
            path, readable=mode[0] == "r" or plus, writable=mode[0] != "r" or plus,
            append=mode[0] == "a",
        )
        return handle

    def _open_file(self, handle: int) -> _OpenFile:
        open_file = self._handles.get(handle)
        if open_file is None:
            raise FakeAgentError(f"handle '{handle}' has not been found")
        return open_file

    def file_read(self, arguments: dict[str, Any]) -> Any:
        """``guest-file-read`` at the handle's position."""
        open_file = self._open_file(arguments["handle"])
        count = arguments.get("count", _FILE_READ_DEFAULT)
        if count < 0 or count > _FILE_READ_MAX:
            raise FakeAgentError(f"value '{count}' is invalid for argument count")
        if not open_file.readable:
            raise FakeAgentError("failed to read file: Bad file descriptor")
        content = self.files.get(open_file.path, b"")
        data = content[open_file.position : open_file.position + count]
        open_file.position += len(data)
        if len(data) < count:
            open_file.eof = True
        return {
            "count": len(data),
            "buf-b64": base64.b64encode(data).decode(),
            "eof": open_file.eof,
        }

    def file_write(self, arguments: dict[str, Any]) -> Any:
        """``guest-file-write`` at the handle's position (or the end, appending)."""
        open_file = self._open_file(arguments["handle"])
        data = _b64decode(arguments["buf-b64"])
        count = arguments.get("count", len(data))
        if count < 0 or count > len(data):
            raise FakeAgentError(f"value '{count}' is invalid for argument count")
        if not open_file.writable:
            raise FakeAgentError("failed to write to file: Bad file descriptor")
        content = self.files.get(open_file.path, b"")
        position = len(content) if open_file.append else open_file.position
        if max(position + count, len(content)) > _MAX_FILE_SIZE:
            raise FakeAgentError("failed to write to file: No space left on device")
        content = content[:position].ljust(position, b"\x00") + data[:count] + content[
            position + count :
        ]
        self.files[open_file.path] = content
        open_file.position = position + count
        return {"count": count, "eof": False}

    def file_close(self, arguments: dict[str, Any]) -> Any:
        """``guest-file-close``."""
        handle = arguments["handle"]
        self._open_file(handle)
        del self._handles[handle]
        return None


def _echo(args: list[str], stdin: bytes) -> FakeExecResult:
    return FakeExecResult(stdout=(" ".join(args) + "\n").encode())


def _cat(args: list[str], stdin: bytes) -> FakeExecResult:
    return FakeExecResult(stdout=stdin)


_BUILTIN_PROGRAMS: Final[Mapping[str, ExecProgram]] = {
    "true": FakeExecResult(),
    "false": FakeExecResult(exitcode=1),
    "echo": _echo,
    "cat": _cat,
}
