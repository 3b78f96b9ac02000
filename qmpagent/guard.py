"""The freeze guard: a small process that thaws the guest if the orchestrator dies or gets
stuck while a freeze of ours may be in place (issue 13; docs/design.md section 2.1).

How it works (the orchestrator's side is :class:`FreezeGuard`, the guard's is
:mod:`qmpagent._guard_main`):

* Started before the freeze, outside the window (``sys.executable -I -S -c BOOT``: the
  :mod:`qmpagent._guard_main` entry without importing the whole package), in its own session,
  so that a signal to the orchestrator's process group does not reach it,
  with three file descriptors: a ``SOCK_SEQPACKET`` control socket (the other end stays in the
  orchestrator only: its EOF means the orchestrator's process is gone), a duplicate of the
  orchestrator's connected agent socket, and a lock (a ``memfd`` the guard re-opens, so each
  side has its own open file description for ``flock``).
* The orchestrator sends ``arm <deadline>`` right before it writes its freeze (the deadline is
  ``freeze_timeout`` from then, on ``CLOCK_MONOTONIC``, which both processes share) and
  ``disarm`` once nothing of ours is frozen (the freeze froze nothing, or it was thawed).
  Sending a message is one non-blocking ``send``: nothing is awaited inside the window.
* The guard reads the agent socket only when it acts: when the control socket reaches EOF
  while armed (the orchestrator died), or when the deadline plus :data:`GRACE` has passed
  while armed (the orchestrator is alive but its loop did not thaw in time). It then takes the
  lock, re-reads the control socket (a ``disarm`` sent meanwhile wins), announces
  ``took-over``, resyncs the channel (0xFF + ``guest-sync-delimited`` with a fresh random id,
  so a request the orchestrator left half-written is flushed), reads
  ``guest-fsfreeze-status``, and thaws **only if the status says frozen** (the orchestrator
  armed it only after its preflight saw ``thawed``, so a frozen status is our freeze, or one
  that may be ours; a freeze that froze nothing is disarmed, and a freeze of someone else's at
  preflight is never armed). It writes its journal record, reports ``result ...`` and exits.
* The orchestrator holds the lock around each agent command it sends after ``arm`` other than
  the freeze itself (resolving a lost reply, the thaw): so only one process ever reads the
  agent socket at a time. If the lock is taken, or the guard has announced ``took-over``, the
  orchestrator does not touch the agent again and waits for the guard's result.
* The guard exits on ``done``, on EOF when not armed, and after it has acted: it never lingers.

This module is imported by the orchestrator; it does no I/O at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio

from ._guard_wire import BOOT, GRACE
from ._shield import run_to_completion

__all__ = ["GRACE", "FreezeGuard", "GuardResult"]

log = logging.getLogger(__name__)

_MSG_MAX: Final = 4096


@dataclass(frozen=True)
class GuardResult:
    """What the guard reported after it took over: ``result`` is ``"thawed"`` (``thawed``
    filesystems), ``"not-frozen"`` or ``"failed"`` (``detail`` says why)."""

    result: str
    thawed: int = 0
    reason: str = ""
    detail: str = ""


def _package_dir() -> str:
    return str(Path(__file__).resolve().parent)


class FreezeGuard:
    """The orchestrator's handle on its guard process (see the module docstring).

    Use: :meth:`start` (outside the window), :meth:`wait_ready`, :meth:`arm` right before the
    freeze is written, :meth:`turn` around the agent commands after that, :meth:`disarm`
    when nothing of ours is frozen, :meth:`close` at the end (always).
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self._lock_fd: int | None = None
        self.armed = False
        self.ready = False
        #: Why the guard is not (or no longer) protecting the freeze, if it is not.
        self.lost: str | None = None
        self.took_over: str | None = None
        self.result: GuardResult | None = None
        self.started_at = 0.0

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, agent_fd: int, op: str, journal_dir: Path, *, thaw_timeout: float) -> None:
        """Start the guard process (fork + exec of ``sys.executable -m qmpagent._guard_main``).

        Raises:
            OSError: it cannot be started.
        """
        self.started_at = time.monotonic()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        lock_fd = -1
        try:
            lock_fd = os.memfd_create("qmpagent-guard-lock", os.MFD_CLOEXEC)
            fds = (theirs.fileno(), agent_fd, lock_fd)
            argv = [
                sys.executable, "-I", "-S", "-c", BOOT, _package_dir(),
                "--control-fd", str(theirs.fileno()),
                "--agent-fd", str(agent_fd),
                "--lock-fd", str(lock_fd),
                "--op", op,
                "--journal", str(journal_dir),
                "--thaw-timeout", repr(float(thaw_timeout)),
                "--parent", str(os.getpid()),
            ]
            self.proc = subprocess.Popen(
                argv, pass_fds=fds, start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            if lock_fd >= 0:
                os.close(lock_fd)
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self._lock_fd = lock_fd

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        """Whether the guard process runs."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def protecting(self) -> bool:
        """Whether the guard is up and can act for us."""
        return self.ready and self.lost is None and self.alive

    async def wait_ready(self, *, timeout: float) -> bool:
        """Wait until the guard says it is ready (it imported, opened its lock). False (and
        :attr:`lost` says why) if it did not in time or died."""
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(timeout):
                data = await loop.sock_recv(self.sock, _MSG_MAX)
        except TimeoutError:
            self.lost = f"the freeze guard did not start within {timeout:g}s"
            return False
        except OSError as exc:
            self.lost = f"the freeze guard's control socket failed: {exc}"
            return False
        if data != b"ready":
            self.lost = (
                "the freeze guard exited at start-up" if not data else f"bad guard message {data!r:.80}"
            )
            return False
        self.ready = True
        log.debug("freeze guard ready (pid %s) in %.3fs", self.pid, time.monotonic() - self.started_at)
        return True

    def _send(self, msg: bytes) -> bool:
        if self.sock is None or self.lost is not None:
            return False
        try:
            self.sock.send(msg, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        except OSError as exc:
            self.lost = f"the freeze guard is gone ({exc})"
            return False
        return True

    def arm(self, deadline: float) -> bool:
        """The freeze is about to be written; thaw at ``deadline`` (+ grace) unless disarmed.
        One non-blocking send. False if the guard is gone."""
        if not self.ready:
            return False
        self.armed = self._send(b"arm %r" % deadline)
        return self.armed

    def extend(self, deadline: float) -> None:
        """The orchestrator is in its thaw phase, bounded by ``deadline``: the guard acts on a
        stuck orchestrator only after that (+ grace), never while it is still thawing."""
        if self.armed:
            self._send(b"arm %r" % deadline)

    def disarm(self) -> None:
        """Nothing of ours is frozen any more."""
        if self.armed:
            self._send(b"disarm")
            self.armed = False

    def poll(self) -> None:
        """Read what the guard said, without waiting."""
        if self.sock is None:
            return
        while True:
            try:
                data = self.sock.recv(_MSG_MAX, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if self.lost is None:
                    self.lost = f"the freeze guard's control socket failed: {exc}"
                return
            if not data:
                if self.lost is None and self.result is None:
                    self.lost = "the freeze guard exited"
                return
            self._message(data)

    def _message(self, data: bytes) -> None:
        words = data.decode("utf-8", "replace").split(" ", 2)
        if words[0] == "took-over":
            self.took_over = " ".join(words[1:]) or "deadline"
            log.warning("the freeze guard took over the agent (%s)", self.took_over)
        elif words[0] == "result" and len(words) >= 2:
            kind = words[1]
            rest = words[2] if len(words) > 2 else ""
            thawed = 0
            if kind == "thawed":
                with contextlib.suppress(ValueError):
                    thawed = int(rest.split()[0])
            self.result = GuardResult(kind, thawed, self.took_over or "", rest)
            self.armed = False

    @contextlib.contextmanager
    def turn(self) -> Iterator[bool]:
        """Around one agent command after :meth:`arm`: yields True if the orchestrator may use
        the agent (the lock is held for the body), False if the guard has taken over (then the
        orchestrator must not touch the agent: see :meth:`wait_result`)."""
        if not self.armed or self._lock_fd is None:
            yield True
            return
        self.poll()
        if self.took_over is not None:
            yield False
            return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.poll()
            if self.took_over is None:
                self.took_over = "the guard holds the agent"
            yield False
            return
        try:
            self.poll()  # the guard may have taken over and released the lock by exiting
            yield self.took_over is None
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def wait_result(self, *, timeout: float) -> GuardResult | None:
        """After the guard took over: its result, or None if none came within ``timeout``
        (or it died without one)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while self.result is None and self.sock is not None:
            self.poll()
            if self.result is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                with anyio.move_on_after(left):
                    data = await loop.sock_recv(self.sock, _MSG_MAX)
                    if not data:
                        return self.result
                    self._message(data)
            except OSError:
                return self.result
        return self.result

    async def close(self) -> None:
        """Tell the guard it is done and reap it (bounded: 2 s, then SIGKILL). Idempotent."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.send(b"done", socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            self.sock.close()
            self.sock = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        proc = self.proc
        if proc is None:
            return
        await run_to_completion(_reap(proc))


async def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for the guard to exit (2 s, polling), then SIGKILL it and wait for that."""
    deadline = time.monotonic() + 2.0
    pause = 0.001
    while proc.poll() is None and time.monotonic() < deadline:
        await anyio.sleep(pause)
        pause = min(pause * 2, 0.05)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

