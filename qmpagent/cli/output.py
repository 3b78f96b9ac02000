"""What the command writes: lines on stdout, ``qmpagent: ...`` lines on stderr, JSON, and the
small formats shared by the commands (milliseconds, sizes, events)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import os
import sys
from typing import Any, Final

from ..monitor import QMPEvent

__all__ = ["PROG", "WIDTH", "dumps", "emit_json", "err", "ms", "out", "print_event", "size", "tty"]

PROG: Final = "qmpagent"
#: The width help texts and the agent's command table are laid out in.
WIDTH: Final = 100


def _json_default(value: object) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def dumps(value: Any, pretty: bool = False) -> str:
    """``value`` as JSON; enums, bytes, paths and dataclasses as their plain values."""
    return json.dumps(value, default=_json_default, indent=2 if pretty else None)


def out(text: str = "") -> None:
    """A line on stdout, flushed (a pipe reader sees it at once)."""
    print(text, file=sys.stdout, flush=True)


def emit_json(value: Any) -> None:
    """``value`` as one line of JSON on stdout."""
    out(dumps(value))


def err(text: str) -> None:
    """``qmpagent: text`` on stderr."""
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def tty(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (progress is only shown on one)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def ms(seconds: float | None) -> str:
    """``seconds`` in milliseconds, ``-`` for None."""
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def size(n: object) -> str:
    """A byte count in binary units, ``?`` if it is not a number."""
    if not isinstance(n, int):
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _event_time(event: QMPEvent) -> str:
    ts = event.get("timestamp") or {}
    sec, usec = ts.get("seconds"), ts.get("microseconds")
    if not isinstance(sec, int) or not isinstance(usec, int) or sec < 0:
        return "-"
    return datetime.datetime.fromtimestamp(sec + usec / 1e6).strftime("%Y-%m-%d %H:%M:%S.%f")


def print_event(event: QMPEvent, as_json: bool) -> None:
    """A QMP event: one JSON line, or its local time, name and data."""
    if as_json:
        emit_json(event)
    else:
        data = f" {dumps(event['data'])}" if event.get("data") else ""
        out(f"{_event_time(event)} {event['event']}{data}")
