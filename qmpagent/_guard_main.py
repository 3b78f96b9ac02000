"""The freeze guard process (``python -m qmpagent._guard_main``, or faster
:data:`qmpagent._guard_wire.BOOT`): see
:mod:`qmpagent.guard`.

Blocking code, no event loop: it waits on its control socket with ``poll`` and, when it has to
act, speaks the agent protocol through the sans-I/O :class:`~qmpagent.agent_protocol.AgentConnection`
over its duplicate of the orchestrator's agent socket. That socket's file status flags are
shared with the orchestrator's copy (``O_NONBLOCK``): the guard never changes them, it polls.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import select
import signal
import socket
import sys
import time
from typing import Any

from ._guard_wire import GRACE
from .agent_protocol import AgentConnection, ErrorReply, NeedData, Reply, State, Synced, Yield
from .errors import AgentError, JournalError
from .journal import GuardRecord, Journal

_ATTEMPT: float = 5.0  # seconds one sync/status/thaw attempt may take


class _Timeout(Exception):
    pass


class _Agent:
    """Blocking agent I/O on a (non-blocking) fd, through AgentConnection."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.conn = AgentConnection()

    def _write(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
                view = view[n:]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            self._wait(select.POLLOUT, deadline)

    def _wait(self, events: int, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Timeout()
        p = select.poll()
        p.register(self.fd, events | select.POLLHUP | select.POLLERR)
        p.poll(max(1, int(left * 1000)))

    def _event(self, deadline: float) -> Any:
        while True:
            event = self.conn.next_event()
            if isinstance(event, Yield):
                continue
            if not isinstance(event, NeedData):
                return event
            self._wait(select.POLLIN, deadline)
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                self.conn.receive_eof()
                continue
            if data:
                self.conn.receive_data(data)
            else:
                self.conn.receive_eof()

    def call(self, command: str, deadline: float) -> Any:
        """Sync if needed, run ``command``, return its value. Raises AgentError, _Timeout."""
        try:
            if not self.conn.in_sync:
                self._write(self.conn.start_sync(), deadline)
                event = self._event(deadline)
                if not isinstance(event, Synced):  # pragma: no cover
                    raise AgentError(f"unexpected {event!r} while syncing")
            self._write(self.conn.send_command(command), deadline)
            event = self._event(deadline)
        except BaseException:
            with contextlib.suppress(Exception):
                self.conn.abandon()
            raise
        if isinstance(event, Reply):
            return event.value
        if isinstance(event, ErrorReply):
            raise AgentError(f"{command}: {event.error_class}: {event.desc}")
        raise AgentError(f"unexpected {event!r}")  # pragma: no cover


class Guard:
    def __init__(self, args: argparse.Namespace) -> None:
        self.ctl = socket.socket(fileno=args.control_fd)
        self.ctl.setblocking(True)  # our own socketpair end: not shared with anyone
        self.agent_fd: int = args.agent_fd
        # Our own open file description of the lock (flock is per description).
        self.lock_fd = os.open(f"/proc/self/fd/{args.lock_fd}", os.O_RDWR | os.O_CLOEXEC)
        os.close(args.lock_fd)
        self.op: str = args.op
        self.journal = Journal(args.journal)
        self.thaw_timeout: float = args.thaw_timeout
        self.armed = False
        self.was_armed = False
        self.deadline = 0.0
        self.done = False

    def send(self, msg: str) -> None:
        with contextlib.suppress(OSError):
            self.ctl.send(msg.encode(), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)

    def handle(self, data: bytes) -> None:
        # "arm D": armed, act at D + GRACE (sent again with a later D when the orchestrator
        # enters its thaw phase); "disarm": nothing of ours is frozen; "done": exit.
        words = data.decode("ascii", "replace").split()
        if not words:
            return
        if words[0] == "arm" and len(words) == 2:
            self.armed = self.was_armed = True
            self.deadline = float(words[1])
        elif words[0] == "disarm":
            self.armed = False
        elif words[0] == "done":
            self.done = True

    def read_ctl(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` for one message; False on EOF (the orchestrator is gone)."""
        r, _, _ = select.select([self.ctl], [], [], timeout)
        if not r:
            return True
        try:
            data = self.ctl.recv(4096)
        except OSError:
            return False
        if not data:
            return False
        self.handle(data)
        return True

    def drain_ctl(self) -> bool:
        """Read every message waiting; False on EOF."""
        while True:
            try:
                data = self.ctl.recv(4096, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data:
                return False
            self.handle(data)

    def run(self) -> int:
        self.send("ready")
        while not self.done:
            timeout = None if not self.armed else max(0.0, self.deadline + GRACE - time.monotonic())
            alive = self.read_ctl(timeout)
            if not alive:
                if self.armed:
                    self.act("the orchestrator died")  # always acts: nobody can disarm now
                elif self.was_armed:
                    # It died after it had settled its freeze (thawed, or it froze nothing):
                    # say so, so that recovery never takes a later freeze for ours.
                    self.record("not-frozen", 0, "the orchestrator died",
                                "it had settled its freeze before it died")
                return 0
            if self.armed and time.monotonic() >= self.deadline + GRACE and self.act("deadline"):
                return 0
        return 0

    def _postponed(self, alive: bool) -> bool:
        """A live orchestrator moved the deadline (it is in its thaw phase) or disarmed."""
        return not self.armed or self.done or (
            alive and time.monotonic() < self.deadline + GRACE
        )

    def act(self, reason: str) -> bool:
        """Take the agent over and thaw if frozen; False if there was no need after all (a
        disarm, or a later deadline, came meanwhile: keep waiting)."""
        # The lock: the orchestrator holds it while it talks to the agent after arming.
        alive = reason == "deadline"
        while True:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            alive = self.read_ctl(0.005) and alive
            if self._postponed(alive):
                return False
            # Dead: its lock went with it, and the next try succeeds.
        if alive and not self.drain_ctl():
            alive = False
        if self._postponed(alive):
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            return False  # a disarm or a later deadline came while we waited
        self.send(f"took-over {reason}")
        agent = _Agent(self.agent_fd)
        result, thawed, detail = "failed", 0, ""
        budget = time.monotonic() + self.thaw_timeout
        pause = 0.05
        while time.monotonic() < budget:
            deadline = min(budget, time.monotonic() + _ATTEMPT)
            try:
                status = agent.call("guest-fsfreeze-status", deadline)
                if status != "frozen":
                    # Thawed (by someone), or a freeze that froze nothing: nothing of ours.
                    result, detail = "not-frozen", f"status {status!r}"
                    break
                n = agent.call("guest-fsfreeze-thaw", deadline)
                thawed = n if isinstance(n, int) and not isinstance(n, bool) else 0
                result, detail = "thawed", ""
                break
            except (_Timeout, AgentError) as exc:
                detail = str(exc) or "no answer from the agent"
                if agent.conn.state is State.CLOSED:
                    break  # the connection is gone: nothing more can be done from here
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        self.record(result, thawed, reason, detail)
        self.send(f"result {result} {thawed if result == 'thawed' else detail}")
        sys.stderr.write(f"qmpagent guard {self.op}: {reason}: {result} {thawed or detail}\n")
        return True


    def record(self, result: str, thawed: int, reason: str, detail: str) -> None:
        """The guard's journal record (durable), written before the result is reported."""
        record = GuardRecord(op=self.op, result=result, thawed=thawed, reason=reason,
                             detail=detail, at=time.time())
        with contextlib.suppress(JournalError):
            self.journal.write_guard(record)


def main(argv: list[str] | None = None) -> int:
    # Only the orchestrator's death (EOF) or its "done" ends us; a SIGINT meant for its
    # terminal must not (we are in our own session anyway).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="qmpagent-guard")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--agent-fd", type=int, required=True)
    parser.add_argument("--lock-fd", type=int, required=True)
    parser.add_argument("--op", required=True)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--thaw-timeout", type=float, default=30.0)
    parser.add_argument("--parent", type=int, default=0)
    args = parser.parse_args(argv)
    return Guard(args).run()


if __name__ == "__main__":
    sys.exit(main())
