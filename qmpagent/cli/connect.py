"""Connections of the commands, closed even when a signal cancelled the command."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol, TypeVar

from .._shield import run_to_completion

__all__ = ["closing"]


class _Closable(Protocol):
    async def close(self) -> None: ...


_C = TypeVar("_C", bound=_Closable)


@contextlib.asynccontextmanager
async def closing(resource: _C) -> AsyncIterator[_C]:
    """``async with`` a connection whose close is shielded: after a signal cancelled the command
    (an anyio cancel scope, which keeps cancelling), the connection is still closed cleanly."""
    try:
        yield resource
    finally:
        await run_to_completion(resource.close())
