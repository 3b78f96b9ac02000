"""``qmpagent chain`` and ``qmpagent commit`` (and ``snapshot --mountpoint``) against a fake VM,
run as a user runs them (a subprocess)."""

from __future__ import annotations

from typing import Any

import pytest
from cli_run import qmpagent

from qmpagent import CommitError, CommitRecord, CommitTimeout, JobReadyTimeout, UnknownMountpointError
from qmpagent.cli import ExitCode
from qmpagent.cli.failures import exit_code_for
from qmpagent.testing import FakeVM


@pytest.mark.asyncio
async def test_chain_and_commit(fake_vm: FakeVM) -> None:
    qmp, agent, w = fake_vm.qmp_address, fake_vm.agent_address, fake_vm.workdir
    for i in (1, 2):
        run = await qmpagent("snapshot", "--qmp", qmp, "--agent", agent,
                             "--disk", f"vblk0={w}/s{i}.qcow2")
        assert run.rc == 0, run
    run = await qmpagent("chain", "--qmp", qmp, "vblk0")
    assert run.rc == 0, run
    lines = run.out.splitlines()
    assert lines[0].split() == ["#", "NODE", "FORMAT", "SIZE", "FILE"]
    assert lines[1].endswith(f"{w}/s2.qcow2  (active)") and " qcow2 " in lines[1]
    assert "64.0 MiB" in lines[1] and lines[-1].endswith("(base)")
    run = await qmpagent("--json", "chain", "--qmp", qmp, "vblk0")
    chain = run.json()
    assert [n["depth"] for n in chain] == list(range(len(chain)))
    assert chain[2]["node_name"] == "disk0" and chain[2]["file_node_name"] == "file0"

    run = await qmpagent("commit", "--qmp", qmp, "--disk", "vblk0", "--delete-files")
    assert run.rc == 0, run
    assert run.out.startswith(f"Committed vblk0: merged {chain[0]['node_name']} down; the device "
                              f"runs on {chain[1]['node_name']} ")
    assert f"removed files: {w}/s2.qcow2" in run.out and not (w / "s2.qcow2").exists()
    assert run.err == ""  # no progress: not a terminal
    run = await qmpagent("--json", "commit", "--qmp", qmp, "--disk", "vblk0", "--base", "disk0")
    assert run.rc == 0, run
    res = run.json()
    assert res["active_node"] == "disk0" and res["removed_files"] == []
    assert res["merged_files"] == [f"{w}/s1.qcow2"] and (w / "s1.qcow2").exists()


@pytest.mark.asyncio
async def test_commit_failures_and_their_exit_status(fake_vm: FakeVM) -> None:
    qmp = fake_vm.qmp_address
    run = await qmpagent("commit", "--qmp", qmp, "--disk", "nope")
    assert run.rc == ExitCode.USAGE and "no block device or node named 'nope'" in run.err
    run = await qmpagent("commit", "--disk", "vblk0")
    assert run.rc == ExitCode.USAGE and "--qmp is required" in run.err
    run = await qmpagent("commit", "--qmp", qmp, "--disk", "vblk0", "--speed", "fast")
    assert run.rc == ExitCode.USAGE
    run = await qmpagent("snapshot", "--qmp", qmp, "--agent", fake_vm.agent_address, "--disk",
                         f"vblk0={fake_vm.workdir}/s.qcow2", "--mountpoint", "/mnt/typo")
    assert run.rc == ExitCode.USAGE and "no filesystem mounted at /mnt/typo" in run.err
    run = await qmpagent("--json", "snapshot", "--qmp", qmp, "--agent", fake_vm.agent_address,
                         "--disk", f"vblk0={fake_vm.workdir}/s.qcow2", "--mountpoint", "/mnt/data")
    assert run.rc == 0 and run.json()["frozen"] == 1, run
    fake_vm.qmp.commit_rate, fake_vm.qmp.guest_write_rate = 1 << 20, 1 << 22
    run = await qmpagent("--json", "commit", "--qmp", qmp, "--disk", "vblk0", "--timeout", "0.3")
    assert run.rc == ExitCode.TIMEOUT, run
    error = run.json()["error"]
    assert error["type"] == "CommitTimeout" and error["record"]["stage"] == "ready"
    assert error["record"]["pivoted"] is False
    assert "still runs on" in run.err


@pytest.mark.parametrize(("exc", "code"), [
    (CommitError("x", CommitRecord()), ExitCode.COMMIT_FAILED),
    (CommitTimeout("x", CommitRecord()), ExitCode.TIMEOUT),
    (JobReadyTimeout("x", job_id="j"), ExitCode.TIMEOUT),
    (UnknownMountpointError(["/x"], ["/"]), ExitCode.USAGE),
])
def test_new_errors_have_their_exit_status(exc: BaseException, code: Any) -> None:
    assert exit_code_for(exc) == code


@pytest.mark.asyncio
async def test_commit_progress_on_a_terminal(fake_vm: FakeVM) -> None:
    import asyncio
    import os
    import sys

    from cli_run import clean_env

    run = await qmpagent("snapshot", "--qmp", fake_vm.qmp_address, "--agent",
                         fake_vm.agent_address, "--disk", f"vblk0={fake_vm.workdir}/s.qcow2")
    assert run.rc == 0, run
    fake_vm.qmp.commit_rate = 4 << 20  # 8 MiB: about two seconds
    master, slave = os.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qmpagent", "commit", "--qmp", str(fake_vm.qmp_address),
            "--disk", "vblk0", stdout=asyncio.subprocess.PIPE, stderr=slave, env=clean_env())
        os.close(slave)
        slave = -1
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    err = b"".join(chunks).decode()
    assert proc.returncode == 0, err
    assert "commit of vblk0 into the image below its active layer..." in err
    assert "qmpagent:   commit running " in err and " of 8.0 MiB)" in err
    assert "qmpagent:   commit ready     100.0%" in err
    assert out.decode().startswith("Committed vblk0: ")
