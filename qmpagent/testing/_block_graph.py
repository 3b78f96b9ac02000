"""The fake QEMU's block graph and the block layer over it: nodes, devices, ``blockdev-add``,
``blockdev-del``, ``blockdev-snapshot`` transactions (all or nothing), ``blockdev-create``'s
checks and work, and the ``query-named-block-nodes`` / ``query-block`` entries.
"""

from __future__ import annotations

import copy
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ._json_writer import qemu_json
from ._qcow2 import CLUSTER_SIZE, create_qcow2_image, read_qcow2_header
from ._qmp_error import FakeQMPError, generic_error

__all__ = ["BlockGraph", "BlockLayer", "FakeBlockDevice", "FakeBlockNode"]


_NODE_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_FORMAT_DRIVERS: Final = frozenset({"qcow2", "raw"})
_COMMON_OPTIONS: Final = frozenset(
    {"driver", "node-name", "discard", "cache", "read-only", "auto-read-only", "force-share",
     "detect-zeroes"}
)
_DRIVER_OPTIONS: Final[Mapping[str, frozenset[str]]] = {
    "file": frozenset({"filename", "pr-manager", "locking", "aio", "aio-max-batch", "drop-cache",
                       "x-check-cache-dropped"}),
    "qcow2": frozenset({"file", "backing", "lazy-refcounts", "pass-discard-request",
                        "pass-discard-snapshot", "pass-discard-other", "overlap-check",
                        "cache-size", "l2-cache-size", "l2-cache-entry-size",
                        "refcount-cache-size", "cache-clean-interval", "encrypt", "data-file"}),
    "raw": frozenset({"file", "offset", "size"}),
}
# QEMU 7.2's BlockdevDriver enum: valid names the fake does not model get a clear error.
_QEMU_DRIVERS: Final = frozenset(
    {"blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
     "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
     "gluster", "host_cdrom", "host_device", "http", "https", "io_uring", "iscsi", "luks", "nbd",
     "nfs", "null-aio", "null-co", "nvme", "nvme-io_uring", "parallels", "preallocate", "qcow",
     "qcow2", "qed", "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx",
     "virtio-blk-vfio-pci", "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa", "vmdk", "vpc",
     "vvfat"}
)
_CREATE_OPTIONS: Final[Mapping[str, frozenset[str]]] = {
    "file": frozenset({"driver", "filename", "size", "preallocation", "nocow",
                       "extent-size-hint"}),
    "qcow2": frozenset({"driver", "file", "data-file", "data-file-raw", "extended-l2", "size",
                        "version", "backing-file", "backing-fmt", "encrypt", "cluster-size",
                        "preallocation", "lazy-refcounts", "refcount-bits", "compression-type"}),
}


@dataclass
class FakeBlockNode:
    """A node of the fake block graph (see :attr:`FakeQMPServer.nodes`).

    Attributes:
        node_name: the node name (``#block...`` for nodes QEMU named itself).
        driver: ``"file"`` (a protocol node) or a format (``"qcow2"``, ``"raw"``).
        filename: the image file (a protocol node's path; a format node's file's path).
        file: a format node's ``file`` child (a node name), else ``None``.
        backing: the backing child (a node name), or ``None``.
        read_only: opened read-only (QEMU reopens a node read-only when it becomes a backing
            node in a snapshot).
        virtual_size: a format node's size; a protocol node's length when its file does not
            exist on disk (else the file's length is reported).
        header_backing_file: the backing file recorded in the image, or ``None``.
        header_backing_format: its format, recorded in the image, or ``None``.
        backing_file: QEMU's ``backing_file`` of the node: the backing file it was opened
            with (``None`` when added with ``backing: null``, until a snapshot gives it one).
        backing_null: added with ``backing: null``.
        auto_named: QEMU named it (an implicitly opened node, e.g. of a backing chain).
        monitor_owned: added by ``blockdev-add`` (or ``-blockdev``): ``blockdev-del`` may
            delete it.
    """

    node_name: str
    driver: str
    filename: str
    file: str | None = None
    backing: str | None = None
    read_only: bool = False
    virtual_size: int = 0
    header_backing_file: str | None = None
    header_backing_format: str | None = None
    backing_file: str | None = None
    backing_null: bool = False
    auto_named: bool = False
    monitor_owned: bool = True


@dataclass
class FakeBlockDevice:
    """A block device (a ``BlockBackend`` attached to a guest device) of the fake block graph.

    Attributes:
        device_id: the qdev id of the device (e.g. ``"vblk0"``).
        root: the node name of its root (active) node, or ``None`` (no medium).
        qdev: the path ``query-block`` reports as ``qdev``.
    """

    device_id: str
    root: str | None
    qdev: str = ""

    def __post_init__(self) -> None:
        if not self.qdev:
            self.qdev = f"/machine/peripheral/{self.device_id}/virtio-backend"


class BlockGraph:
    """The node graph and the block devices; copied for an all-or-nothing transaction."""

    def __init__(self) -> None:
        self.nodes: dict[str, FakeBlockNode] = {}  # insertion order: QEMU's graph_bdrv_states
        self.devices: dict[str, FakeBlockDevice] = {}

    def copy(self) -> BlockGraph:
        """A copy to change (the nodes and devices copied, one level deep)."""
        clone = BlockGraph()
        clone.nodes = {k: copy.copy(v) for k, v in self.nodes.items()}
        clone.devices = {k: copy.copy(v) for k, v in self.devices.items()}
        return clone

    def lookup(self, name: str) -> FakeBlockNode:
        """The node ``name``; raises :class:`FakeQMPError` as QEMU does if there is none."""
        node = self.nodes.get(name)
        if node is None:
            raise generic_error(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    def parents(self, name: str) -> list[tuple[str, str]]:
        """``(parent, role)`` pairs: ``role`` is ``"file"``, ``"backing"`` or ``"device"``."""
        found = [(d.device_id, "device") for d in self.devices.values() if d.root == name]
        for node in self.nodes.values():
            if node.file == name:
                found.append((node.node_name, "file"))
            if node.backing == name:
                found.append((node.node_name, "backing"))
        return found

    def has_device(self, name: str) -> bool:
        """Whether a block device has ``name`` as its root."""
        return any(d.root == name for d in self.devices.values())

    def backing_parent(self, name: str) -> str | None:
        """The node that has ``name`` as its backing node, if any."""
        for node in self.nodes.values():
            if node.backing == name:
                return node.node_name
        return None


def strerror(exc: OSError) -> str:
    """An ``OSError`` as QEMU words it (``strerror(errno)``)."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _file_length(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _actual_size(path: str) -> int | None:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None




class BlockLayer:
    """QEMU's block layer over one :class:`BlockGraph`: the commands' checks and effects, and
    the node listings, with QEMU 7.2's error texts. Knows nothing of QMP or QOM: the server
    answers with it and keeps its QOM tree in step.

    Args:
        node_active: list node entries with ``active`` (QEMU 10.0).
    """

    def __init__(self, *, node_active: bool = False) -> None:
        #: The current graph (replaced as a whole by an all-or-nothing transaction).
        self.graph = BlockGraph()
        #: Whether node entries have ``active`` (QEMU 10.0).
        self.node_active = node_active
        self._auto_counter = 0
        self._random = random.Random()

    def add_disk(self, node_name: str, file_node_name: str, filename: str) -> None:
        """Add a qcow2 node on a file node without touching the disk (64 MiB virtual size)."""
        g = self.graph
        g.nodes[file_node_name] = FakeBlockNode(file_node_name, "file", filename, virtual_size=393216)
        g.nodes[node_name] = FakeBlockNode(
            node_name, "qcow2", filename, file=file_node_name, virtual_size=67108864
        )

    def attach_device(self, device_id: str, node_name: str) -> FakeBlockDevice:
        """Give block device ``device_id`` the root node ``node_name``.

        Raises:
            FakeQMPError: no such node.
        """
        self.graph.lookup(node_name)
        device = FakeBlockDevice(device_id, node_name)
        self.graph.devices[device_id] = device
        return device

    def blockdev_del(self, node_name: str) -> None:
        """Delete a node as ``blockdev-del`` does.

        Raises:
            FakeQMPError: what QEMU would answer.
        """
        g = self.graph
        node = g.nodes.get(node_name)
        if node is None:
            raise generic_error(f"Failed to find node with node-name='{node_name}'")
        if g.has_device(node_name):
            raise generic_error(f"Node {node_name} is in use")
        backing_parent = g.backing_parent(node_name)
        if backing_parent is not None:
            raise generic_error(
                f"Node '{node_name}' is busy: node is used as backing hd of '{backing_parent}'"
            )
        if not node.monitor_owned:
            raise generic_error(f"Node {node_name} is not owned by the monitor")
        if g.parents(node_name):
            raise generic_error(f"Block device {node_name} is in use")
        self._remove_node(g, node_name)

    @staticmethod
    def _remove_node(g: BlockGraph, node_name: str) -> None:
        node = g.nodes.pop(node_name)
        for child in (node.file, node.backing):
            if child is None or child not in g.nodes:
                continue
            if not g.nodes[child].monitor_owned and not g.parents(child):
                BlockLayer._remove_node(g, child)

    def snapshot(self, actions: Sequence[Mapping[str, Any]]) -> None:
        """Apply ``blockdev-snapshot`` actions as one ``transaction``: all or nothing.

        Raises:
            FakeQMPError: what QEMU would answer (nothing was applied).
        """
        work = self.graph.copy()
        for action in actions:
            self._blockdev_snapshot(work, action)
        self.graph = work

    # node info (query-named-block-nodes, query-block) ------------------------------------------

    def _reported_filename(self, node: FakeBlockNode, g: BlockGraph | None = None) -> str:
        g = self.graph if g is None else g
        child = g.nodes.get(node.file) if node.file is not None else None
        if node.driver == "file":
            return node.filename
        simple = child is not None and child.driver == "file" and not (
            node.backing_null and node.backing is None
        )
        if simple and child is not None:
            return child.filename
        return "json:" + qemu_json(self._json_options(node, g))

    def _json_options(self, node: FakeBlockNode, g: BlockGraph) -> dict[str, Any]:
        if node.driver == "file":
            return {"driver": "file", "filename": node.filename}
        options: dict[str, Any] = {}
        if node.backing_null and node.backing is None:
            options["backing"] = None
        options["driver"] = node.driver
        child = g.nodes.get(node.file) if node.file is not None else None
        options["file"] = self._json_options(child, g) if child is not None else None
        return options

    def _image_info(self, node: FakeBlockNode, flat: bool) -> dict[str, Any]:
        g = self.graph
        if node.driver == "file":
            length = _file_length(node.filename)
            # QEMU reports a protocol node's length in whole 512-byte sectors.
            size = -(-length // 512) * 512 if length is not None else node.virtual_size
            actual = _actual_size(node.filename)
            return {
                "filename": node.filename, "format": "file", "dirty-flag": False,
                "actual-size": actual if actual is not None else size, "virtual-size": size,
            }
        child = g.nodes.get(node.file) if node.file is not None else None
        actual = _actual_size(child.filename) if child is not None else None
        info: dict[str, Any] = {
            "filename": self._reported_filename(node),
            "format": node.driver,
            "dirty-flag": False,
            "actual-size": actual if actual is not None else 0,
            "virtual-size": node.virtual_size,
        }
        if node.driver == "qcow2":
            info["cluster-size"] = CLUSTER_SIZE
        if node.header_backing_file:
            info["backing-filename"] = node.header_backing_file
            info["full-backing-filename"] = node.header_backing_file
            if node.header_backing_format:
                info["backing-filename-format"] = node.header_backing_format
        if not flat and node.backing is not None and node.backing in g.nodes:
            info["backing-image"] = self._image_info(g.nodes[node.backing], flat)
        if node.driver == "qcow2":
            info["format-specific"] = {"type": "qcow2", "data": {
                "compat": "1.1", "compression-type": "zlib", "lazy-refcounts": False,
                "refcount-bits": 16, "corrupt": False, "extended-l2": False,
            }}
        return info

    def node_info(self, node_name: str, *, flat: bool = True) -> dict[str, Any]:
        """The ``query-named-block-nodes`` entry of a node (``BlockDeviceInfo``).

        As in QEMU, ``backing_file_depth`` is 0 and there is no ``backing-image`` when
        ``flat``.

        Raises:
            KeyError: no such node.
        """
        g = self.graph
        node = g.nodes[node_name]
        depth = 0
        if not flat:
            cursor = node
            while cursor.backing is not None and cursor.backing in g.nodes:
                depth += 1
                cursor = g.nodes[cursor.backing]
        info: dict[str, Any] = {
            "file": self._reported_filename(node),
            "node-name": node.node_name,
            "ro": node.read_only,
            "drv": node.driver,
        }
        if node.backing_file:
            info["backing_file"] = node.backing_file
        info.update({
            "backing_file_depth": depth,
            "encrypted": False,
            "detect_zeroes": "off",
            **({"active": True} if self.node_active else {}),
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "image": self._image_info(node, flat),
            "cache": {"writeback": True, "direct": False, "no-flush": False},
            "write_threshold": 0,
        })
        return info

    def device_info(self, device: FakeBlockDevice) -> dict[str, Any]:
        """The ``query-block`` entry of ``device``."""
        info: dict[str, Any] = {
            "device": "",
            "qdev": device.qdev,
            "type": "unknown",
            "removable": False,
            "locked": False,
        }
        if device.root is not None and device.root in self.graph.nodes:
            info["inserted"] = self.node_info(device.root, flat=False)
        info["io-status"] = "ok"
        return info

    # blockdev-add ---------------------------------------------------------------------------

    def _auto_name(self) -> str:
        name = f"#block{self._auto_counter}{self._random.randrange(100):02d}"
        self._auto_counter += 1
        return name

    def _check_node_name(self, name: str) -> None:
        if not _NODE_NAME_RE.match(name):
            raise generic_error(f"Invalid node-name: '{name}'")
        if name in self.graph.nodes:
            raise generic_error(f"Duplicate nodes with node-name='{name}'")
        if len(name) >= 32:
            raise generic_error("Node name too long")

    @staticmethod
    def _check_options(options: Mapping[str, Any], allowed: frozenset[str], prefix: str = "") -> None:
        for key in options:
            if key not in allowed:
                raise generic_error(f"Parameter '{prefix}{key}' is unexpected")

    @classmethod
    def _check_cache(cls, cache: object) -> None:
        """``cache`` as QEMU checks it (BlockdevCacheOptions); the fake's I/O ignores it."""
        if cache is None:
            return
        if not isinstance(cache, dict):
            raise generic_error("Invalid parameter type for 'cache', expected: object")
        cls._check_options(cache, frozenset({"direct", "no-flush"}), prefix="cache.")
        for key, value in cache.items():
            if not isinstance(value, bool):
                raise generic_error(f"Invalid parameter type for 'cache.{key}', expected: boolean")

    def add(self, options: dict[str, Any], *, auto: bool = False) -> FakeBlockNode:
        """Add a node as ``blockdev-add`` does (``auto``: QEMU names it); return it."""
        driver = options.get("driver")
        if driver is None:
            raise generic_error("Parameter 'driver' is missing")
        if not isinstance(driver, str):
            raise generic_error("Invalid parameter type for 'driver', expected: string")
        if driver not in _QEMU_DRIVERS:
            raise generic_error(f"Parameter 'driver' does not accept value '{driver}'")
        if driver not in _DRIVER_OPTIONS:
            raise generic_error(f"fake QMP: block driver '{driver}' is not modelled")
        self._check_options(options, _COMMON_OPTIONS | _DRIVER_OPTIONS[driver])
        self._check_cache(options.get("cache"))
        read_only = options.get("read-only", False)
        if not isinstance(read_only, bool):
            raise generic_error("Invalid parameter type for 'read-only', expected: boolean")
        name = options.get("node-name")
        named = name is not None
        if name is None:
            if not auto:
                raise generic_error("'node-name' must be specified for the root node")
            name = self._auto_name()
        elif not isinstance(name, str):
            raise generic_error("Invalid parameter type for 'node-name', expected: string")
        if driver == "file":
            return self._add_file_node(options, name, read_only, auto, named)
        return self._add_format_node(options, driver, name, read_only, auto, named)

    def _add_file_node(
        self, options: Mapping[str, Any], name: str, read_only: bool, auto: bool, named: bool
    ) -> FakeBlockNode:
        filename = options.get("filename")
        if filename is None:
            raise generic_error("Parameter 'filename' is missing")
        if not isinstance(filename, str):
            raise generic_error("Invalid parameter type for 'filename', expected: string")
        if named:
            self._check_node_name(name)
        try:
            fd = os.open(filename, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as exc:
            raise generic_error(f"Could not open '{filename}': {strerror(exc)}") from None
        os.close(fd)
        node = FakeBlockNode(name, "file", filename, read_only=read_only, auto_named=not named,
                             monitor_owned=not auto)
        self.graph.nodes[name] = node
        return node

    def _add_format_node(
        self, options: Mapping[str, Any], driver: str, name: str, read_only: bool, auto: bool,
        named: bool,
    ) -> FakeBlockNode:
        g = self.graph
        file_ref = options.get("file")
        if file_ref is None:
            raise generic_error("Parameter 'file' is missing")
        if named:
            self._check_node_name(name)
        created_child = False
        if isinstance(file_ref, str):
            child = g.lookup(file_ref)
        elif isinstance(file_ref, dict):
            child = self.add(dict(file_ref), auto=True)
            created_child = True
        else:
            raise generic_error("Invalid parameter type for 'file', expected: BlockdevRef")
        try:
            if not read_only:
                for parent, role in g.parents(child.node_name):
                    if role == "file" and not g.nodes[parent].read_only:
                        raise generic_error(
                            f"Permission conflict on node '{child.node_name}': permissions "
                            f"'write, resize' are both required by node '{parent}' (uses node "
                            f"'{child.node_name}' as 'file' child) and unshared by node "
                            f"'{name}' (uses node '{child.node_name}' as 'file' child)."
                        )
            node = FakeBlockNode(name, driver, child.filename, file=child.node_name,
                                 read_only=read_only, auto_named=not named, monitor_owned=not auto)
            if driver == "raw":
                length = _file_length(child.filename)
                node.virtual_size = length if length is not None else child.virtual_size
                g.nodes[name] = node
                return node
            try:
                header = read_qcow2_header(child.filename)
            except OSError as exc:
                raise generic_error(f"Could not read image: {strerror(exc)}") from None
            except ValueError as exc:
                raise generic_error(str(exc)) from None
            node.virtual_size = header.size
            node.header_backing_file = header.backing_file
            node.header_backing_format = header.backing_format
            backing = options.get("backing", ...)
            g.nodes[name] = node
            try:
                if backing is None:
                    node.backing_null = True
                elif isinstance(backing, str):
                    target = g.lookup(backing)
                    node.backing = target.node_name
                    node.backing_file = self._reported_filename(target)
                elif backing is ... and header.backing_file:
                    node.backing = self._open_backing(header.backing_file, header.backing_format)
                    node.backing_file = header.backing_file
                elif backing is not ...:
                    raise generic_error("fake QMP: only a node name or null is modelled for 'backing'")
            except BaseException:
                g.nodes.pop(name, None)
                raise
            return node
        except BaseException:
            if created_child:
                g.nodes.pop(child.node_name, None)
            raise

    def _open_backing(self, filename: str, fmt: str | None) -> str:
        """Open a backing chain from an image's header, as QEMU does (auto-named, read-only)."""
        for other in self.graph.nodes.values():
            if (
                other.driver == "file" and other.filename == filename and not other.read_only
                and self.graph.parents(other.node_name)
            ):
                raise generic_error('Could not open backing file: Failed to get shared "write" lock')
        try:
            node = self.add(
                {"driver": fmt or "qcow2", "read-only": True,
                 "file": {"driver": "file", "filename": filename, "read-only": True}},
                auto=True,
            )
        except FakeQMPError as exc:
            raise generic_error(f"Could not open backing file: {exc.desc}") from None
        return node.node_name

    # transaction ------------------------------------------------------------------------------

    def _blockdev_snapshot(self, g: BlockGraph, action: Mapping[str, Any]) -> None:
        kind = action.get("type")
        if kind is None:
            raise generic_error("Parameter 'type' is missing")
        if kind == "abort":
            raise generic_error("Transaction aborted using Abort action")
        if kind != "blockdev-snapshot":
            raise generic_error(f"fake QMP: transaction action '{kind}' is not modelled")
        data = action.get("data")
        if not isinstance(data, dict):
            raise generic_error("Parameter 'data' is missing")
        for key in ("node", "overlay"):
            if key not in data:
                raise generic_error(f"Parameter 'data.{key}' is missing")
            if not isinstance(data[key], str):
                raise generic_error(f"Invalid parameter type for 'data.{key}', expected: string")
        old = g.lookup(data["node"])
        parent = g.backing_parent(old.node_name)
        if parent is not None:
            raise generic_error(f"Node '{old.node_name}' is busy: node is used as backing hd of '{parent}'")
        new = g.lookup(data["overlay"])
        if g.parents(new.node_name):
            raise generic_error("The overlay is already in use")
        if new.backing is not None:
            raise generic_error("The overlay already has a backing image")
        if new.driver != "qcow2":
            raise generic_error("The overlay does not support backing images")
        # bdrv_append(): every parent of the old node now uses the overlay, whose backing
        # node the old one becomes (reopened read-only).
        for device in g.devices.values():
            if device.root == old.node_name:
                device.root = new.node_name
        for node in g.nodes.values():
            if node is new:
                continue
            if node.file == old.node_name:
                node.file = new.node_name
            if node.backing == old.node_name:
                node.backing = new.node_name
        new.backing = old.node_name
        new.backing_file = self._reported_filename(old, g)
        old.read_only = True


    def create_work(self, options: Mapping[str, Any]) -> Callable[[], str | None]:
        """Check ``blockdev-create`` options like QEMU's QAPI layer; return the job's work."""
        driver = options.get("driver")
        if driver is None:
            raise generic_error("Parameter 'options.driver' is missing")
        if not isinstance(driver, str):
            raise generic_error("Invalid parameter type for 'options.driver', expected: string")
        if driver not in _QEMU_DRIVERS:
            raise generic_error(f"Parameter 'options.driver' does not accept value '{driver}'")
        allowed = _CREATE_OPTIONS.get(driver, frozenset({"driver"}))
        self._check_options(options, allowed, "options.")
        if driver not in _CREATE_OPTIONS:
            raise generic_error("Driver does not support blockdev-create")
        size = options.get("size")
        if size is None:
            raise generic_error("Parameter 'options.size' is missing")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise generic_error("Invalid parameter type for 'options.size', expected: integer")
        if driver == "file":
            filename = options.get("filename")
            if filename is None:
                raise generic_error("Parameter 'options.filename' is missing")
            if not isinstance(filename, str):
                raise generic_error("Invalid parameter type for 'options.filename', expected: string")
            return lambda: _create_file(filename, size)
        file_ref = options.get("file")
        if file_ref is None:
            raise generic_error("Parameter 'options.file' is missing")
        if not isinstance(file_ref, str):
            raise generic_error("fake QMP: only a node name is modelled for 'options.file'")
        backing_file = options.get("backing-file")
        backing_fmt = options.get("backing-fmt")
        for key, value in (("backing-file", backing_file), ("backing-fmt", backing_fmt)):
            if value is not None and not isinstance(value, str):
                raise generic_error(f"Invalid parameter type for 'options.{key}', expected: string")

        def work() -> str | None:
            node = self.graph.nodes.get(file_ref)
            if node is None:
                return f"Cannot find device='{file_ref}' nor node-name='{file_ref}'"
            if node.driver != "file":
                return f"fake QMP: node '{file_ref}' is not a file node"
            if size % 512:
                return "Image size must be a multiple of 512 bytes"
            try:
                create_qcow2_image(node.filename, size, backing_file=backing_file,
                                   backing_format=backing_fmt)
            except OSError as exc:
                return f"Could not write qcow2 header: {strerror(exc)}"
            return None

        return work




def _create_file(filename: str, size: int) -> str | None:
    """``blockdev-create`` driver ``file``: create (or truncate) the file, like QEMU."""
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        return f"Could not create '{filename}': {strerror(exc)}"
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
    except OSError as exc:
        return f"Could not resize file: {strerror(exc)}"
    finally:
        os.close(fd)
    return None
