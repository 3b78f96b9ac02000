"""Block queries a snapshot needs: :class:`BlockQueries` (behind
:meth:`~qmpagent.Monitor.named_block_nodes`, :meth:`~qmpagent.Monitor.block_devices` and
:meth:`~qmpagent.Monitor.device_node_name`), and the :class:`BlockNode` and
:class:`BlockDevice` they return, checked against QEMU's schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._monitor_api import MonitorAPI
from ._replies import entries, member
from .errors import MonitorCommandError, UsageError

__all__ = ["BlockDevice", "BlockNode", "BlockQueries"]


@dataclass(frozen=True, slots=True)
class BlockNode:
    """A named block node, from ``query-named-block-nodes``.

    Attributes:
        node_name: the node name (``#block123`` for nodes QEMU named itself).
        driver: the block driver (``"qcow2"``, ``"file"``, ...).
        filename: the node's file name as QEMU reports it.
        backing_file: the backing file name, if the node has one.
        read_only: whether the node is read-only.
        format: the image format (``image.format``), if reported.
        virtual_size: the image's virtual size in bytes, if reported.
        raw: the whole entry as QEMU sent it.
    """

    node_name: str
    driver: str
    filename: str
    backing_file: str | None
    read_only: bool
    format: str | None
    virtual_size: int | None
    raw: Mapping[str, Any] = field(repr=False, compare=False, hash=False)

    @property
    def auto_named(self) -> bool:
        """Whether QEMU generated the node name (it starts with ``#``). Raises nothing."""
        return self.node_name.startswith("#")


@dataclass(frozen=True, slots=True)
class BlockDevice:
    """A block backend, from ``query-block``.

    Attributes:
        device: the legacy drive name, or ``None`` for devices attached with ``-blockdev``.
        qdev: the qdev id or, for devices without an id, QOM path of the attached device
            (e.g. ``"/machine/peripheral/vblk0/virtio-backend"``).
        qdev_id: the id of the user-created device, derived from ``qdev`` (e.g. ``"vblk0"``).
        node_name: the root (format) node of the inserted medium, or ``None`` if empty.
        filename: the inserted medium's file name, if any.
        driver: the inserted root node's driver, if any.
        raw: the whole entry as QEMU sent it.
    """

    device: str | None
    qdev: str | None
    qdev_id: str | None
    node_name: str | None
    filename: str | None
    driver: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False, hash=False)


class BlockQueries:
    """The block queries of one QEMU, through ``mon`` (its public API only)."""

    __slots__ = ("_flat", "_mon")

    def __init__(self, mon: MonitorAPI) -> None:
        self._mon = mon
        self._flat = True  # query-named-block-nodes takes "flat" (QEMU >= 5.0), until refused

    async def named_block_nodes(self) -> list[BlockNode]:
        """See :meth:`~qmpagent.Monitor.named_block_nodes`."""
        what = "query-named-block-nodes"
        nodes: Any = None
        if self._flat:
            try:
                nodes = await self._mon.execute(what, {"flat": True})
            except MonitorCommandError as exc:
                if exc.error_class != "GenericError" or "flat" not in exc.desc:
                    raise
                self._flat = False  # QEMU < 5.0
        if not self._flat:
            nodes = await self._mon.execute(what)
        result = []
        for raw in entries(what, nodes):
            image = member(what, raw, "image", dict)
            if image is None:
                image = {}
            result.append(BlockNode(
                node_name=member(what, raw, "node-name", str, required=True),
                driver=member(what, raw, "drv", str, required=True),
                filename=member(what, raw, "file", str) or "",
                backing_file=member(what, raw, "backing_file", str) or None,
                read_only=bool(member(what, raw, "ro", bool)),
                format=member(what + " image", image, "format", str),
                virtual_size=member(what + " image", image, "virtual-size", int),
                raw=raw,
            ))
        return result

    async def block_devices(self) -> list[BlockDevice]:
        """See :meth:`~qmpagent.Monitor.block_devices`."""
        what = "query-block"
        result = []
        for raw in entries(what, await self._mon.execute(what)):
            inserted = member(what, raw, "inserted", dict)
            if inserted is None:
                inserted = {}
            qdev = member(what, raw, "qdev", str) or None
            result.append(BlockDevice(
                device=member(what, raw, "device", str) or None,
                qdev=qdev,
                qdev_id=_qdev_id(qdev),
                node_name=member(what + " inserted", inserted, "node-name", str),
                filename=member(what + " inserted", inserted, "file", str),
                driver=member(what + " inserted", inserted, "drv", str),
                raw=raw,
            ))
        return result

    async def device_node_name(self, device: str) -> str:
        """See :meth:`~qmpagent.Monitor.device_node_name`."""
        if not isinstance(device, str):
            raise UsageError(f"device must be a string, not {type(device).__name__}")
        def matches(dev: BlockDevice) -> bool:
            if device in (dev.qdev_id, dev.qdev, dev.device):
                return True
            # a QOM path above the block device: "/machine/peripheral/vblk0"
            return device.startswith("/") and dev.qdev is not None and dev.qdev.startswith(
                device.rstrip("/") + "/"
            )

        for dev in await self.block_devices():
            if matches(dev):
                if dev.node_name is None:
                    raise MonitorCommandError(
                        "query-block", "GenericError", f"device {device!r} has no medium"
                    )
                return dev.node_name
        raise MonitorCommandError(
            "query-block", "DeviceNotFound", f"no block device {device!r}"
        )


def _qdev_id(qdev: object) -> str | None:
    if not isinstance(qdev, str) or not qdev:
        return None
    if not qdev.startswith("/"):
        return qdev
    prefix = "/machine/peripheral/"
    if qdev.startswith(prefix):
        return qdev[len(prefix):].split("/", 1)[0] or None
    return None
