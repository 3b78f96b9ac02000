"""Shared helpers for the benchmarks in this directory (not part of the library).

Statistics (medians, ratios), a plain-text table printer, a description of the machine the run
happened on, and the output convention of every benchmark: the human-readable report goes to
stdout, or to stderr when ``--json`` asks for a machine-readable result on stdout.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO


class Report:
    """Where the human-readable output goes (stdout, or stderr under ``--json``)."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.out: TextIO = sys.stderr if json_mode else sys.stdout

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def table(
        self,
        header: Sequence[str],
        rows: Iterable[Sequence[object]],
        indent: str = "  ",
        left: Sequence[int] = (0,),
    ) -> None:
        """Print rows as an aligned table: the columns in ``left`` left-aligned, the others right."""
        cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
        for n, row in enumerate(cells):
            parts = [
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            self.line(indent + "  ".join(parts).rstrip())
            if n == 0:
                self.line(indent + "  ".join("-" * w for w in widths))

    def emit_json(self, document: dict[str, Any]) -> None:
        if self.json_mode:
            json.dump(document, sys.stdout, indent=2, sort_keys=False)
            sys.stdout.write("\n")
            sys.stdout.flush()


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def rotate(items: Sequence[str], k: int) -> list[str]:
    """``items`` rotated left by ``k``: round k of a cyclic (Latin-square) order."""
    k %= len(items)
    return list(items[k:]) + list(items[:k])


def qemu_version() -> str:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        return "unknown"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("QEMU emulator version ").strip() or "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "qemu": qemu_version(),
        "accel": "tcg",
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine(report: Report, info: dict[str, Any]) -> None:
    load = ", ".join(f"{x:.2f}" for x in info["loadavg_at_start"])
    report.line(
        f"{info['date']}; {info['cpus']} CPUs ({info['cpu_model']}); QEMU {info['qemu']} (TCG); "
        f"Python {info['python']}; load average at start {load}"
    )
