"""What the README promises works as written: the CLI tour, line by line, on the real guest."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from qmpagent.testing import Guest

pytestmark = pytest.mark.real_vm

README = Path(__file__).resolve().parent.parent / "README.md"


def cli_tour() -> list[list[str]]:
    text = README.read_text()
    block = re.search(r"```sh\nexport QMPAGENT_QMP=.*?\n(.*?)```", text, re.S)
    assert block, "the README's CLI tour is missing"
    lines = []
    # A line ending in a backslash goes on in the next one, as in the shell.
    for line in block.group(1).replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "qmpagent", line
            lines.append(words[1:])
    return lines


def test_the_tour_covers_every_subcommand() -> None:
    used = {words[0] for words in cli_tour()}
    assert {"agent", "qmp", "snapshot", "chain", "commit", "backup", "export"} <= used


async def test_readme_cli_tour_runs_as_written(qemu_guest: Guest) -> None:
    env = dict(os.environ, QMPAGENT_QMP=str(qemu_guest.qmp_path),
               QMPAGENT_AGENT=str(qemu_guest.agent_path))
    for words in cli_tour():
        # The tour's paths are an example VM's: put this guest's working directory there.
        words = [w.replace("/var/lib/vm1", str(qemu_guest.workdir)) for w in words]
        waits_for_event = words[:2] == ["qmp", "wait-event"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qmpagent", *words, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        communicate = asyncio.ensure_future(proc.communicate())
        if waits_for_event:
            # Make the agent's port close and reopen (the guest's init restarts a killed
            # qemu-ga) until the waiting command has seen it open: no guess at when it listens.
            for _ in range(60):
                done, _ = await asyncio.wait({communicate}, timeout=2)
                if done:
                    break
                await qemu_guest.run("killall -9 qemu-ga", check=False)
        out, err = await asyncio.wait_for(communicate, 120)
        assert proc.returncode == 0, (words, out.decode(), err.decode())
