"""Addresses and the other argument types of the command line: each turns one argument's text
into its value or raises :class:`argparse.ArgumentTypeError` (exit status 2, as argparse)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any, Final

from ..agent import AgentAddress

__all__ = [
    "AGENT_ENV",
    "QMP_ENV",
    "QMPAddress",
    "add_address_option",
    "address_text",
    "count",
    "disk",
    "json_object",
    "parse_agent_address",
    "parse_qmp_address",
    "seconds",
]

#: The environment variables ``--qmp`` and ``--agent`` default to.
QMP_ENV: Final = "QMPAGENT_QMP"
AGENT_ENV: Final = "QMPAGENT_AGENT"

QMPAddress = str | tuple[str, int]

_HOST_PORT = re.compile(r"\[(?P<host6>[^\]]+)\]:(?P<port6>\d+)|(?P<host>[^/:\[\]]+):(?P<port>\d+)")


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {text}")
    return port


def _host_port(text: str) -> tuple[str, int] | None:
    m = _HOST_PORT.fullmatch(text)
    if m is None:
        return None
    if m.group("host6") is not None:
        return m.group("host6"), _port(m.group("port6"))
    return m.group("host"), _port(m.group("port"))


def parse_qmp_address(text: str) -> QMPAddress:
    """``--qmp``: a unix socket path, ``HOST:PORT`` (``[v6addr]:PORT``), ``unix:PATH`` or
    ``tcp:HOST:PORT``. A ``HOST:PORT`` that names an existing file is taken as a path."""
    if text.startswith("unix:"):
        if not text[5:]:
            raise argparse.ArgumentTypeError("unix: needs a path")
        return text[5:]
    if text.startswith("tcp:"):
        hp = _host_port(text[4:])
        if hp is None:
            raise argparse.ArgumentTypeError(f"expected tcp:HOST:PORT, not {text!r}")
        return hp
    if not text:
        raise argparse.ArgumentTypeError("empty address")
    hp = _host_port(text)
    if hp is not None and not os.path.exists(text):
        return hp
    return text


def parse_agent_address(text: str) -> AgentAddress:
    """``--agent``: like ``--qmp``, plus ``vsock:CID:PORT``."""
    if text.startswith("vsock:"):
        parts = text.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise argparse.ArgumentTypeError(f"expected vsock:CID:PORT, not {text!r}")
        return ("vsock", int(parts[1]), int(parts[2]))
    return parse_qmp_address(text)


def _as_is(value: object) -> object:
    return value


def add_address_option(
    group: Any, flag: str, help: str, default: Callable[[object], object] = _as_is
) -> None:
    """Add ``--qmp`` or ``--agent`` (``flag``) to ``group`` (a parser or an argument group): its
    parser, and its default from its environment variable, passed through ``default`` (see
    :func:`~qmpagent.cli.command.shared_default`)."""
    env, parse = {"--qmp": (QMP_ENV, parse_qmp_address), "--agent": (AGENT_ENV, parse_agent_address)}[flag]
    group.add_argument(flag, type=parse, metavar="ADDR", default=default(os.environ.get(env) or None),
                       help=help)


def address_text(address: object) -> str:
    """An address as it is written on the command line (the inverse of the parsers)."""
    if isinstance(address, tuple):
        if len(address) == 3:
            return ":".join(map(str, address))
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def seconds(text: str) -> float:
    """A positive number of seconds (a timeout, a duration)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def count(text: str) -> int:
    """A whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def json_object(text: str) -> dict[str, Any]:
    """A JSON object; ``-`` reads it from standard input."""
    if text == "-":
        text = sys.stdin.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r:.80}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, not {text!r:.80}")
    return value


def disk(text: str) -> tuple[str, str]:
    """``NODE=OVERLAY``: a block node (or device id) and its overlay file, made absolute."""
    node, sep, path = text.partition("=")
    if not sep or not node or not path:
        raise argparse.ArgumentTypeError(f"expected NODE=OVERLAY, not {text!r}")
    return node, os.path.abspath(os.path.expanduser(path))
