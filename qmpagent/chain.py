"""A disk's backing chain: :func:`block_chain` (behind
:meth:`~qmpagent.SnapshotOrchestrator.chain`), :class:`ChainNode` and the block graph it is read
from.

``query-named-block-nodes`` names each node's backing *file*, not its backing node, and reports
``backing_file_depth`` 0 for every node when ``flat`` (docs/design.md section 4); the edges
between nodes come from ``x-debug-query-block-graph`` (``backing`` and ``file`` by node, and
which job or device uses a node). Where that command is missing, the chain is followed by file
name instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from ._monitor_api import MonitorAPI
from ._replies import member
from .block import BlockDevice, BlockNode
from .errors import MonitorCommandError, MonitorProtocolError, UsageError

if TYPE_CHECKING:
    from .monitor import Monitor

__all__ = ["BlockGraph", "ChainNode", "block_chain", "read_block_graph", "resolve_device"]

#: Protocol drivers: a node of one of these is the file under a format node, not a layer.
PROTOCOL_DRIVERS: Final = frozenset({
    "file", "host_device", "host_cdrom", "nbd", "iscsi", "rbd", "ssh", "http", "https",
    "null-co", "null-aio", "nvme", "gluster", "nfs", "blkdebug", "blkverify",
})


@dataclass(frozen=True, slots=True)
class ChainNode(BlockNode):
    """One image of a backing chain: a :class:`~qmpagent.BlockNode` with its neighbours.

    Attributes:
        file_node_name: the protocol node the image is read through (e.g. ``file0``), if known.
        backing_node_name: the node below it in the chain, None for the bottom.
        depth: 0 for the active layer, 1 for the image below it, ...
    """

    file_node_name: str | None = None
    backing_node_name: str | None = None
    depth: int = 0


@dataclass(frozen=True)
class BlockGraph:
    """QEMU's block graph (``x-debug-query-block-graph``), by node name.

    Attributes:
        children: node name -> {edge name (``"backing"``, ``"file"``, ...): child node name}.
        parents: node name -> the names of what uses it (nodes, job ids, ``""`` for devices).
        job_children: job id -> {edge name: node name} (``"target"``, ``"main node"``, ...).
    """

    children: dict[str, dict[str, str]] = field(default_factory=dict)
    parents: dict[str, list[str]] = field(default_factory=dict)
    job_children: dict[str, dict[str, str]] = field(default_factory=dict)


async def read_block_graph(mon: MonitorAPI) -> BlockGraph | None:
    """The block graph, or None if this QEMU has no ``x-debug-query-block-graph``.

    Raises:
        MonitorProtocolError: a reply of the wrong shape.
        MonitorError: the query failed otherwise.
    """
    what = "x-debug-query-block-graph"
    try:
        reply = await mon.execute(what)
    except MonitorCommandError as exc:
        if exc.error_class == "CommandNotFound":
            return None
        raise
    if not isinstance(reply, dict):
        raise MonitorProtocolError(f"{what}: expected an object, got {type(reply).__name__}")
    nodes, edges = reply.get("nodes"), reply.get("edges")
    if not isinstance(nodes, list) or not isinstance(edges, list):
        raise MonitorProtocolError(f"{what}: expected lists of nodes and edges")
    by_id: dict[object, tuple[str, str]] = {}
    for node in nodes:
        if not isinstance(node, dict):
            raise MonitorProtocolError(f"{what}: a node that is not an object: {node!r:.100}")
        kind = member(what, node, "type", str, required=True)
        name = member(what, node, "name", str) or ""
        by_id[node.get("id")] = (kind, name)
    graph = BlockGraph()
    for edge in edges:
        if not isinstance(edge, dict):
            raise MonitorProtocolError(f"{what}: an edge that is not an object: {edge!r:.100}")
        parent, child = by_id.get(edge.get("parent")), by_id.get(edge.get("child"))
        label = member(what, edge, "name", str) or ""
        if parent is None or child is None or child[0] != "block-driver":
            continue
        graph.parents.setdefault(child[1], []).append(parent[1])
        if parent[0] == "block-driver":
            graph.children.setdefault(parent[1], {})[label] = child[1]
        elif parent[0] == "block-job":
            graph.job_children.setdefault(parent[1], {})[label] = child[1]
    return graph


async def resolve_device(mon: Monitor, disk: str) -> tuple[BlockDevice | None, str]:
    """The device ``disk`` names (qdev id, QOM path, drive name, or the node name of its active
    layer) and its active node; ``(None, disk)`` for a node that is no device's active layer.

    Raises:
        UsageError: ``disk`` is not a string, or names neither a device nor a node.
        MonitorError: a query failed.
    """
    if not isinstance(disk, str) or not disk:
        raise UsageError(f"disk must be a device id or node name, not {disk!r}")
    devices = await mon.block_devices()
    for dev in devices:
        if disk in {dev.qdev_id, dev.qdev, dev.device} - {None, ""} or dev.node_name == disk:
            if dev.node_name is None:
                raise UsageError(f"device {disk!r} has no medium")
            return dev, dev.node_name
    nodes = await mon.named_block_nodes()
    if any(n.node_name == disk for n in nodes):
        return None, disk
    raise UsageError(f"no block device or node named {disk!r}")


def _format_node_of(nodes: Mapping[str, BlockNode], filename: str) -> str | None:
    # Without the graph: the format node whose image is that file (the file node under it
    # reports the same file name, hence the protocol drivers are left out).
    matches = [n.node_name for n in nodes.values()
               if n.filename == filename and n.driver not in PROTOCOL_DRIVERS]
    return matches[0] if len(matches) == 1 else None


def _file_node_of(nodes: Mapping[str, BlockNode], node: BlockNode) -> str | None:
    matches = [n.node_name for n in nodes.values()
               if n.filename == node.filename and n.driver in PROTOCOL_DRIVERS]
    return matches[0] if len(matches) == 1 else None


async def block_chain(mon: Monitor, disk: str) -> list[ChainNode]:
    """The backing chain of a device or node, active layer (or ``disk`` itself) first.

    Args:
        mon: a :class:`~qmpagent.Monitor`.
        disk: a device id (its active layer is the start), or a node name.

    Raises:
        UsageError: no such device or node.
        MonitorProtocolError: QEMU's replies have the wrong shape, or the chain loops.
        MonitorError: a query failed.
    """
    _, start = await resolve_device(mon, disk)
    nodes = {n.node_name: n for n in await mon.named_block_nodes()}
    graph = await read_block_graph(mon)
    return walk_chain(start, nodes, graph)


def walk_chain(start: str, nodes: Mapping[str, BlockNode], graph: BlockGraph | None) -> list[ChainNode]:
    """The chain from ``start`` down, from what ``query-named-block-nodes`` and the block graph
    (None: by file names) said.

    Raises:
        UsageError: ``start`` is not a node.
        MonitorProtocolError: the chain loops.
    """
    if start not in nodes:
        raise UsageError(f"no block node named {start!r}")
    chain: list[ChainNode] = []
    seen: set[str] = set()
    name: str | None = start
    while name is not None:
        if name in seen:
            raise MonitorProtocolError(f"the backing chain of {start!r} loops at {name!r}")
        seen.add(name)
        node = nodes.get(name)
        if node is None:
            raise MonitorProtocolError(f"the block graph names a node QEMU does not list: {name!r}")
        if graph is not None:
            edges = graph.children.get(name, {})
            backing = edges.get("backing")
            file_node = edges.get("file")
        else:
            backing = _format_node_of(nodes, node.backing_file) if node.backing_file else None
            file_node = _file_node_of(nodes, node)
        chain.append(ChainNode(
            node_name=node.node_name, driver=node.driver, filename=node.filename,
            backing_file=node.backing_file, read_only=node.read_only, format=node.format,
            virtual_size=node.virtual_size, raw=node.raw, file_node_name=file_node,
            backing_node_name=backing, depth=len(chain),
        ))
        name = backing
    return chain
