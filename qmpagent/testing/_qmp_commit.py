"""The fake QEMU's active commit: ``block-commit`` (a two-phase job: ``running`` -> ``ready``
-> ``block-job-complete`` pivots), ``block-job-complete``, ``block-job-cancel``,
``block-job-set-speed``, and ``x-debug-query-block-graph`` (the edges, jobs' included).

The copy is modelled by rates, not bytes: the job copies ``commit_rate`` bytes a second
(capped by its ``speed``) of ``commit_size`` bytes, while the guest dirties
``guest_write_rate`` bytes a second more (attributes of the server, changeable while the job
runs). A guest that writes as fast as the job copies keeps it from ever becoming ready, as a
real active commit under heavy writes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ._block_graph import BlockGraph
from ._faults import FaultKind
from ._qmp_error import FakeQMPError, generic_error
from ._qmp_jobs import FakeJob

if TYPE_CHECKING:  # the server imports this module: its types only for the checker
    from .fake_qmp import FakeCall, FakeQMPServer, Handler

__all__ = ["FakeCommitJob", "block_graph", "commit_handlers"]

_TICK: Final = 0.01


@dataclass
class FakeCommitJob(FakeJob):
    """An active commit job of the fake server (``type`` ``"commit"``).

    Attributes:
        device: the qdev id of the device whose active layer is committed.
        top: the active node (merged from).
        base: the node merged into.
        intermediates: the nodes between them, top first.
        speed: the speed limit in bytes per second (0: none).
        current: bytes copied.
        total: bytes to copy (grows while the guest writes).
        pivot: ``block-job-complete`` was asked for (it pivots when it concludes).
    """

    device: str = ""
    top: str = ""
    base: str = ""
    intermediates: list[str] = field(default_factory=list)
    speed: int = 0
    current: float = 0.0
    total: float = 0.0
    pivot: bool = False
    _complete: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _force: bool = field(default=True, repr=False)

    def info(self) -> dict[str, Any]:
        """The job as ``query-jobs`` shows it. Raises nothing."""
        info: dict[str, Any] = {
            "id": self.id, "type": "commit", "status": self.status,
            "current-progress": int(self.current), "total-progress": int(self.total),
        }
        if self.status == "concluded" and self.error is not None:
            info["error"] = self.error
        return info

    def block_info(self) -> dict[str, Any]:
        """The ``BLOCK_JOB_*`` event data of the job."""
        return {"device": self.id, "len": int(self.total), "offset": int(self.current),
                "speed": self.speed, "type": "commit"}


def _device_of(g: BlockGraph, node: str) -> str | None:
    for dev in g.devices.values():
        if dev.root == node:
            return dev.device_id
    return None


def _chain_below(g: BlockGraph, top: str) -> list[str]:
    chain, name = [], g.nodes[top].backing
    while name is not None and name in g.nodes and name not in chain:
        chain.append(name)
        name = g.nodes[name].backing
    return chain


def _busy(server: FakeQMPServer, node: str) -> FakeCommitJob | None:
    for job in server.jobs.values():
        if isinstance(job, FakeCommitJob) and job.status not in ("concluded", "null") and (
            node in (job.top, job.base) or node in job.intermediates
        ):
            return job
    return None


def _find(server: FakeQMPServer, call: FakeCall, key: str = "device") -> FakeCommitJob:
    job_id = call.arg(key, str)
    job = server.jobs.get(job_id)
    if not isinstance(job, FakeCommitJob):
        raise FakeQMPError("DeviceNotActive", f"Block job '{job_id}' not found")
    return job


def _verb(job: FakeJob, verb: str) -> FakeQMPError:
    return generic_error(f"Job '{job.id}' in state '{job.status}' cannot accept command verb '{verb}'")


def commit_handlers(server: FakeQMPServer, on_pivot: Callable[[FakeCommitJob], None]) -> dict[str, Handler]:
    """The commit commands of ``server``; ``on_pivot(job)`` keeps the server's QOM in step."""

    async def block_commit(call: FakeCall) -> dict[str, Any]:
        allowed = {"job-id", "device", "base-node", "base", "top-node", "top", "speed",
                   "auto-dismiss", "auto-finalize", "backing-file", "filter-node-name",
                   "on-error", "backing-mask-protocol"}
        for key in call.arguments:
            if key not in allowed:
                raise generic_error(f"Parameter '{key}' is unexpected")
        g = server.nodes_graph()
        top = call.arg("device", str)
        if top not in g.nodes:
            raise generic_error(f"Cannot find device='{top}' nor node-name='{top}'")
        device = _device_of(g, top)
        if call.arguments.get("top-node") not in (None, top) or device is None:
            raise generic_error("fake QMP: only an active commit (of a device's root) is modelled")
        job_id = call.arg("job-id", str, top)
        if job_id in server.jobs:
            raise generic_error(f"Job ID '{job_id}' already in use")
        below = _chain_below(g, top)
        base = call.arg("base-node", str, below[-1] if below else None)
        if base is None or base not in g.nodes:
            raise generic_error(f"Cannot find device='' nor node-name='{base}'")
        if base not in below:
            raise generic_error(f"'{base}' is not in this backing file chain")
        if call.arguments.get("auto-dismiss", True) is not False:
            raise generic_error("fake QMP: only auto-dismiss: false is modelled for block-commit")
        if _busy(server, top) is not None:
            # QEMU: the running job's filter node sits above the top now
            raise generic_error("Need a root block node")
        for node in below[:below.index(base) + 1]:
            if _busy(server, node) is not None:
                raise generic_error(f"Node '{node}' is busy: block device is in use by block job: commit")
        speed = call.arg("speed", int, 0)
        if speed < 0:
            raise generic_error("Parameter 'speed' expects a non-negative value")
        job = FakeCommitJob(job_id, "commit", device=device, top=top, base=base,
                            intermediates=below[:below.index(base)], speed=speed,
                            total=float(server.commit_size))
        if call.fault is not None and call.fault.kind is FaultKind.JOB_ERROR:
            job.error = call.fault.desc
        server.jobs[job_id] = job
        await _set(server, job, "created")
        await _set(server, job, "running")
        job._task = asyncio.ensure_future(_run(server, job, on_pivot))
        return {}

    async def block_job_complete(call: FakeCall) -> dict[str, Any]:
        job = _find(server, call)
        if job.status not in ("ready", "standby"):
            raise _verb(job, "complete")
        job.pivot = True
        job._complete.set()
        return {}

    def block_job_cancel(call: FakeCall) -> dict[str, Any]:
        job = _find(server, call)
        if job.status in ("concluded", "aborting", "null"):
            raise _verb(job, "cancel")
        job._force = call.arg("force", bool, False) or job.status not in ("ready", "standby")
        job.cancel()
        return {}

    def block_job_set_speed(call: FakeCall) -> dict[str, Any]:
        job = _find(server, call)
        speed = call.arg("speed", int)
        if speed < 0:
            raise generic_error("Parameter 'speed' expects a non-negative value")
        job.speed = speed
        return {}

    def x_debug_query_block_graph(call: FakeCall) -> dict[str, Any]:
        return block_graph(server)

    return {
        "block-commit": block_commit,
        "block-job-complete": block_job_complete,
        "block-job-cancel": block_job_cancel,
        "block-job-set-speed": block_job_set_speed,
        "x-debug-query-block-graph": x_debug_query_block_graph,
    }


async def _set(server: FakeQMPServer, job: FakeJob, status: str) -> None:
    job.status = status
    await server.emit("JOB_STATUS_CHANGE", {"id": job.id, "status": status})


async def _run(server: FakeQMPServer, job: FakeCommitJob, on_pivot: Callable[[FakeCommitJob], None]) -> None:
    await asyncio.sleep(0)  # the command's reply goes out first
    last = time.monotonic()
    while job.error is None and not job._cancelled.is_set() and not job._complete.is_set():
        await asyncio.sleep(_TICK)
        now = time.monotonic()
        dt, last = now - last, now
        rate = float(server.commit_rate)
        if job.speed:
            rate = min(rate, float(job.speed))
        job.total += server.guest_write_rate * dt
        job.current = min(job.total, job.current + rate * dt)
        if job.status == "running" and job.current >= job.total:
            await _set(server, job, "ready")
            await server.emit("BLOCK_JOB_READY", job.block_info())
    cancelled = job._cancelled.is_set()
    if job.error is not None or (cancelled and job._force):
        # QEMU's order: aborting, the block job's event, concluded.
        job.error = job.error or "Operation canceled"
        await _set(server, job, "aborting")
        event = "BLOCK_JOB_CANCELLED" if cancelled else "BLOCK_JOB_COMPLETED"
        data = job.block_info()
        if not cancelled:
            data["error"] = job.error
        await server.emit(event, data)
        await _set(server, job, "concluded")
        return
    await _set(server, job, "waiting")
    await _set(server, job, "pending")
    if job.pivot and not cancelled:
        g = server.nodes_graph()
        g.devices[job.device].root = job.base
        g.nodes[job.base].read_only = False
        on_pivot(job)
    await server.emit("BLOCK_JOB_COMPLETED", job.block_info())
    await _set(server, job, "concluded")


def block_graph(server: FakeQMPServer) -> dict[str, Any]:
    """What ``x-debug-query-block-graph`` answers for ``server``'s graph and jobs."""
    g = server.nodes_graph()
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    ids: dict[str, int] = {}

    def add(kind: str, name: str) -> int:
        nodes.append({"id": len(nodes) + 1, "type": kind, "name": name})
        return len(nodes)

    def edge(parent: int, child: str, name: str) -> None:
        if child in ids:
            edges.append({"parent": parent, "child": ids[child], "name": name,
                          "perm": [], "shared-perm": []})

    for name in g.nodes:
        ids[name] = add("block-driver", name)
    for dev in g.devices.values():
        if dev.root is not None:
            edge(add("block-backend", ""), dev.root, "root")
    for name, node in g.nodes.items():
        if node.file is not None:
            edge(ids[name], node.file, "file")
        if node.backing is not None:
            edge(ids[name], node.backing, "backing")
    for job in server.jobs.values():
        if isinstance(job, FakeCommitJob) and job.status not in ("concluded", "null"):
            jid = add("block-job", job.id)
            # QEMU's main node is the job's filter above the top (not modelled): the top itself
            edge(jid, job.top, "main node")
            edge(jid, job.top, "source")
            edge(jid, job.base, "target")
            for name in job.intermediates:
                edge(jid, name, "intermediate node")
    return {"nodes": nodes, "edges": edges}
