"""A real, throwaway QEMU guest for tests: real QEMU (TCG) and the real ``qemu-ga`` inside.

Use :func:`boot_guest`::

    async with boot_guest() as guest:
        mon = await qmpagent.Monitor.connect(guest.qmp_path)
        ga = await qmpagent.GuestAgent.connect(guest.agent_path)
        ...

On exit (also on error or cancellation) QEMU is stopped and reaped and the guest's working
directory (sockets, overlays, console log) is removed.

Besides QMP and the agent, the guest has a private command channel (a second virtio-serial port
served by a shell loop in the guest's init) so tests can act inside the guest without the agent:
stop and restart ``qemu-ga``, freeze a filesystem with another tool, read the writer's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.protocol import ConnectError

from ..errors import QMPAgentError
from ..monitor import AGENT_PORT_NAME
from .image import GuestBuildError, GuestImage, build_guest_image, resolve_peer
from .peer import Peer, PeerError

_T = TypeVar("_T")

__all__ = [
    "AGENT_PORT_NAME",
    "CommandResult",
    "Guest",
    "GuestDisk",
    "GuestError",
    "WriterLog",
    "boot_guest",
]

log = logging.getLogger(__name__)

_CONTROL_PORT_NAME = "org.qmpagent.control"
_RC_MARK = "__QMPAGENT_RC__ "
_BEGIN_MARK = "__QMPAGENT_BEGIN__ "


class GuestError(QMPAgentError):
    """The test guest failed: QEMU did not start, exited early, or did not get ready in time."""


@dataclass(frozen=True)
class GuestDisk:
    """One data disk of a test guest.

    Attributes:
        node_name: the qcow2 format node (what ``blockdev-snapshot`` and the orchestrator take).
        file_node_name: the protocol (file) node under it.
        device_id: the qdev id of the ``virtio-blk-pci`` device.
        overlay: this boot's qcow2 overlay file (its backing file is the cached image).
        mountpoint: where the guest mounts it.
    """

    node_name: str
    file_node_name: str
    device_id: str
    overlay: Path
    mountpoint: str


@dataclass(frozen=True)
class CommandResult:
    """The outcome of :meth:`Guest.run`: the exit status and combined stdout/stderr."""

    returncode: int
    output: str


@dataclass(frozen=True)
class WriterLog:
    """The in-guest timestamp writer's log: ``(sequence, uptime seconds)`` per line.

    A filesystem freeze blocks the writer's append, so it shows as one gap between two
    consecutive uptimes much larger than the writer's 10 ms period.
    """

    entries: tuple[tuple[int, float], ...]

    @classmethod
    def parse(cls, text: str) -> WriterLog:
        """Parse the log; a torn last line (written while we read) is ignored."""
        entries = []
        lines = text.split("\n")
        lines.pop()  # the part after the last newline is empty or torn
        for line in lines:
            parts = line.split()
            if len(parts) != 2:
                continue
            try:
                entries.append((int(parts[0]), float(parts[1])))
            except ValueError:
                continue
        return cls(tuple(entries))

    def gaps(self) -> list[float]:
        """Seconds between consecutive entries."""
        return [b[1] - a[1] for a, b in itertools.pairwise(self.entries)]

    def largest_gap(self, after: float | None = None) -> float:
        """The largest gap, optionally only among entries later than uptime ``after``."""
        entries = [e for e in self.entries if after is None or e[1] >= after]
        gaps = [b[1] - a[1] for a, b in itertools.pairwise(entries)]
        return max(gaps, default=0.0)

    @property
    def last_uptime(self) -> float:
        """The newest entry's uptime, or 0.0 when empty."""
        return self.entries[-1][1] if self.entries else 0.0


@dataclass
class Guest:
    """A running test guest. Made by :func:`boot_guest`; do not construct it yourself.

    Attributes:
        workdir: the guest's private directory; removed on exit.
        qmp_path: the QMP unix socket for the test (one client at a time).
        agent_path: the unix socket of the agent's virtio-serial port.
        console_log: the guest's serial console output.
        disks: the data disks; ``disks[0]`` is mounted at ``/mnt/data``.
        agent_chardev: the chardev id behind the agent port (``qga0``).
        agent_port_id: the virtserialport device id (``qgaport0``), as ``VSERPORT_CHANGE`` names it.
        image: the cached guest build that was booted.
        boot_time: seconds from starting QEMU to the agent port open (None if not waited for).
        pid: QEMU's process id.
        peak_rss: QEMU's peak resident set size in bytes, read when it is stopped.
        peer: the peer QEMU, qemu-ga and the kernel come from (``"host"`` or ``"debian13"``).
        qemu_version: the running QEMU's ``(major, minor, micro)``, from its QMP greeting.
    """

    workdir: Path
    qmp_path: Path
    agent_path: Path
    console_log: Path
    disks: tuple[GuestDisk, ...]
    image: GuestImage
    agent_chardev: str = "qga0"
    agent_port_id: str = "qgaport0"
    boot_time: float | None = None
    pid: int = 0
    peak_rss: int | None = None
    peer: str = "host"
    qemu_version: tuple[int, int, int] = (0, 0, 0)
    _peer: Peer | None = field(default=None, repr=False)
    _process: asyncio.subprocess.Process | None = field(default=None, repr=False)
    _control: _ControlChannel | None = field(default=None, repr=False)

    @property
    def disk(self) -> GuestDisk:
        """The first data disk (mounted at ``/mnt/data``)."""
        return self.disks[0]

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, or None while it runs."""
        return self._process.returncode if self._process is not None else None

    def rss(self) -> tuple[int, int]:
        """QEMU's current and peak resident set size in bytes, from ``/proc``."""
        values = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
        return values.get("VmRSS", 0), values.get("VmHWM", 0)

    async def run(self, command: str, timeout: float = 60.0, check: bool = True) -> CommandResult:
        """Run a one-line shell command inside the guest, without the agent.

        Raises:
            GuestError: the command failed (with ``check``) or the channel did not answer in time.
        """
        if self._control is None:
            raise GuestError("the guest's command channel is not connected")
        result = await self._control.run(command, timeout)
        if check and result.returncode != 0:
            raise GuestError(f"guest command {command!r} failed ({result.returncode}): {result.output}")
        return result

    async def stop_agent(self, timeout: float = 60.0) -> None:
        """Stop ``qemu-ga`` in the guest and keep it stopped until :meth:`start_agent`."""
        # Until no qemu-ga is left (pidof fails): robust to none running yet, to one the
        # guest's init was just restarting, and to busybox versions whose `kill -0` without a
        # pid succeeds.
        await self.run(
            "touch /run/qga.hold; i=0; while p=$(pidof qemu-ga) && [ $i -lt 3000 ]; do "
            "kill $p 2>/dev/null; usleep 10000; i=$((i+1)); done; ! pidof qemu-ga >/dev/null",
            timeout,
        )

    async def start_agent(self, timeout: float = 60.0) -> None:
        """Let the guest's init start ``qemu-ga`` again after :meth:`stop_agent`."""
        await self.run("rm -f /run/qga.hold", timeout)

    async def kill_agent(self, timeout: float = 60.0) -> None:
        """Kill ``qemu-ga`` (SIGKILL); the guest's init restarts it."""
        await self.run("killall -9 qemu-ga", timeout)

    async def writer_log(self, disk: str = "/mnt/data", timeout: float = 60.0) -> WriterLog:
        """Read the in-guest timestamp writer's log (readable while frozen)."""
        # $(...) in the guest's shell loop strips trailing newlines: a marker keeps them, so a
        # torn last line can be told from a complete one.
        result = await self.run(f"cat {disk}/writer.log; echo __EOF__", timeout)
        return WriterLog.parse(result.output.removesuffix("__EOF__"))

    async def uptime(self, timeout: float = 60.0) -> float:
        """The guest's uptime in seconds (the writer's clock)."""
        result = await self.run("cat /proc/uptime", timeout)
        return float(result.output.split()[0])

    async def wait_writer_progress(self, after: float, timeout: float = 60.0) -> WriterLog:
        """Wait until the writer has logged an entry later than uptime ``after``."""
        with anyio.fail_after(timeout):
            while True:
                wlog = await self.writer_log(timeout=timeout)
                if wlog.last_uptime > after:
                    return wlog
                await anyio.sleep(0.05)

    def command(self, name: str) -> list[str]:
        """The argv prefix that runs the peer's program ``name`` (e.g. ``qemu-img``) on the
        host: the same version as the guest's QEMU."""
        assert self._peer is not None
        return self._peer.command(name)

    def console_text(self) -> str:
        """The console log so far."""
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class _ControlChannel:
    """Host side of the guest's shell loop on the control port.

    Each command is prefixed with a unique marker so output left over from a command that
    timed out is recognised and skipped rather than taken as the next command's output.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    async def run(self, command: str, timeout: float) -> CommandResult:
        if "\n" in command:
            raise GuestError("guest commands must be one line")
        token = secrets.token_hex(8)
        async with self._lock:
            self._writer.write(f"echo {_BEGIN_MARK}{token}; {command}\n".encode())
            await self._writer.drain()
            try:
                with anyio.fail_after(timeout):
                    while True:
                        lines: list[str] = []
                        while True:
                            raw = await self._reader.readline()
                            if not raw:
                                raise GuestError("the guest's command channel closed")
                            line = raw.decode(errors="replace").rstrip("\n")
                            if line.startswith(_RC_MARK):
                                break
                            lines.append(line)
                        if lines and lines[0] == f"{_BEGIN_MARK}{token}":
                            return CommandResult(int(line[len(_RC_MARK):]), "\n".join(lines[1:]))
            except TimeoutError:
                raise GuestError(f"guest command {command!r} got no answer in {timeout}s") from None

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    # QEMU dies with the test process, even if the latter is killed: no orphan VMs.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


async def _wait_for_socket(path: Path, proc: asyncio.subprocess.Process, deadline: float) -> None:
    while not path.exists():
        if proc.returncode is not None:
            raise GuestError(f"QEMU exited with status {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise GuestError(f"QEMU did not create {path} in time")
        await asyncio.sleep(0.01)


async def _until_listening(connect: Callable[[], Awaitable[_T]], proc: asyncio.subprocess.Process) -> _T:
    """``connect()``, again while it is refused: QEMU creates a server socket's file when it
    binds it and listens on it a moment later, so a connect in between (a loaded machine makes
    it likely) is refused although QEMU is fine. The caller bounds the whole wait."""
    while True:
        try:
            return await connect()
        except (ConnectionRefusedError, ConnectError) as exc:
            refused = isinstance(exc, ConnectionRefusedError) or isinstance(
                exc.exc, ConnectionRefusedError)
            if not refused or proc.returncode is not None:
                raise
        await asyncio.sleep(0.02)


async def _agent_port_open(qmp: QMPClient, chardev: str) -> bool:
    chardevs = await qmp.execute("query-chardev")
    assert isinstance(chardevs, list)
    for cd in chardevs:
        if cd.get("label") == chardev:
            return bool(cd.get("frontend-open"))
    raise GuestError(f"QEMU has no chardev {chardev!r}")


def _qemu_version(qmp: QMPClient) -> tuple[int, int, int]:
    greeting = qmp.greeting
    if greeting is None:  # pragma: no cover - set by a successful connect
        return (0, 0, 0)
    v: Any = greeting.QMP.version["qemu"]
    return (int(v["major"]), int(v["minor"]), int(v["micro"]))


async def _wait_agent_port(qmp: QMPClient, chardev: str, proc: asyncio.subprocess.Process) -> None:
    # VSERPORT_CHANGE is only a hint (rate-limited, coalesced); query-chardev is the truth.
    from qemu.qmp import EventListener

    listener = EventListener(("VSERPORT_CHANGE",))
    with qmp.listen(listener):
        while not await _agent_port_open(qmp, chardev):
            if proc.returncode is not None:
                raise GuestError(f"QEMU exited with status {proc.returncode} during boot")
            with anyio.move_on_after(1.0):
                await listener.get()
            listener.clear()


@contextlib.asynccontextmanager
async def boot_guest(
    *,
    second_disk: bool = False,
    data_disks: int = 1,
    writer: bool = True,
    paused: bool = False,
    wait_for_agent: bool = True,
    boot_timeout: float = 180.0,
    memory_mb: int = 256,
    extra_args: Sequence[str] = (),
    image: GuestImage | None = None,
    workdir_parent: str | os.PathLike[str] | None = None,
    peer: Peer | str | None = None,
) -> AsyncIterator[Guest]:
    """Boot a throwaway guest under TCG and yield a :class:`Guest`.

    Args:
        second_disk: attach a second data disk (node ``disk1``, mounted at ``/mnt/data2``);
            the same as ``data_disks=2``.
        data_disks: how many data disks (1 to 8): node ``disk<i>``, device ``vblk<i>``, mounted at
            ``/mnt/data`` for the first and ``/mnt/data<i+1>`` for the others.
        writer: run the in-guest timestamp writer on ``/mnt/data`` (every 10 ms).
        paused: start QEMU with ``-S``; the caller sends ``cont``. Implies not waiting for the
            agent, so the caller can watch the whole boot (e.g. ``VSERPORT_CHANGE``).
        wait_for_agent: return only once the agent's port is open in the guest.
        boot_timeout: how long QEMU may take to reach that point.
        memory_mb: guest RAM.
        extra_args: more QEMU arguments.
        image: a prebuilt image (default: build or reuse the cached one).
        workdir_parent: where the guest's working directory is made (default: the temp dir).
        peer: whose QEMU, qemu-ga and kernel: ``"host"`` (the machine's own packages) or
            ``"debian13"`` (QEMU 10.0 + qemu-ga 10.0 from a Debian 13 root provisioned into the
            cache on first use); default ``$QMPAGENT_PEER``, else ``"host"``. An ``image`` given
            must have been built from the same peer.

    Raises:
        GuestBuildError: the guest cannot be built (names the ``apt-get install`` line).
        UsageError: unknown peer.
        GuestError: QEMU failed to start, exited early or did not get ready in time
            (the console log tail is in the message).
    """
    the_peer = await anyio.to_thread.run_sync(resolve_peer, peer)
    if image is None:
        image = await anyio.to_thread.run_sync(lambda: build_guest_image(peer=the_peer))
    elif image.peer != the_peer.name:
        raise GuestError(f"the image was built from peer {image.peer!r}, not {the_peer.name!r}")
    try:
        qemu = the_peer.qemu_command()
        qemu_img = the_peer.command("qemu-img")
    except PeerError as exc:
        raise GuestBuildError(str(exc)) from exc
    workdir = Path(tempfile.mkdtemp(prefix="qmpagent-guest-", dir=workdir_parent))
    proc: asyncio.subprocess.Process | None = None
    guest: Guest | None = None
    try:
        count = max(data_disks, 2 if second_disk else 1)
        if not 1 <= count <= 8:
            raise GuestError("data_disks must be between 1 and 8")
        serials = ["data"] + [f"data{i + 1}" for i in range(1, count)]
        disks = [
            GuestDisk(f"disk{i}", f"file{i}", f"vblk{i}", workdir / f"data{i}.qcow2", f"/mnt/{serial}")
            for i, serial in enumerate(serials)
        ]
        bases = [image.data_disk] + [image.data2_disk] * (count - 1)
        for disk, base in zip(disks, bases, strict=True):
            p = await asyncio.create_subprocess_exec(
                *qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                str(disk.overlay),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )
            _, err = await p.communicate()
            if p.returncode != 0:
                raise GuestError(f"qemu-img create failed: {err.decode(errors='replace')}")

        guest = Guest(
            workdir=workdir,
            qmp_path=workdir / "qmp.sock",
            agent_path=workdir / "qga.sock",
            console_log=workdir / "console.log",
            disks=tuple(disks),
            image=image,
            peer=the_peer.name,
            _peer=the_peer,
        )
        rig_qmp = workdir / "rig-qmp.sock"
        control = workdir / "control.sock"
        append = "console=ttyS0 quiet panic=-1 qmpagent.writer={} qmpagent.disks={}".format(
            1 if writer else 0, ",".join(serials)
        )
        argv = [
            *qemu, "-machine", "q35,accel=tcg", "-cpu", "max", "-m", str(memory_mb),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
            "-serial", f"file:{guest.console_log}",
            "-qmp", f"unix:{guest.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{rig_qmp},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id={guest.agent_chardev},path={guest.agent_path},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev={guest.agent_chardev},"
                       f"name={AGENT_PORT_NAME},id={guest.agent_port_id}",
            "-chardev", f"socket,id=ctl0,path={control},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=ctl0,name={_CONTROL_PORT_NAME},id=ctlport0",
        ]
        for disk, serial in zip(disks, serials, strict=True):
            argv += [
                "-blockdev", f"driver=file,filename={disk.overlay},node-name={disk.file_node_name}",
                "-blockdev", f"driver=qcow2,file={disk.file_node_name},node-name={disk.node_name}",
                "-device", f"virtio-blk-pci,drive={disk.node_name},id={disk.device_id},serial={serial}",
            ]
        if paused:
            argv.append("-S")
        argv += list(extra_args)
        log.debug("starting %s", " ".join(argv))
        started = time.monotonic()
        with open(workdir / "qemu.stderr", "wb") as stderr:  # the child keeps its own copy
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=_set_pdeathsig,
                env={**os.environ, **the_peer.environment()},
            )
        guest._process = proc
        guest.pid = proc.pid
        deadline = started + boot_timeout
        try:
            with anyio.fail_after(boot_timeout):
                await _wait_for_socket(rig_qmp, proc, deadline)
                await _wait_for_socket(control, proc, deadline)
                reader, writer_ = await _until_listening(
                    lambda: asyncio.open_unix_connection(str(control)), proc)
                guest._control = _ControlChannel(reader, writer_)
                qmp = QMPClient("qmpagent-rig")
                try:
                    await _until_listening(lambda: qmp.connect(str(rig_qmp)), proc)
                    guest.qemu_version = _qemu_version(qmp)
                    if wait_for_agent and not paused:
                        await _wait_agent_port(qmp, guest.agent_chardev, proc)
                        guest.boot_time = time.monotonic() - started
                finally:
                    await qmp.disconnect()
        except (TimeoutError, QMPError, OSError, GuestError) as exc:
            what = f"no progress in {boot_timeout}s" if isinstance(exc, TimeoutError) else str(exc)
            raise GuestError(
                f"the guest did not get ready: {what}; console:\n"
                + guest.console_text()[-2000:]
                + _stderr_tail(workdir)
            ) from exc
        log.info("guest %s ready in %.2fs", workdir.name, guest.boot_time or 0.0)
        yield guest
    finally:
        with anyio.CancelScope(shield=True):
            if guest is not None and guest._control is not None:
                await guest._control.close()
            if proc is not None:
                await _stop_qemu(proc, guest)
            shutil.rmtree(workdir, ignore_errors=True)


def _stderr_tail(workdir: Path) -> str:
    try:
        text = (workdir / "qemu.stderr").read_text(errors="replace").strip()
    except OSError:
        return ""
    return f"\nqemu stderr:\n{text[-2000:]}" if text else ""


async def _stop_qemu(proc: asyncio.subprocess.Process, guest: Guest | None) -> None:
    if proc.returncode is None and guest is not None:
        with contextlib.suppress(OSError, ValueError):
            guest.peak_rss = guest.rss()[1]
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        with anyio.move_on_after(15):
            await proc.wait()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()

