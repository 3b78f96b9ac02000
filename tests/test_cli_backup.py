"""``qmpagent backup`` against the fake VM, in a subprocess: human and --json output, the
incremental chain, progress only on a terminal, and the error rows (exit 2 and 10)."""

from __future__ import annotations

import asyncio
import os
import pty
import sys
from pathlib import Path

import pytest
from cli_run import clean_env, one_line, qmpagent

from qmpagent.cli import ExitCode, exit_code_for, main
from qmpagent.errors import BackupChainError, BackupError, SnapshotRecord
from qmpagent.testing import FakeVM


def env(state: Path) -> dict[str, str]:
    return {**clean_env(), "XDG_STATE_HOME": str(state)}


async def test_full_then_incremental(tmp_path: Path) -> None:
    async with FakeVM() as vm:
        vm.qmp.backups.rate = float(1 << 28)
        addr = ("--qmp", vm.qmp_address, "--agent", vm.agent_address)
        full, inc = tmp_path / "full.qcow2", tmp_path / "inc.qcow2"
        r = await qmpagent("backup", *addr, "--disk", f"vblk0={full}", env=env(tmp_path))
        assert r.rc == 0, r
        assert "Backup complete, quiesced: froze 1 filesystem(s), thawed 1" in r.out
        assert f"  vblk0 -> {full} (full; 64.0 MiB copied)" in r.out
        assert "  copy " in r.out
        assert r.err == ""  # no terminal: no progress
        vm.qmp.backups.guest_write("disk0", 0, 1)
        r = await qmpagent("--json", "backup", *addr, "--disk", f"vblk0={inc}",
                           "--since", f"vblk0={full}", env=env(tmp_path))
        assert r.rc == 0, r
        res = r.json()
        assert res["quiesced"] and res["freeze_owner"] == "self"
        assert res["targets"] == {"vblk0": str(inc)} and res["incremental"] == {"vblk0": True}
        assert res["bytes_copied"] == {"vblk0": 65536} and res["since"] == {"vblk0": str(full)}
        assert res["warnings"] == [] and res["guarded"] is True
        # The chain records sit beside the journal's directory, never in it.
        assert list((tmp_path / "qmpagent-backups").glob("chain-*.json"))
        assert not (tmp_path / "qmpagent").exists() or not list((tmp_path / "qmpagent").iterdir())
        # The wrong since: refused, exit 2, the error's fields in --json.
        r = await qmpagent("--json", "backup", *addr, "--disk", f"vblk0={tmp_path / 'x.qcow2'}",
                           "--since", f"vblk0={full}", env=env(tmp_path))
        assert r.rc == ExitCode.USAGE, r
        error = r.json()["error"]
        assert error["type"] == "BackupChainError" and error["disk"] == "vblk0"
        assert "not the last backup" in error["why"]
        assert not (tmp_path / "x.qcow2").exists()


async def test_progress_only_on_a_terminal(tmp_path: Path) -> None:
    async with FakeVM() as vm:
        vm.qmp.backups.rate = 64 * (1 << 20) / 1.2  # 1.2 s: a few progress lines
        master, slave = pty.openpty()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "qmpagent", "backup", "--qmp", str(vm.qmp_address),
                "--agent", str(vm.agent_address), "--disk", f"vblk0={tmp_path / 'b.qcow2'}",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=slave,
                env=env(tmp_path))
            os.close(slave)
            slave = -1
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, out
            chunks = []
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not data:
                    break
                chunks.append(data)
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)
        tty_err = b"".join(chunks).decode()
        assert "full backup of vblk0" in tty_err
        assert "  copy..." in tty_err and "  thaw done in" in tty_err
        assert "vblk0: 100.0% (64.0 MiB of 64.0 MiB)" in tty_err
        assert "%" in tty_err.split("vblk0: 100.0%")[0]  # earlier lines too


async def test_a_failed_backup_exits_10_and_leaves_nothing(tmp_path: Path) -> None:
    async with FakeVM() as vm:
        await vm.stop_agent()
        target = tmp_path / "b.qcow2"
        r = await qmpagent("--json", "backup", "--qmp", vm.qmp_address, "--agent", vm.agent_address,
                           "--disk", f"vblk0={target}", env=env(tmp_path))
        assert r.rc == ExitCode.BACKUP_FAILED == 10, r
        error = r.json()["error"]
        assert error["type"] == "BackupError" and error["stage"] == "window"
        assert one_line(r.err).startswith("qmpagent: backup failed in preflight: quiesce required")
        assert one_line(r.err).endswith("(its files were removed; no tracked change was lost)")
        assert not target.exists() and not vm.new_nodes()


@pytest.mark.parametrize(
    "argv",
    [
        ["backup", "--qmp", "/x"],
        ["backup", "--qmp", "/x", "--disk", "d=/a", "--since", "e=/b"],
        ["backup", "--qmp", "/x", "--disk", "d=/a", "--since", "d=/b", "--since", "d=/c"],
        ["backup", "--qmp", "/x", "--disk", "d=/a", "--since", "d=/b", "--no-bitmap"],
        ["backup", "--qmp", "/x", "--disk", "d=/a", "--timeout", "0"],
        ["backup", "--disk", "d=/a"],
    ],
)
def test_usage_errors(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("QMPAGENT_QMP", raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: qmpagent" in capsys.readouterr().err


def test_error_rows() -> None:
    assert exit_code_for(BackupError("x", SnapshotRecord())) is ExitCode.BACKUP_FAILED
    assert exit_code_for(BackupChainError("vblk0", "/a", "no")) is ExitCode.USAGE


async def test_ctrl_c_during_the_copy_exits_130_and_leaves_nothing(tmp_path: Path) -> None:
    import signal

    from qmpagent.testing.fake_qmp import FakeBackupJob

    async with FakeVM() as vm:
        vm.qmp.backups.rate = 1 << 20  # a minute for the disk
        target = tmp_path / "b.qcow2"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qmpagent", "backup", "--qmp", str(vm.qmp_address),
            "--agent", str(vm.agent_address), "--disk", f"vblk0={target}",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env(tmp_path))
        try:
            for _ in range(1000):
                if any(isinstance(j, FakeBackupJob) and j.current > 0 for j in vm.qmp.jobs.values()):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the copy did not start")
            proc.send_signal(signal.SIGINT)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == ExitCode.INTERRUPTED, err
        assert not target.exists() and not vm.new_nodes() and not vm.qmp.jobs
        assert vm.qmp.calls("job-cancel") and not vm.agent.frozen


@pytest.mark.parametrize("flags, durable", [((), True), (("--no-fsync",), False)])
async def test_no_fsync_leaves_the_files_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    flags: tuple[str, ...], durable: bool,
) -> None:
    from qmpagent import SnapshotOrchestrator

    seen: list[object] = []
    real = SnapshotOrchestrator.backup

    async def backup(self: SnapshotOrchestrator, *args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("durable"))
        return await real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SnapshotOrchestrator, "backup", backup)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    async with FakeVM() as vm:
        target = tmp_path / "b.qcow2"
        argv = ["backup", "--qmp", vm.qmp_address, "--agent", vm.agent_address,
                "--disk", f"vblk0={target}", *flags]
        # main() runs its own event loop: in a thread, while the fake VM serves in this one.
        assert await asyncio.to_thread(main, argv) == 0
    assert seen == [durable]
    assert target.exists() and "Backup complete" in capsys.readouterr().out
