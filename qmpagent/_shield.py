"""Run a clean-up step to completion however the caller is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import anyio

T = TypeVar("T")


async def run_to_completion(coro: Awaitable[T]) -> T:
    """Await ``coro`` in a task of its own and do not give up on it when the caller is
    cancelled, whether through an anyio cancel scope (blocked by a shielded scope) or natively
    with ``Task.cancel()`` (absorbed by ``asyncio.shield`` until the step is done). A cancellation
    that arrived meanwhile is re-raised afterwards. ``coro`` must bound its own duration.
    """
    task = asyncio.ensure_future(coro)
    cancelled: asyncio.CancelledError | None = None
    with anyio.CancelScope(shield=True):
        while True:
            try:
                result = await asyncio.shield(task)
                break
            except asyncio.CancelledError as exc:
                if task.done():
                    raise  # the step itself was cancelled
                cancelled = exc
    if cancelled is not None:
        raise cancelled
    return result
