"""The fake QEMU's built-in QMP commands: handlers (see ``FakeQMPServer.handlers``) that act
on the server's public model through ``call.server``; the block commands also get the block
layer and the job starter the server hands them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ._block_graph import BlockLayer
from ._qmp_backup import BACKUP_ACTIONS
from ._qmp_error import FakeQMPError, generic_error

if TYPE_CHECKING:  # the server imports this module: its types only for the checker
    from .fake_qmp import FakeCall, FakeJob, Handler

__all__ = ["BUILTIN_HANDLERS", "JobStarter", "block_handlers", "no_arguments", "string_arg"]

#: Starts a job for a command: (call, job id, type, duration, error, work) -> the job.
JobStarter = Callable[..., Awaitable["FakeJob"]]



def _qmp_capabilities(call: FakeCall) -> dict[str, Any]:
    if call.connection.negotiated:
        raise FakeQMPError(
            "CommandNotFound", "Capabilities negotiation is already complete, "
            "command ignored",
        )
    enable = call.arg("enable", list, [])
    for cap in enable:
        if cap != "oob":
            raise FakeQMPError(
                "GenericError", f"Parameter 'enable' does not accept value '{cap}'"
            )
    call.connection.oob = "oob" in enable
    call.connection.negotiated = True
    return {}


def _query_status(call: FakeCall) -> dict[str, Any]:
    no_arguments(call)
    if not call.server.profile.status_singlestep:
        return {"running": call.server.status == "running", "status": call.server.status}
    return {"running": call.server.status == "running", "singlestep": False,
            "status": call.server.status}


def _query_version(call: FakeCall) -> dict[str, Any]:
    no_arguments(call)
    major, minor, micro = call.server.version
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": call.server.package}


def _query_commands(call: FakeCall) -> list[dict[str, str]]:
    return [{"name": name} for name in sorted(call.server.handlers)]


def _query_chardev(call: FakeCall) -> list[dict[str, Any]]:
    no_arguments(call)
    return [{"label": label, "filename": info.get("filename", ""),
             "frontend-open": info.get("frontend-open", False)}
            for label, info in call.server.chardevs.items()]


def _qom_list(call: FakeCall) -> list[dict[str, str]]:
    path = call.arg("path", str).rstrip("/") or "/"
    obj = call.server.qom.get(path)
    if obj is None:
        raise FakeQMPError("DeviceNotFound", f"Device '{path}' not found")
    entries = [{"name": "type", "type": "string"}]
    entries += [{"name": p, "type": "string"} for p in obj.properties]
    prefix = path + "/"
    for child_path, child in call.server.qom.items():
        rest = child_path[len(prefix):]
        if child_path.startswith(prefix) and rest and "/" not in rest:
            entries.append({"name": rest, "type": f"child<{child.type}>"})
    return entries


def _qom_get(call: FakeCall) -> Any:
    path = call.arg("path", str).rstrip("/") or "/"
    prop = call.arg("property", str)
    obj = call.server.qom.get(path)
    if obj is None:
        raise FakeQMPError("DeviceNotFound", f"Device '{path}' not found")
    if prop == "type":
        return obj.type
    if prop not in obj.properties:
        raise FakeQMPError("GenericError", f"Property '{obj.type}.{prop}' not found")
    return obj.properties[prop]


def _query_block(call: FakeCall) -> list[dict[str, Any]]:
    no_arguments(call)
    return list(call.server.block_devices)


def _query_named_block_nodes(call: FakeCall) -> list[dict[str, Any]]:
    no_arguments(call, "flat")
    flat = call.arg("flat", bool, False)
    return call.server.named_block_nodes(flat=flat)


def _query_jobs(call: FakeCall) -> list[dict[str, Any]]:
    return [job.info() for job in call.server.jobs.values()]


def _find_job(call: FakeCall) -> FakeJob:
    job_id = call.arg("id", str)
    job = call.server.jobs.get(job_id)
    if job is None:
        raise FakeQMPError("GenericError", "Job not found")
    return job


def _job_cancel(call: FakeCall) -> dict[str, Any]:
    job = _find_job(call)
    if job.status in ("concluded", "aborting", "null"):
        raise FakeQMPError(
            "GenericError",
            f"Job '{job.id}' in state '{job.status}' cannot accept command verb 'cancel'",
        )
    job.cancel()
    return {}

async def _job_dismiss(call: FakeCall) -> dict[str, Any]:
    job = _find_job(call)
    if job.status != "concluded":
        raise FakeQMPError(
            "GenericError",
            f"Job '{job.id}' in state '{job.status}' cannot accept command verb 'dismiss'",
        )
    del call.server.jobs[job.id]
    await call.server.emit("JOB_STATUS_CHANGE", {"id": job.id, "status": "null"})
    return {}

async def _stop(call: FakeCall) -> dict[str, Any]:
    call.server.status = "paused"
    await call.server.emit("STOP")
    return {}

async def _cont(call: FakeCall) -> dict[str, Any]:
    call.server.status = "running"
    await call.server.emit("RESUME")
    return {}



#: The commands every fake QEMU answers.
BUILTIN_HANDLERS: dict[str, Handler] = {
    "qmp_capabilities": _qmp_capabilities,
    "query-status": _query_status,
    "query-version": _query_version,
    "query-commands": _query_commands,
    "query-chardev": _query_chardev,
    "qom-list": _qom_list,
    "qom-get": _qom_get,
    "query-block": _query_block,
    "query-named-block-nodes": _query_named_block_nodes,
    "query-jobs": _query_jobs,
    "job-cancel": _job_cancel,
    "job-dismiss": _job_dismiss,
    "stop": _stop,
    "cont": _cont,
}


def block_handlers(block: BlockLayer, start_job: JobStarter) -> dict[str, Handler]:
    """``blockdev-add``, ``blockdev-del``, ``transaction`` and ``blockdev-create`` over
    ``block``, the last starting its job with ``start_job``."""
    def blockdev_add(call: FakeCall) -> dict[str, Any]:
        block.add(dict(call.arguments))
        return {}

    def blockdev_del(call: FakeCall) -> dict[str, Any]:
        no_arguments(call, "node-name")
        name = string_arg(call, "node-name")
        call.server.blockdev_del(name)
        return {}

    async def transaction(call: FakeCall) -> dict[str, Any]:
        no_arguments(call, "actions", "properties")
        actions = call.arguments.get("actions")
        if actions is None:
            raise generic_error("Parameter 'actions' is missing")
        if not isinstance(actions, list):
            raise generic_error("Invalid parameter type for 'actions', expected: array")
        for i, action in enumerate(actions):
            if not isinstance(action, dict):
                raise generic_error(f"Invalid parameter type for 'actions[{i}]', expected: object")
        if any(action.get("type") in BACKUP_ACTIONS for action in actions):
            backups = call.server.backups
            await backups.start(backups.transaction(actions))
            return {}
        call.server.snapshot(actions)
        return {}

    async def blockdev_create(call: FakeCall) -> dict[str, Any]:
        no_arguments(call, "job-id", "options")
        job_id = string_arg(call, "job-id")
        options = call.arguments.get("options")
        if options is None:
            raise generic_error("Parameter 'options' is missing")
        if not isinstance(options, dict):
            raise generic_error("Invalid parameter type for 'options', expected: object")
        work = block.create_work(options)
        if job_id in call.server.jobs:
            raise generic_error(f"Job ID '{job_id}' already in use")
        await start_job(call, job_id, "create", call.server.job_duration, None, work)
        return {}


    return {
        "blockdev-add": blockdev_add,
        "blockdev-del": blockdev_del,
        "transaction": transaction,
        "blockdev-create": blockdev_create,
    }


def no_arguments(call: FakeCall, *allowed: str) -> None:
    """Refuse unexpected arguments like QEMU's QAPI input visitor."""
    for key in call.arguments:
        if key not in allowed:
            raise generic_error(f"Parameter '{key}' is unexpected")


def string_arg(call: FakeCall, name: str) -> str:
    if name not in call.arguments:
        raise generic_error(f"Parameter '{name}' is missing")
    value = call.arguments[name]
    if not isinstance(value, str):
        raise generic_error(f"Invalid parameter type for '{name}', expected: string")
    return value

