"""A fake VM for fast tests: a :class:`~qmpagent.testing.FakeQMPServer` and a
:class:`~qmpagent.testing.FakeAgent` wired together like QEMU and the guest: :class:`FakeVM`.

::

    async with FakeVM(disks=2) as vm:
        async with await qmpagent.Monitor.connect(vm.qmp_address) as mon:
            orch = qmpagent.SnapshotOrchestrator(mon, agent=vm.agent_address)
            result = await orch.snapshot({"disk0": vm.workdir / "s0.qcow2",
                                          "disk1": vm.workdir / "s1.qcow2"})
        assert result.quiesced and vm.active_node("vblk0") == result.overlays["disk0"]
        assert vm.transactions[-1].guest_frozen        # the snapshot ran inside the freeze
        assert not vm.agent.frozen                     # and the freeze was thawed

What is wired, like the real test guest (:func:`~qmpagent.testing.boot_guest`):

* **Disks**: ``disks`` qcow2 images in :attr:`FakeVM.workdir` (real qcow2 files that
  ``qemu-img`` opens), each on a read-only base image like the test guest's; nodes ``disk<i>``
  (qcow2) on ``file<i>`` (file), device ``vblk<i>``, mounted in the guest at ``/mnt/data``,
  ``/mnt/data2``, ... The block layer is the fake QMP server's (``blockdev-create``,
  ``blockdev-add``, ``blockdev-del``, ``transaction``), so overlays are real files.
* **The agent port**: virtserialport ``qgaport0`` (name ``org.qemu.guest_agent.0``, chardev
  ``qga0``). When the agent opens or closes its port (:meth:`FakeVM.start_agent`,
  :meth:`FakeVM.stop_agent`, a shutdown, a reboot) QMP emits ``VSERPORT_CHANGE``
  (rate-limited to one per second per port, the latest kept, as QEMU does; the period of the
  port-open at boot runs when the VM starts, as with a freshly booted guest) and
  ``query-chardev`` reports ``frontend-open`` (and ``disconnected:`` in ``filename`` while no
  client is connected to the agent socket).
* **Power**: ``guest-shutdown`` through the agent: the port closes, then ``SHUTDOWN {"guest":
  true, "reason": "guest-shutdown"}``, then QEMU exits (QMP connections see end-of-file),
  unless ``no_shutdown``. A reboot (``guest-shutdown`` with mode ``reboot``,
  :meth:`FakeVM.reboot`, QMP ``system_reset``): the port closes, ``RESET``, the guest's freeze
  state is gone (a rebooted guest is thawed), and the port reopens after ``boot_time``;
  with ``no_reboot`` (as the test guest: QEMU's ``-no-reboot``) it shuts down instead with
  reason ``guest-reset``. QMP ``quit``: ``SHUTDOWN {"guest": false, "reason":
  "host-qmp-quit"}``, exit. :meth:`FakeVM.kill`: QEMU dies (no event).
* **QMP** serves one client at a time, as QEMU's ``-qmp`` socket does: a second client gets
  its greeting once the first has disconnected.
* **Pause**: QMP ``stop`` stops the guest's CPUs: the agent answers nothing until ``cont``.
* **Records**: :attr:`FakeVM.transactions` says, for every ``transaction``, whether the guest's
  filesystems were frozen while it ran; :meth:`FakeVM.new_nodes` and :meth:`FakeVM.new_files`
  show what an operation left behind.

Everything else (faults, the guest's files and programs, a foreign ``fsfreeze``) is set on
:attr:`FakeVM.qmp` and :attr:`FakeVM.agent` directly (see their docs).

Not modelled: the guest's open files and ``guest-exec`` processes survive a reboot (only the
freeze state is reset); the disks' contents; memory, CPUs and every other device.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ._server import AsyncService
from .fake_agent import DEBIAN13_VERSION, DEFAULT_VERSION, AgentFault, AgentInjection, FakeAgent
from .fake_qmp import FakeCall, FakeQMPError, FakeQMPServer, create_qcow2_image

__all__ = ["FAKE_PEERS", "FakeDisk", "FakeVM", "TransactionRecord"]

log = logging.getLogger(__name__)

AGENT_PORT_ID: Final = "qgaport0"
AGENT_CHARDEV: Final = "qga0"
_BASE_SIZE: Final = 64 << 20


@dataclass(frozen=True)
class FakeDisk:
    """One disk of a :class:`FakeVM` (named like the test guest's, see
    :class:`~qmpagent.testing.GuestDisk`).

    Attributes:
        node_name: the qcow2 format node (what ``blockdev-snapshot`` takes), ``disk<i>``.
        file_node_name: the file node under it, ``file<i>``.
        device_id: the qdev id of its ``virtio-blk-pci`` device, ``vblk<i>``.
        path: its image file.
        mountpoint: where the guest mounts it.
        base: the read-only base image it is an overlay of, or ``None``.
    """

    node_name: str
    file_node_name: str
    device_id: str
    path: Path
    mountpoint: str
    base: Path | None = None


#: The real peers the fakes can answer like: name -> (QEMU version, qemu-ga version).
FAKE_PEERS: Final[Mapping[str, tuple[tuple[int, int, int], str]]] = {
    "debian12": ((7, 2, 0), DEFAULT_VERSION),
    "debian13": ((10, 0, 13), DEBIAN13_VERSION),
}


@dataclass(frozen=True)
class TransactionRecord:
    """One QMP ``transaction`` the fake VM executed (see :attr:`FakeVM.transactions`).

    Attributes:
        actions: the actions, as sent.
        error: QEMU's error text if it failed (then nothing was applied), else ``None``.
        guest_frozen: the guest agent was in frozen state while it ran.
        frozen_mountpoints: the filesystems frozen (by anyone) while it ran.
        time: ``time.monotonic()`` when it ran.
    """

    actions: list[Any]
    error: str | None
    guest_frozen: bool
    frozen_mountpoints: tuple[str, ...]
    time: float


@dataclass(frozen=True)
class _Build:
    """The constructor options of a :class:`FakeVM` that only :meth:`FakeVM.start` reads."""

    disks: int
    workdir: Path | None
    disk_size: int
    backing_images: bool
    agent_running: bool
    tcp: bool
    agent_options: dict[str, Any]
    vserport_rate_limit: float


class FakeVM(AsyncService):
    """A fake QEMU VM with a guest agent, for tests that need no real VM (see the module doc).

    ``async with FakeVM() as vm:`` starts it and stops it (also on error); or :meth:`start`
    and :meth:`close`.

    Args:
        disks: how many data disks (1 to 26).
        workdir: where the images and sockets go (default: a fresh temporary directory,
            removed on close; a given directory is left, minus the sockets).
        disk_size: the disks' virtual size in bytes.
        backing_images: give each disk a read-only base image (as the test guest has), so its
            node has a backing chain.
        agent_running: whether the agent has its port open at start (``False``: it is
            stopped, see :meth:`start_agent`).
        boot_time: seconds from a reboot to the agent opening its port again.
        no_reboot: a reboot shuts the VM down instead (QEMU's ``-no-reboot``).
        no_shutdown: after a shutdown QEMU stays, in state ``shutdown`` (``-no-shutdown``).
        vserport_rate_limit: seconds between two ``VSERPORT_CHANGE`` of the port (QEMU: 1.0).
        tcp: serve QMP and the agent on ``127.0.0.1`` ports instead of unix sockets.
        agent_options: more keyword arguments for :class:`~qmpagent.testing.FakeAgent`
            (e.g. ``blocked_commands``, ``files``, ``programs``, ``mountpoints``).
        peer: which real peer the fakes answer like where versions differ: ``"debian12"``
            (QEMU 7.2 + qemu-ga 7.2, the default) or ``"debian13"`` (QEMU 10.0 + qemu-ga 10.0).

    Attributes:
        qmp: the fake QMP server (QEMU).
        agent: the fake guest agent.
        workdir: the VM's directory.
        disks: the data disks.
        transactions: every ``transaction`` executed, oldest first.
        agent_port_id: the agent's virtserialport id (``qgaport0``).
        agent_chardev: the agent's chardev (``qga0``).

    Raises:
        ValueError: ``disks`` out of range.
    """

    def __init__(
        self,
        disks: int = 1,
        *,
        workdir: str | os.PathLike[str] | None = None,
        disk_size: int = _BASE_SIZE,
        backing_images: bool = True,
        agent_running: bool = True,
        boot_time: float = 0.2,
        no_reboot: bool = False,
        no_shutdown: bool = False,
        vserport_rate_limit: float = 1.0,
        tcp: bool = False,
        agent_options: Mapping[str, Any] | None = None,
        peer: str = "debian12",
    ) -> None:
        if not 1 <= disks <= 26:
            raise ValueError("disks must be between 1 and 26")
        if peer not in FAKE_PEERS:
            raise ValueError(f"peer must be one of {', '.join(FAKE_PEERS)}, not {peer!r}")
        self.peer = peer
        # How to build the VM (read by start() only), apart from the options tests may change.
        self._build = _Build(
            disks, Path(workdir) if workdir is not None else None, disk_size, backing_images,
            agent_running, tcp, dict(agent_options or {}), vserport_rate_limit,
        )
        self.boot_time = boot_time
        self.no_reboot = no_reboot
        self.no_shutdown = no_shutdown
        self.agent_port_id = AGENT_PORT_ID
        self.agent_chardev = AGENT_CHARDEV
        self.workdir = Path()
        self.disks: tuple[FakeDisk, ...] = ()
        self.transactions: list[TransactionRecord] = []
        self._owns_workdir = False
        self._qmp: FakeQMPServer | None = None
        self._agent: FakeAgent | None = None
        self._initial_nodes: frozenset[str] = frozenset()
        self._initial_files: frozenset[str] = frozenset()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pause: AgentInjection | None = None
        self._exited = asyncio.Event()
        self._stop_task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<FakeVM {self.workdir} disks={len(self.disks)} status={self.status!r}>"

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Create the disks and start QEMU's QMP and the agent.

        Raises:
            RuntimeError: already started.
            OSError: the images or sockets cannot be created.
        """
        if self._started:
            raise RuntimeError("FakeVM.start() may be called once")
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        if self._build.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="qmpagent-fakevm-"))
            self._owns_workdir = True
        else:
            self.workdir = self._build.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        disks = []
        for i in range(self._build.disks):
            path = self.workdir / f"data{i}.qcow2"
            base = self.workdir / f"base{i}.qcow2" if self._build.backing_images else None
            if base is not None:
                create_qcow2_image(base, self._build.disk_size)
            create_qcow2_image(
                path, self._build.disk_size,
                backing_file=str(base) if base is not None else None,
                backing_format="qcow2" if base is not None else None,
            )
            mountpoint = "/mnt/data" if i == 0 else f"/mnt/data{i + 1}"
            disks.append(FakeDisk(f"disk{i}", f"file{i}", f"vblk{i}", path, mountpoint, base))
        self.disks = tuple(disks)

        qmp = FakeQMPServer(
            None if self._build.tcp else self.workdir / "qmp.sock",
            tcp=self._build.tcp,
            agent_port=True,
            agent_port_open=self._build.agent_running,
            disk=False,
            block_commands=True,
            vserport_rate_limit=self._build.vserport_rate_limit,
            max_clients=1,
            version=FAKE_PEERS[self.peer][0],
        )
        self._qmp = qmp
        for disk in self.disks:
            qmp.blockdev_add(
                {"driver": "file", "filename": str(disk.path), "node-name": disk.file_node_name}
            )
            qmp.blockdev_add(
                {"driver": "qcow2", "file": disk.file_node_name, "node-name": disk.node_name}
            )
            qmp.attach_device(disk.device_id, disk.node_name)
        self._initial_nodes = frozenset(qmp.nodes)
        self._install_handlers(qmp)

        options: dict[str, Any] = {
            "version": FAKE_PEERS[self.peer][1],
            "mountpoints": [d.mountpoint for d in self.disks],
            "port_open": self._build.agent_running,
            "on_port_change": self._on_port_change,
            "on_shutdown": self._on_guest_shutdown,
        }
        if self._build.tcp:
            options["host"] = "127.0.0.1"
        else:
            options["path"] = self.workdir / "qga.sock"
        options.update(self._build.agent_options)
        self._agent = FakeAgent(**options)
        await qmp.start()
        if self._build.agent_running:
            # As if the agent had just opened its port at boot (like boot_guest(), which
            # returns then): QEMU's throttle period for the port's events runs from now.
            await qmp.queue_event(
                "VSERPORT_CHANGE", {"id": self.agent_port_id, "open": True}, key=self.agent_port_id
            )
        await self._agent.start()
        self._initial_files = frozenset(self._files())
        log.debug("fake VM started in %s", self.workdir)

    async def close(self) -> None:
        """Stop QEMU and the agent; remove the working directory if it was made here.

        Idempotent; safe at any time.
        """
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stop_processes()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def _stop_processes(self) -> None:
        # One stop, shielded: it may be asked for from a QMP handler or an agent callback,
        # whose own task the stop cancels.
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        if self._agent is not None:
            await self._agent.close()
        if self._qmp is not None:
            await self._qmp.close()
        self._exited.set()

    # ---------------------------------------------------------------------------- properties

    @property
    def qmp(self) -> FakeQMPServer:
        """The fake QMP server (QEMU).

        Raises:
            RuntimeError: not started.
        """
        if self._qmp is None:
            raise RuntimeError("the FakeVM is not started")
        return self._qmp

    @property
    def agent(self) -> FakeAgent:
        """The fake guest agent.

        Raises:
            RuntimeError: not started.
        """
        if self._agent is None:
            raise RuntimeError("the FakeVM is not started")
        return self._agent

    @property
    def qmp_address(self) -> str | tuple[str, int]:
        """Where QMP listens (for :meth:`qmpagent.Monitor.connect`).

        Raises:
            RuntimeError: not started.
        """
        return self.qmp.address

    @property
    def agent_address(self) -> str | tuple[str, int]:
        """Where the agent's chardev socket listens (for :meth:`qmpagent.GuestAgent.connect`).

        Raises:
            RuntimeError: not started.
        """
        return self.agent.address

    @property
    def disk(self) -> FakeDisk:
        """The first disk."""
        return self.disks[0]

    @property
    def status(self) -> str:
        """QEMU's run state (``"running"``, ``"paused"``, ``"shutdown"``), ``"exited"`` once
        QEMU has exited, or ``"created"`` before :meth:`start`."""
        if self._exited.is_set():
            return "exited"
        if self._qmp is None:
            return "created"
        return self._qmp.status

    @property
    def exited(self) -> bool:
        """Whether QEMU has exited (a shutdown, ``quit``, :meth:`kill` or :meth:`close`)."""
        return self._exited.is_set()

    async def wait_exit(self, timeout: float = 10.0) -> None:
        """Wait until QEMU has exited.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the fake VM did not exit within {timeout}s") from None

    # ---------------------------------------------------------------------------- inspection

    def active_node(self, device: str | int = 0) -> str | None:
        """The root (active) node of a disk's device, by qdev id or disk index.

        Raises:
            KeyError: no such device.
            IndexError: no such disk.
        """
        device_id = self.disks[device].device_id if isinstance(device, int) else device
        return self.qmp.active_node(device_id)

    def new_nodes(self) -> set[str]:
        """Block nodes that exist now but did not at start (overlays left behind, or taken)."""
        return set(self.qmp.nodes) - self._initial_nodes

    def removed_nodes(self) -> set[str]:
        """Block nodes that existed at start but do not now."""
        return set(self._initial_nodes) - set(self.qmp.nodes)

    def new_files(self) -> set[Path]:
        """Files in :attr:`workdir` that did not exist at start (sockets excluded)."""
        return {Path(p) for p in self._files()} - {Path(p) for p in self._initial_files}

    def _files(self) -> list[str]:
        found = []
        for root, _dirs, files in os.walk(self.workdir):
            for name in files:
                path = os.path.join(root, name)
                if not name.endswith(".sock"):
                    found.append(path)
        return found

    # ---------------------------------------------------------------------------- the guest

    async def stop_agent(self, timeout: float = 5.0) -> None:
        """Stop the guest agent (it closes its port; QMP sees the port closed).

        Raises:
            TimeoutError: QMP did not see it within ``timeout`` seconds.
        """
        self.agent.close_port()
        await self._wait_qmp_port(False, timeout)

    async def start_agent(self, timeout: float = 5.0) -> None:
        """Start the guest agent again (it opens its port; QMP sees it open).

        Raises:
            TimeoutError: QMP did not see it within ``timeout`` seconds.
        """
        self.agent.open_port()
        await self._wait_qmp_port(True, timeout)

    async def wait_agent_port(self, open: bool = True, timeout: float = 10.0) -> None:
        """Wait until QEMU reports the agent's port open (or closed), e.g. after a reboot.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        await self._wait_qmp_port(open, timeout)

    async def _wait_qmp_port(self, open: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.qmp.port_open(self.agent_port_id) is not open:
            if time.monotonic() > deadline:
                state = "open" if open else "closed"
                raise TimeoutError(f"the agent port is not {state} after {timeout}s")
            await asyncio.sleep(0.005)

    async def pause(self) -> None:
        """Stop the guest's CPUs (as QMP ``stop``): ``STOP``, and the agent answers nothing
        until :meth:`resume`."""
        if self.qmp.status == "paused":
            return
        self.qmp.status = "paused"
        self._pause = self.agent.inject("*", AgentFault.hang(), times=1)
        await self.qmp.emit("STOP")

    async def resume(self) -> None:
        """Let the guest run again (as QMP ``cont``): ``RESUME``; the agent answers again."""
        if self.qmp.status != "paused":
            return
        self.qmp.status = "running"
        if self._pause is not None:
            self._pause.cancel()
            self._pause = None
            self.agent.release()
        await self.qmp.emit("RESUME")

    async def reboot(self, *, guest: bool = True) -> None:
        """Reboot the guest: its agent port closes, ``RESET`` (``guest-reset``, or
        ``host-qmp-system-reset`` for ``guest=False``), its freeze state is gone, and the port
        reopens after :attr:`boot_time` (see :meth:`wait_agent_port`). With ``no_reboot``:
        ``SHUTDOWN`` (``guest-reset``) and QEMU exits."""
        if guest and self.no_reboot:
            await self._set_port(False)
            self.agent.close_port()
            await self._shutdown("guest-reset", guest=True)
            return
        if guest:
            await self._set_port(False)
            self.agent.close_port()
            await self.qmp.emit("RESET", {"guest": True, "reason": "guest-reset"})
        else:
            await self.qmp.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
            await self._set_port(False)
            self.agent.close_port()
        self._reset_guest()
        self._spawn(self._boot())

    async def kill(self) -> None:
        """QEMU dies (a crash, ``SIGKILL``): every QMP connection and the agent socket see
        end-of-file, with no event. May be called from a QMP handler (the command is then
        never answered) or an agent fault handler."""
        await self._stop_processes()

    def _reset_guest(self) -> None:
        agent = self.agent
        agent.set_frozen(False)
        for mountpoint in agent.mountpoints:
            agent.thaw_foreign(mountpoint)

    async def _boot(self) -> None:
        await asyncio.sleep(self.boot_time)
        if self.qmp.status == "shutdown":
            self.qmp.status = "running"
        self.agent.open_port()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set_port(self, open: bool) -> None:
        qmp = self._qmp
        if qmp is None or not qmp.listening or qmp.port_open(self.agent_port_id) is open:
            return
        await qmp.set_port_open(self.agent_port_id, open)

    async def _on_port_change(self, open: bool) -> None:
        await self._set_port(open)

    async def _on_guest_shutdown(self, mode: str) -> None:
        # The guest's shutdown stops qemu-ga (its port closes) before the machine powers off.
        await self._set_port(False)
        if mode == "reboot" and not self.no_reboot:
            await self.qmp.emit("RESET", {"guest": True, "reason": "guest-reset"})
            self._reset_guest()
            self._spawn(self._boot())
            return
        await self._shutdown("guest-reset" if mode == "reboot" else "guest-shutdown", guest=True)

    async def _shutdown(self, reason: str, *, guest: bool) -> None:
        qmp = self.qmp
        qmp.status = "shutdown"
        await qmp.emit("SHUTDOWN", {"guest": guest, "reason": reason})
        if not self.no_shutdown:
            # QEMU exits. Not from this task: it may be one the agent or QMP cancels on close.
            self._spawn(self._stop_processes())

    # ---------------------------------------------------------------------------- QMP model

    def _install_handlers(self, qmp: FakeQMPServer) -> None:
        base_transaction = qmp.handlers["transaction"]
        base_chardev = qmp.handlers["query-chardev"]

        async def transaction(call: FakeCall) -> Any:
            agent = self.agent
            frozen, mounts = agent.frozen, tuple(agent.frozen_mountpoints)
            actions = call.arguments.get("actions")
            try:
                result = base_transaction(call)
                if inspect.isawaitable(result):  # one with backup actions starts jobs
                    result = await result
            except FakeQMPError as exc:
                self.transactions.append(
                    TransactionRecord(_copy_list(actions), exc.desc, frozen, mounts, time.monotonic())
                )
                raise
            self.transactions.append(
                TransactionRecord(_copy_list(actions), None, frozen, mounts, time.monotonic())
            )
            return result

        def query_chardev(call: FakeCall) -> Any:
            agent, address = self.agent, self.agent.address
            where = f"unix:{address}" if isinstance(address, str) else "tcp:{}:{}".format(*address)
            prefix = "" if agent.connected else "disconnected:"
            qmp.chardevs[self.agent_chardev]["filename"] = f"{prefix}{where},server=on"
            qmp_where = (
                f"unix:{qmp.address}" if isinstance(qmp.address, str)
                else "tcp:{}:{}".format(*qmp.address)
            )
            qmp.chardevs["compat_monitor0"]["filename"] = f"{qmp_where},server=on"
            return base_chardev(call)

        async def stop(call: FakeCall) -> dict[str, Any]:
            await self.pause()
            return {}

        async def cont(call: FakeCall) -> dict[str, Any]:
            await self.resume()
            return {}

        async def system_reset(call: FakeCall) -> dict[str, Any]:
            await self.reboot(guest=False)
            return {}

        async def system_powerdown(call: FakeCall) -> dict[str, Any]:
            await qmp.emit("POWERDOWN")
            # ACPI: the guest shuts down (its agent first).
            self._spawn(self._guest_powerdown())
            return {}

        def quit_(call: FakeCall) -> dict[str, Any]:
            # The reply goes out first, then SHUTDOWN, then QEMU exits.
            self._spawn(self._shutdown("host-qmp-quit", guest=False))
            return {}

        qmp.handlers.update({
            "transaction": transaction,
            "query-chardev": query_chardev,
            "stop": stop,
            "cont": cont,
            "system_reset": system_reset,
            "system_powerdown": system_powerdown,
            "quit": quit_,
        })

    async def _guest_powerdown(self) -> None:
        await self._set_port(False)
        self.agent.close_port()
        await self._shutdown("guest-shutdown", guest=True)


def _copy_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else []

