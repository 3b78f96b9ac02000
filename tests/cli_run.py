"""Running the ``qmpagent`` command in a subprocess, shared by the CLI tests."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from typing import Any


@dataclass
class Run:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def __str__(self) -> str:
        return f"exit {self.rc}\nstdout: {self.out!r}\nstderr: {self.err!r}"


def clean_env() -> dict[str, str]:
    """The environment without ``QMPAGENT_*`` defaults, so only the arguments count."""
    return {k: v for k, v in os.environ.items() if not k.startswith("QMPAGENT_")}


async def start(*args: object, **kwargs: Any) -> asyncio.subprocess.Process:
    streams = {"stdin": asyncio.subprocess.PIPE, "stdout": asyncio.subprocess.PIPE,
               "stderr": asyncio.subprocess.PIPE}
    streams.update({k: kwargs.pop(k) for k in list(streams) if k in kwargs})
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpagent", *map(str, args),
        env=kwargs.pop("env", clean_env()), **streams, **kwargs,
    )


async def qmpagent(*args: object, stdin: bytes = b"", timeout: float = 120.0, **kwargs: Any) -> Run:
    proc = await start(*args, **kwargs)
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def one_line(text: str) -> str:
    lines = text.strip("\n").split("\n")
    assert len(lines) == 1, f"expected one line, got {text!r}"
    return lines[0]
